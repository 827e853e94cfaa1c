//! A loopback TLS harness: one server accept and one client connect, each bounded in
//! time, reporting how each side's handshake ended.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use segmesh_identity::ca::certs_from_pem;
use segmesh_identity::tls::provider;
use segmesh_identity::{
    Ca, IdentityError, KeyAlgorithm, LeafSpec, Rejection, Sessions, SpiffeId, TlsConfigs,
    WorkloadIdentity, WorkloadKey, peer_identity,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const TD: &str = "segmesh.local";
const LIMIT: Duration = Duration::from_secs(10);

/// A certificate chain and its key.
pub struct Material {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

pub fn id(ns: &str, name: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, name).unwrap()
}

pub fn issue(ca: &Ca, ns: &str, name: &str, tags: &[&str], alg: KeyAlgorithm) -> Material {
    let key = WorkloadKey::generate(alg).unwrap();
    let tags: Vec<String> = tags.iter().map(|s| s.to_string()).collect();
    let issued = ca
        .issue(
            &key.csr_pem(name).unwrap(),
            &id(ns, name),
            &tags,
            Duration::from_secs(3600),
        )
        .unwrap();
    Material {
        chain: certs_from_pem(&issued.chain_pem).unwrap(),
        key: PrivateKeyDer::Pkcs8(key.der().into()),
    }
}

/// A leaf exactly as specified (for certificates a correct CA never issues).
pub fn custom(ca: &Ca, spec: &LeafSpec) -> Material {
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let issued = ca.sign_leaf(&key.csr_pem("x").unwrap(), spec).unwrap();
    Material {
        chain: certs_from_pem(&issued.chain_pem).unwrap(),
        key: PrivateKeyDer::Pkcs8(key.der().into()),
    }
}

pub fn spec(
    uris: &[&str],
    tags: Option<Vec<u8>>,
    not_before: SystemTime,
    not_after: SystemTime,
) -> LeafSpec {
    LeafSpec {
        uri_sans: uris.iter().map(|s| s.to_string()).collect(),
        tags_der: tags,
        not_before,
        not_after,
        common_name: "x".into(),
    }
}

pub fn configs(m: &Material, ca: &Ca) -> TlsConfigs {
    TlsConfigs::new(
        m.chain.clone(),
        m.key.clone_key(),
        ca.bundle(),
        TD,
        &Sessions::new().unwrap(),
    )
    .unwrap()
}

#[derive(Debug)]
struct AcceptAll;

impl ServerCertVerifier for AcceptAll {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client that presents `m` (or nothing) and trusts anyone: an attacker's client.
pub fn rogue_client(m: Option<&Material>) -> Arc<ClientConfig> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAll));
    let mut c = match m {
        Some(m) => b
            .with_client_auth_cert(m.chain.clone(), m.key.clone_key())
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![segmesh_identity::ALPN.to_vec()];
    Arc::new(c)
}

/// A server that presents `m` and asks nothing: an attacker's server.
pub fn rogue_server(m: &Material) -> Arc<ServerConfig> {
    let mut s = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .unwrap();
    s.alpn_protocols = vec![segmesh_identity::ALPN.to_vec()];
    Arc::new(s)
}

#[derive(Debug)]
pub struct Side {
    /// The peer's identity as `peer_identity` reports it, or the handshake error.
    pub result: Result<WorkloadIdentity, String>,
    pub rejection: Option<Rejection>,
    pub resumed: bool,
    pub alpn: Option<Vec<u8>>,
}

fn failed(e: std::io::Error) -> Side {
    let rejection = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .and_then(IdentityError::from_rustls);
    Side {
        result: Err(e.to_string()),
        rejection,
        resumed: false,
        alpn: None,
    }
}

fn done(conn: &rustls::CommonState) -> Side {
    let result = peer_identity(conn).map_err(|e| e.to_string());
    Side {
        result,
        rejection: None,
        resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
    }
}

/// One connection on loopback: the server accepts, echoes one byte; the client sends one
/// byte and reads it back (which also delivers TLS 1.3 session tickets to it).
pub async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> (Side, Side) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match tokio_rustls::TlsAcceptor::from(server).accept(tcp).await {
            Err(e) => failed(e),
            Ok(mut tls) => {
                let side = done(tls.get_ref().1);
                let mut b = [0u8; 1];
                if tls.read_exact(&mut b).await.is_ok() {
                    let _ = tls.write_all(&b).await;
                    let _ = tls.flush().await;
                }
                side
            }
        }
    });
    let cli = async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::IpAddress(addr.ip().into());
        match tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
        {
            Err(e) => failed(e),
            Ok(mut tls) => {
                let mut side = done(tls.get_ref().1);
                let mut b = [0u8; 1];
                let echoed = async {
                    tls.write_all(b"x").await?;
                    tls.flush().await?;
                    tls.read_exact(&mut b).await
                };
                if let Err(e) = echoed.await {
                    side.result = Err(format!("after handshake: {e}"));
                    side.rejection = e
                        .get_ref()
                        .and_then(|i| i.downcast_ref::<rustls::Error>())
                        .and_then(IdentityError::from_rustls);
                }
                side
            }
        }
    };
    let c = tokio::time::timeout(LIMIT, cli)
        .await
        .expect("client bounded");
    let s = tokio::time::timeout(LIMIT, srv)
        .await
        .expect("server bounded")
        .unwrap();
    (s, c)
}
