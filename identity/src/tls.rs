//! rustls configurations for enforcer-to-enforcer mTLS: TLS 1.3 only, ALPN `segmesh/2`,
//! a peer certificate required and verified both ways, session resumption on (tickets
//! and a server-side cache), secret extraction on (for kernel TLS).

use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::{ClientConfig, CommonState, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ca::certs_from_pem;
use crate::verify::{ClientVerifier, PeerVerifier};
use crate::{IdentityError, WorkloadIdentity};

/// The ALPN protocol of the mesh tunnel.
pub const ALPN: &[u8] = b"segmesh/2";

/// TLS session state (resumption) of one certificate of a workload: the client's session
/// cache, the server's cache and its ticket keys.
#[derive(Clone)]
pub struct Sessions {
    client: Arc<dyn ClientSessionStore>,
    server: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn ProducesTickets>,
}

impl Sessions {
    pub fn new() -> Result<Self, IdentityError> {
        Ok(Sessions {
            client: Arc::new(ClientSessionMemoryCache::new(4096)),
            server: ServerSessionMemoryCache::new(4096),
            ticketer: rustls::crypto::ring::Ticketer::new()?,
        })
    }
}

/// The cryptography providers segmesh can use, by name.
pub const PROVIDERS: [&str; 2] = ["aws-lc-rs", "ring"];

/// The provider all segmesh TLS uses: aws-lc-rs, unless the environment variable
/// `SEGMESH_TLS_PROVIDER` names another of [`PROVIDERS`] (read once; an unknown name is
/// ignored with a warning). aws-lc-rs won the same-run comparison (`cargo bench -p
/// segmesh-identity --bench provider`, see `benches/README.md`): 21 % faster in bulk,
/// 6 % at handshakes.
pub fn provider() -> Arc<CryptoProvider> {
    static CHOSEN: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    let name = CHOSEN.get_or_init(|| match std::env::var("SEGMESH_TLS_PROVIDER") {
        Ok(v) => match PROVIDERS.iter().find(|p| **p == v) {
            Some(p) => p,
            None => {
                tracing::warn!(provider = %v, known = ?PROVIDERS, "unknown SEGMESH_TLS_PROVIDER; using aws-lc-rs");
                PROVIDERS[0]
            }
        },
        Err(_) => PROVIDERS[0],
    });
    provider_named(name).expect("a known provider")
}

/// Makes [`provider`] the process-wide default, for libraries that build their own
/// rustls configurations without naming a provider (kube-rs's client): with two
/// providers compiled in, rustls cannot pick one by itself. Idempotent.
pub fn install_default_provider() {
    let _ = CryptoProvider::install_default((*provider()).clone());
}

/// The provider called `name` (one of [`PROVIDERS`]).
pub fn provider_named(name: &str) -> Option<Arc<CryptoProvider>> {
    match name {
        "aws-lc-rs" => Some(Arc::new(rustls::crypto::aws_lc_rs::default_provider())),
        "ring" => Some(Arc::new(rustls::crypto::ring::default_provider())),
        _ => None,
    }
}

/// A workload's client and server configurations for one certificate.
#[derive(Clone)]
pub struct TlsConfigs {
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
    /// Our own identity, from our certificate.
    pub identity: WorkloadIdentity,
}

impl TlsConfigs {
    /// `chain`: our certificate then intermediates; `bundle`: the roots we trust.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: &[CertificateDer<'static>],
        trust_domain: &str,
        sessions: &Sessions,
    ) -> Result<Self, IdentityError> {
        Self::with_provider(chain, key, bundle, trust_domain, sessions, provider())
    }

    /// [`new`](Self::new) with the given cryptography provider.
    pub fn with_provider(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: &[CertificateDer<'static>],
        trust_domain: &str,
        sessions: &Sessions,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, IdentityError> {
        let identity =
            WorkloadIdentity::from_cert(chain.first().ok_or(IdentityError::NoCertificate)?)?;
        let versions = &[&rustls::version::TLS13];

        let verifier = Arc::new(PeerVerifier::new(bundle, trust_domain, provider.clone())?);
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain.clone(), key.clone_key())?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        client.resumption = Resumption::store(sessions.client.clone());
        client.enable_secret_extraction = true;

        let client_verifier = Arc::new(ClientVerifier::required(PeerVerifier::new(
            bundle,
            trust_domain,
            provider.clone(),
        )?));
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        server.session_storage = sessions.server.clone();
        server.ticketer = sessions.ticketer.clone();
        server.send_tls13_tickets = 2;
        server.enable_secret_extraction = true;
        Ok(TlsConfigs {
            client: Arc::new(client),
            server: Arc::new(server),
            identity,
        })
    }

    /// From PEM: our chain, our PKCS#8 key, the bundle.
    pub fn from_pem(
        chain_pem: &str,
        key_pem: &str,
        bundle_pem: &str,
        trust_domain: &str,
        sessions: &Sessions,
    ) -> Result<Self, IdentityError> {
        use rustls_pki_types::pem::PemObject;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| IdentityError::Pem("key".into(), "PRIVATE KEY"))?;
        TlsConfigs::new(
            certs_from_pem(chain_pem)?,
            key,
            &certs_from_pem(bundle_pem)?,
            trust_domain,
            sessions,
        )
    }
}

/// The identity of the peer of a completed handshake. Its chain was verified during the
/// full handshake; resumed sessions skip verification, so the validity period is checked
/// here against the current time on every connection.
pub fn peer_identity(conn: &CommonState) -> Result<WorkloadIdentity, IdentityError> {
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(IdentityError::NoCertificate)?;
    let id = WorkloadIdentity::from_cert(cert)?;
    id.check_validity(SystemTime::now())?;
    Ok(id)
}
