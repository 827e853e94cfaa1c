//! What the identity benches share: a workload certificate from a bench CA.

use std::time::Duration;

use segmesh_identity::Issued;
use segmesh_identity::{Ca, KeyAlgorithm, SpiffeId, WorkloadKey};

pub const TD: &str = "segmesh.local";

/// A key and its certificate for `name` in `/bench`, tagged `app=bench`, for an hour.
pub fn issue(ca: &Ca, name: &str, alg: KeyAlgorithm) -> (WorkloadKey, Issued) {
    let key = WorkloadKey::generate(alg).unwrap();
    let id = SpiffeId::new(TD, "/bench", name).unwrap();
    let issued = ca
        .issue(
            &key.csr_pem(name).unwrap(),
            &id,
            &["app=bench".to_owned()],
            Duration::from_secs(3600),
        )
        .unwrap();
    (key, issued)
}
