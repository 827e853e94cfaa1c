//! segmesh workload identity: who a workload is and which tags it carries, bound into
//! X.509 certificates that a console CA signs, and the rustls configurations that make
//! enforcers prove and check them. Knows nothing of policies: tags are strings here.
//!
//! # Layout
//! - [`spiffe`]: SPIFFE IDs `spiffe://<td>/ns/<namespace>/pu/<name>`.
//! - [`tags`]: the tags extension (private OID, DER `SEQUENCE OF UTF8String`).
//! - [`cert`]: parsing a certificate into a [`WorkloadIdentity`].
//! - [`ca`]: the CA (root, optional intermediate), keys, CSRs, issuance, files.
//! - [`verify`]: rustls verifiers (chain to the bundle, SPIFFE ID, tags).
//! - [`tls`]: client and server configurations, [`peer_identity`].
//! - [`error`]: [`IdentityError`] and [`Rejection`].

pub mod ca;
pub mod cert;
mod der;
pub mod error;
pub mod spiffe;
pub mod tags;
pub mod tls;
pub mod verify;

pub use ca::{Ca, Issued, KeyAlgorithm, LeafSpec, WorkloadKey};
pub use cert::WorkloadIdentity;
pub use error::{IdentityError, Rejection};
pub use spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId};
pub use tls::{ALPN, Sessions, TlsConfigs, peer_identity};
