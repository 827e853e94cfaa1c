//! The identity crate's errors. Each reason a peer certificate is refused has its own
//! variant, so enforcers can count and record rejections by kind.

use std::path::PathBuf;
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    // --- why a peer certificate is refused
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the certificate does not chain to the trust bundle (another CA)")]
    UnknownIssuer,
    #[error("the certificate expired at {0:?}")]
    Expired(SystemTime),
    #[error("the certificate is not valid before {0:?}")]
    NotYetValid(SystemTime),
    #[error("trust domain `{found}` is not the expected `{expected}`")]
    WrongTrustDomain { expected: String, found: String },
    #[error("the certificate carries no SPIFFE ID (URI SAN)")]
    NoSpiffeId,
    #[error(
        "the certificate carries {0} URI SANs; a workload certificate has exactly one SPIFFE ID"
    )]
    MultipleSpiffeIds(usize),
    #[error("bad SPIFFE ID `{id}`: {reason}")]
    BadSpiffeId { id: String, reason: &'static str },
    #[error("malformed tags extension: {0}")]
    MalformedTags(&'static str),
    #[error("the certificate's signature does not verify (altered after signing?)")]
    InvalidSignature,
    #[error("a CA certificate is presented as a workload certificate")]
    CaAsLeaf,
    #[error("the certificate is not usable for this purpose (extended key usage)")]
    WrongUsage,
    #[error("invalid certificate: {0}")]
    BadCertificate(String),

    // --- issuing and local material
    #[error("invalid certificate signing request: {0}")]
    Csr(String),
    #[error("tag `{0}` is not `key=value` text")]
    BadTag(String),
    #[error("{0} tags or {1} bytes of tags exceed the limit")]
    TooManyTags(usize, usize),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0}: no PEM {1} found")]
    Pem(String, &'static str),
}

impl IdentityError {
    /// Our error inside a rustls error, as returned by our verifiers (they wrap it in
    /// `CertificateError::Other`); `NoCertificatesPresented` maps to
    /// [`IdentityError::NoCertificate`].
    pub fn from_rustls(e: &rustls::Error) -> Option<Rejection> {
        use rustls::{CertificateError, Error};
        match e {
            Error::NoCertificatesPresented => Some(Rejection::NoCertificate),
            Error::InvalidCertificate(CertificateError::Other(other)) => other
                .0
                .downcast_ref::<IdentityError>()
                .map(IdentityError::rejection),
            _ => None,
        }
    }

    /// The kind of rejection, for metrics and flow records.
    pub fn rejection(&self) -> Rejection {
        match self {
            IdentityError::NoCertificate => Rejection::NoCertificate,
            IdentityError::UnknownIssuer => Rejection::UnknownIssuer,
            IdentityError::Expired(_) => Rejection::Expired,
            IdentityError::NotYetValid(_) => Rejection::NotYetValid,
            IdentityError::WrongTrustDomain { .. } => Rejection::WrongTrustDomain,
            IdentityError::NoSpiffeId => Rejection::NoSpiffeId,
            IdentityError::MultipleSpiffeIds(_) => Rejection::MultipleSpiffeIds,
            IdentityError::BadSpiffeId { .. } => Rejection::BadSpiffeId,
            IdentityError::MalformedTags(_) => Rejection::MalformedTags,
            IdentityError::InvalidSignature => Rejection::InvalidSignature,
            IdentityError::CaAsLeaf => Rejection::CaAsLeaf,
            IdentityError::WrongUsage => Rejection::WrongUsage,
            _ => Rejection::Other,
        }
    }
}

/// Why a peer certificate was refused, as a small copyable value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    NoCertificate,
    UnknownIssuer,
    Expired,
    NotYetValid,
    WrongTrustDomain,
    NoSpiffeId,
    MultipleSpiffeIds,
    BadSpiffeId,
    MalformedTags,
    InvalidSignature,
    CaAsLeaf,
    WrongUsage,
    Other,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::NoCertificate => "no_certificate",
            Rejection::UnknownIssuer => "unknown_issuer",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::WrongTrustDomain => "wrong_trust_domain",
            Rejection::NoSpiffeId => "no_spiffe_id",
            Rejection::MultipleSpiffeIds => "multiple_spiffe_ids",
            Rejection::BadSpiffeId => "bad_spiffe_id",
            Rejection::MalformedTags => "malformed_tags",
            Rejection::InvalidSignature => "invalid_signature",
            Rejection::CaAsLeaf => "ca_as_leaf",
            Rejection::WrongUsage => "wrong_usage",
            Rejection::Other => "other",
        }
    }
}
