//! What the identity benches share: a workload certificate from a bench CA. The
//! enforcer's TLS bench (`proxy/benches/tls_bulk.rs`) includes this file too.

use std::time::Duration;

use segmesh_identity::Issued;
use segmesh_identity::{Ca, KeyAlgorithm, Sessions, SpiffeId, TlsConfigs, WorkloadKey};

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

/// The TLS configurations of `name`'s identity (as an enforcer builds them), with the
/// default cryptography provider.
#[allow(dead_code)] // not every bench uses it
pub fn configs(ca: &Ca, name: &str, alg: KeyAlgorithm) -> TlsConfigs {
    let (key, issued) = issue(ca, name, alg);
    TlsConfigs::from_pem(
        &issued.chain_pem,
        &key.pem(),
        &issued.bundle_pem,
        TD,
        &Sessions::new().unwrap(),
    )
    .unwrap()
}
