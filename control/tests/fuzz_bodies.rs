//! Fuzz target: what the console accepts from the network — registration, flow report
//! and admission review JSON bodies, and the manifests `segmeshctl inject` reads — fed
//! to the console's own handlers. Nothing may panic.

use segmesh_control::console::{Console, Registration};
use segmesh_control::store::{RedbStore, Role};
use segmesh_identity::{Ca, KeyAlgorithm, WorkloadKey};
use segmesh_policy::NamespacePath;

#[test]
fn fuzz_console_bodies() {
    let dir = std::env::temp_dir().join(format!("segmesh-fuzz-bodies-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let console = Console::new(RedbStore::open(&dir).unwrap());
    let admin = console
        .create_token(None, "admin", Role::Editor, &NamespacePath::root())
        .unwrap();
    let admin = console.authenticate(&admin).unwrap();
    let boot = console
        .create_bootstrap_token(&admin, "b", &"/acme".parse().unwrap(), &["app=*".into()])
        .unwrap();
    let ca = Ca::new_root("segmesh.local", KeyAlgorithm::EcdsaP256).unwrap();
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let registration = serde_json::json!({
        "name": "web", "namespace": "/acme/shop", "tags": ["app=web", "env=prod"],
        "ips": ["10.0.0.7", "fd00::7"], "csr": key.csr_pem("web").unwrap(), "renew": false,
    })
    .to_string();
    let flows = serde_json::json!([{
        "time": "2026-11-30T00:00:00.000Z", "direction": "outgoing",
        "source": {"ip": "10.0.0.7", "port": 40000, "pu": "/acme/shop:web"},
        "destination": {"ip": "10.0.0.8", "port": 8080, "pu": "/acme/shop:api", "service": "/acme/shop:api"},
        "verdict": "allow", "reason": "policy", "policies": ["/acme/shop:web-to-api"], "encrypt": true,
        "bytes_sent": 1, "bytes_received": 2, "duration_ms": 3, "close_reason": "closed",
        "protocol": "udp", "datagrams_sent": 1, "datagrams_received": 1
    }])
    .to_string();
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "namespace": "shop",
            "operation": "CREATE", "object": {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "i", "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/r", "port": "http"}}}]}}}
    })
    .to_string();
    let manifests = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/kubernetes/shop.yaml"
    ))
    .unwrap();
    let seeds: Vec<&[u8]> = vec![
        registration.as_bytes(),
        flows.as_bytes(),
        review.as_bytes(),
        &manifests,
    ];
    let dict: &[&[u8]] = &[
        b"null",
        b"true",
        b"[]",
        b"{}",
        b"\"\"",
        b"-1",
        b"1e999",
        b"\"::ffff:10.0.0.7\"",
        b"\"$identity=processingunit\"",
        b"\\u0000",
        b"---\n",
        b"kind: List\n",
    ];
    let opts = segmesh_control::inject::Options::default();
    segmesh_testkit::fuzz::run("console-bodies", &seeds, dict, |input| {
        if let Ok(r) = serde_json::from_slice::<Registration>(input) {
            let _ = console.register(&boot, &ca, &r);
        }
        if let Ok(records) = serde_json::from_slice::<Vec<segmesh_api::FlowRecord>>(input) {
            let _ = console.store_flows("/acme/shop:web", records);
        }
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(input) {
            let _ = segmesh_control::inject::review(&v, &opts);
        }
        if let Ok(text) = std::str::from_utf8(input) {
            let _ = segmesh_control::inject::inject_stream(text, &opts);
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
