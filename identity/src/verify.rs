//! rustls certificate verifiers for the mesh: a peer certificate must chain to the trust
//! bundle (rustls-webpki does the path building, signatures, validity and key usage),
//! carry exactly one SPIFFE ID in our trust domain, and a well-formed tags extension.
//! Server names are not used: the caller checks the peer's identity against the workload
//! registry after the handshake ([`peer_identity`](crate::peer_identity)).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::{IdentityError, WorkloadIdentity};

/// Verifies peer certificates against a trust bundle and trust domain.
#[derive(Debug)]
pub struct PeerVerifier {
    roots: Vec<TrustAnchor<'static>>,
    /// Subject key identifiers of the roots (RFC 5280 §4.2.1.2).
    root_key_ids: Vec<Vec<u8>>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

fn unix(t: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.as_secs())
}

fn from_webpki(e: webpki::Error) -> IdentityError {
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => IdentityError::UnknownIssuer,
        W::CertExpired { not_after, .. } => IdentityError::Expired(unix(not_after)),
        W::CertNotValidYet { not_before, .. } => IdentityError::NotYetValid(unix(not_before)),
        W::InvalidSignatureForPublicKey => IdentityError::InvalidSignature,
        W::CaUsedAsEndEntity => IdentityError::CaAsLeaf,
        W::RequiredEkuNotFoundContext(_) => IdentityError::WrongUsage,
        other => IdentityError::BadCertificate(format!("{other:?}")),
    }
}

fn to_rustls(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl PeerVerifier {
    pub fn new(
        bundle: &[CertificateDer<'static>],
        trust_domain: &str,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, IdentityError> {
        let roots = bundle
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| IdentityError::BadCertificate(format!("trust bundle: {e:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if roots.is_empty() {
            return Err(IdentityError::BadCertificate("empty trust bundle".into()));
        }
        let root_key_ids = bundle.iter().filter_map(|c| subject_key_id(c)).collect();
        Ok(PeerVerifier {
            roots,
            root_key_ids,
            trust_domain: trust_domain.to_owned(),
            provider,
        })
    }

    /// Verifies a peer's certificate chain for a usage and returns its identity.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<WorkloadIdentity, IdentityError> {
        let ee = EndEntityCert::try_from(end_entity).map_err(from_webpki)?;
        ee.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| match from_webpki(e) {
            // A bad signature from an issuer whose key we do not know at all is another
            // CA (perhaps with the same name as ours), not an altered certificate.
            IdentityError::InvalidSignature
                if !self.knows_issuer_key(end_entity, intermediates) =>
            {
                IdentityError::UnknownIssuer
            }
            other => other,
        })?;
        let id = WorkloadIdentity::from_cert(end_entity)?;
        if id.trust_domain != self.trust_domain {
            return Err(IdentityError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                found: id.trust_domain,
            });
        }
        Ok(id)
    }
}

impl PeerVerifier {
    /// Whether the leaf's authority key identifier names a root of the bundle or one of
    /// the presented intermediates. No identifier: assume known (rely on the signature).
    fn knows_issuer_key(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> bool {
        let Some(aki) = authority_key_id(leaf) else {
            return true;
        };
        self.root_key_ids.contains(&aki)
            || intermediates
                .iter()
                .any(|c| subject_key_id(c).as_ref() == Some(&aki))
    }
}

fn subject_key_id(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
    let (_, c) = X509Certificate::from_der(der).ok()?;
    c.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

fn authority_key_id(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
    let (_, c) = X509Certificate::from_der(der).ok()?;
    c.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, KeyUsage::server_auth())
            .map(|_| ServerCertVerified::assertion())
            .map_err(to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server side. The mesh requires a client certificate ([`ClientVerifier::required`]);
/// the console takes one when offered ([`ClientVerifier::optional`]: enforcers renew
/// with theirs, administrators come with a token). A certificate that is presented is
/// verified the same way in both.
#[derive(Debug)]
pub struct ClientVerifier {
    pub peer: PeerVerifier,
    pub mandatory: bool,
}

impl ClientVerifier {
    pub fn required(peer: PeerVerifier) -> Self {
        ClientVerifier {
            peer,
            mandatory: true,
        }
    }

    pub fn optional(peer: PeerVerifier) -> Self {
        ClientVerifier {
            peer,
            mandatory: false,
        }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.peer
            .verify(end_entity, intermediates, now, KeyUsage::client_auth())
            .map(|_| ClientCertVerified::assertion())
            .map_err(to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.peer.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.peer.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.peer.supported_verify_schemes()
    }
}
