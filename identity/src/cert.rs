//! Parsing a workload certificate into its identity and tags.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::SpiffeId;
use crate::{IdentityError, tags};

/// Who a peer is, taken only from a certificate that chains to the trust bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentity {
    pub trust_domain: String,
    /// Absolute namespace path.
    pub namespace: String,
    pub name: String,
    /// Sorted, deduplicated `key=value` tags from the tags extension.
    pub tags: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

fn time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

impl WorkloadIdentity {
    /// Parses a DER certificate: exactly one URI SAN holding a SPIFFE ID, the tags
    /// extension if present (absent means no tags), and the validity period. It checks
    /// neither the signature nor the dates: use it on certificates a verifier accepted.
    pub fn from_cert(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let tags_oid = tags::oid_der();
        let mut uris = Vec::new();
        let mut tag_list = Vec::new();
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    uris.extend(san.general_names.iter().filter_map(|n| match n {
                        GeneralName::URI(u) => Some(*u),
                        _ => None,
                    }))
                }
                _ if ext.oid.as_bytes() == tags_oid.as_slice() => {
                    if ext.critical {
                        return Err(IdentityError::MalformedTags("marked critical"));
                    }
                    tag_list = tags::decode(ext.value)?;
                }
                _ => {}
            }
        }
        let id: SpiffeId = match uris.as_slice() {
            [] => return Err(IdentityError::NoSpiffeId),
            [one] => one.parse()?,
            many => return Err(IdentityError::MultipleSpiffeIds(many.len())),
        };
        Ok(WorkloadIdentity {
            trust_domain: id.trust_domain,
            namespace: id.namespace,
            name: id.name,
            tags: tag_list,
            not_before: time(cert.validity().not_before),
            not_after: time(cert.validity().not_after),
        })
    }

    pub fn spiffe_id(&self) -> SpiffeId {
        SpiffeId {
            trust_domain: self.trust_domain.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// Checks the validity period against `now` (resumed TLS sessions skip certificate
    /// verification, so callers check this on every connection).
    pub fn check_validity(&self, now: SystemTime) -> Result<(), IdentityError> {
        if now < self.not_before {
            return Err(IdentityError::NotYetValid(self.not_before));
        }
        if now > self.not_after {
            return Err(IdentityError::Expired(self.not_after));
        }
        Ok(())
    }

    /// When to renew: at `fraction` of the certificate's life (2/3 by default).
    pub fn renew_at(&self, fraction: f64) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life.mul_f64(fraction.clamp(0.0, 1.0))
    }
}

/// What `segmeshctl ca inspect` shows of any certificate.
#[derive(Debug, Clone)]
pub struct Summary {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub is_ca: bool,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// For a workload certificate: its identity, or why it is not one.
    pub workload: Result<WorkloadIdentity, String>,
}

/// Describes a certificate without verifying it.
pub fn summarize(der: &[u8]) -> Result<Summary, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    Ok(Summary {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        is_ca: cert.is_ca(),
        not_before: time(cert.validity().not_before),
        not_after: time(cert.validity().not_after),
        workload: WorkloadIdentity::from_cert(der).map_err(|e| e.to_string()),
    })
}
