//! The mesh tunnel between enforcers, with the three-tier example's policies: web, api
//! and db each in their own namespace with capture rules, an enforcer and a certificate
//! from a test CA, and an outside host without an enforcer.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use segmesh_identity::{Ca, KeyAlgorithm, SpiffeId, WorkloadKey};
use segmesh_iptables_init::rules::Config as CaptureConfig;
use segmesh_testkit::{Host, Topology, netns_enabled, wait_until};
use tokio::net::TcpStream;

pub const PUS: [(&str, &str); 3] = [("web", "app=web"), ("api", "app=api"), ("db", "app=db")];
/// Packets with this mark bypass the capture rules (attack tests use it to reach a
/// peer's tunnel port directly).
pub const BYPASS_MARK: u32 = 0x7a;

pub struct Mesh {
    pub topo: Topology,
    pub dir: Scratch,
    pub ca: Ca,
}

impl Mesh {
    pub fn host(&self, name: &str) -> Host {
        self.topo.host(name).clone()
    }
    pub fn log(&self, name: &str) -> Vec<serde_json::Value> {
        flow_log(&self.dir.0.join(format!("{name}.jsonl")))
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.0.join(f)
    }
}

fn chown(p: &Path) {
    std::os::unix::fs::chown(p, Some(1337), Some(1337)).unwrap();
}

/// Issues `name`'s certificate into the scratch folder (files readable by the enforcer).
pub fn issue(ca: &Ca, dir: &Path, name: &str, tags: &[&str], ttl: Duration) {
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let id = SpiffeId::new("segmesh.local", "/acme/shop", name).unwrap();
    let tags: Vec<String> = tags.iter().map(|s| s.to_string()).collect();
    let issued = ca
        .issue(&key.csr_pem(name).unwrap(), &id, &tags, ttl)
        .unwrap();
    let out = dir.join(name);
    let files = segmesh_identity::ca::save_issued(&out, &issued, &key).unwrap();
    for f in &files {
        chown(f);
    }
}

/// Builds the mesh; `encrypt: false` turns the example's PU-to-PU allows into
/// authenticated-only ones.
pub fn mesh(tag: &str, encrypt: bool, extra_policies: &str) -> Mesh {
    let topo = Topology::new(&["web", "api", "db", "internet"]);
    let dir = Scratch::new(tag);
    let ca = Ca::new_root("segmesh.local", KeyAlgorithm::EcdsaP256).unwrap();
    let mut policies = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/three-tier/policies.yaml"
    ))
    .unwrap();
    if !encrypt {
        policies = policies
            .replace(
                "ports: [tcp/8080-8090]\n",
                "ports: [tcp/8080-8090]\nencrypt: false\n",
            )
            .replace(
                "ports: [tcp/5432]\nlog: true\n",
                "ports: [tcp/5432]\nlog: true\nencrypt: false\n",
            );
        assert_eq!(
            policies.matches("encrypt: false").count(),
            3,
            "the example changed shape"
        );
    }
    policies.push_str(extra_policies);
    std::fs::write(dir.0.join("policies.yaml"), policies).unwrap();
    let registry: String = PUS
        .iter()
        .map(|(n, _)| {
            let h = topo.host(n);
            format!(
                "  - {{name: {n}, namespace: /acme/shop, ips: [{}, \"{}\"]}}\n",
                h.ip4, h.ip6
            )
        })
        .collect();
    for (name, app) in PUS {
        issue(
            &ca,
            &dir.0,
            name,
            &[app, "env=prod"],
            Duration::from_secs(3600),
        );
        let cfg = format!(
            "pu: {{name: {name}, namespace: /acme/shop, tags: [{app}, env=prod]}}\n\
             identity: {{cert: {name}.crt, key: {name}.key, bundle: {name}.bundle.crt}}\n\
             registry:\n{registry}\
             policies: [policies.yaml]\n\
             flow_log: {name}.jsonl\n\
             limits: {{handshake_timeout: 1s}}\n"
        );
        let path = dir.0.join(format!("{name}.yaml"));
        std::fs::write(&path, cfg).unwrap();
        let h = topo.host(name).clone();
        capture_with(
            &h,
            CaptureConfig {
                proxy_mark: Some(BYPASS_MARK),
                ..CaptureConfig::default()
            },
        );
        start_enforcer(&topo, name, &path);
    }
    Mesh { topo, dir, ca }
}

/// Moves BULK bytes each way from `from` to `to:port` and checks them.
fn bulk(m: &Mesh, from: &str, to: &str, port: u16) {
    let target = SocketAddr::new(m.host(to).ip4.into(), port);
    let server = in_ns(
        &m.host(to),
        bulk_server(SocketAddr::new(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
            port,
        )),
    );
    std::thread::sleep(Duration::from_millis(100));
    let client = in_ns(&m.host(from), async move {
        let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(target))
            .await
            .unwrap()
            .unwrap();
        let (mut r, mut w) = s.into_split();
        let (sent, got) = tokio::join!(send_bulk(&mut w, 1), recv_bulk(&mut r, 2));
        sent.unwrap();
        got.unwrap()
    });
    assert_eq!(
        client.join().unwrap(),
        BULK,
        "{from} -> {to}:{port}: the client received everything"
    );
    assert_eq!(
        server.join().unwrap(),
        BULK,
        "{from} -> {to}:{port}: the server received everything"
    );
}

fn find(
    log: &[serde_json::Value],
    pred: impl Fn(&serde_json::Value) -> bool,
) -> &serde_json::Value {
    log.iter()
        .find(|r| pred(r))
        .unwrap_or_else(|| panic!("no such flow record in {log:#?}"))
}

fn three_tier(encrypt: bool) {
    let m = mesh(if encrypt { "tier-tls" } else { "tier-plain" }, encrypt, "");
    // Every allowed pair: 100 MB each way.
    bulk(&m, "web", "api", 8080);
    bulk(&m, "api", "db", 5432);
    bulk(&m, "internet", "web", 443);

    // Every rejected pair is refused, and nothing reaches the servers.
    let seen = Arc::new(AtomicUsize::new(0));
    for (host, port) in [("web", 8080), ("api", 8080), ("api", 8089), ("db", 5432)] {
        let _ = in_ns(
            &m.host(host),
            greeter(
                SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port),
                seen.clone(),
            ),
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let ip = |h: &str, p: u16| SocketAddr::new(m.host(h).ip4.into(), p);
    for (from, to) in [
        ("web", ip("db", 5432)),
        ("api", ip("web", 8080)),
        ("db", ip("api", 8080)),
        ("web", ip("api", 8089)),
        ("internet", ip("api", 8080)),
    ] {
        refused_fast(in_ns(&m.host(from), attempt(to)).join().unwrap());
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "no rejected flow reached a server"
    );
    // Allowed again, through a resumed session.
    assert_eq!(
        in_ns(&m.host("web"), attempt(ip("api", 8080)))
            .join()
            .unwrap(),
        Attempt::Greeted
    );

    // Which end rejected, and by which policy.
    wait_until("flow records", Duration::from_secs(10), || {
        m.log("api").len() >= 3 && m.log("web").len() >= 2
    });
    let web = m.log("web");
    let r = find(&web, |r| r["destination"]["pu"] == "/acme/shop:db");
    assert_eq!(
        (
            r["verdict"].as_str(),
            r["rejected_by"].as_str(),
            r["reason"].as_str()
        ),
        (Some("reject"), Some("client"), Some("default"))
    );
    assert_eq!(
        r["peer_identity"],
        "spiffe://segmesh.local/ns/acme/shop/pu/db"
    );
    let r = find(&web, |r| r["destination"]["port"] == 8089);
    assert_eq!(
        (r["rejected_by"].as_str(), r["peer_reason"].as_str()),
        (Some("server"), Some("policy"))
    );
    let api = m.log("api");
    let r = find(&api, |r| r["destination"]["port"] == 8089);
    assert_eq!(r["rejected_by"], "server");
    assert_eq!(r["policies"][0], "/acme/shop:api-debug-port-closed");
    assert_eq!(
        r["peer_identity"],
        "spiffe://segmesh.local/ns/acme/shop/pu/web"
    );
    let r = find(&api, |r| {
        r["direction"] == "outgoing" && r["destination"]["pu"] == "/acme/shop:web"
    });
    assert_eq!(
        (r["rejected_by"].as_str(), r["reason"].as_str()),
        (Some("client"), Some("default"))
    );
    let r = find(&api, |r| {
        r["direction"] == "incoming" && r["source"]["ip"] == m.host("internet").ip4.to_string()
    });
    assert_eq!(r["verdict"], "reject");
    // The data path: the api-to-db policy asks for records at both ends.
    let db = m.log("db");
    let r = find(&db, |r| {
        r["verdict"] == "allow" && r["source"]["pu"] == "/acme/shop:api"
    });
    assert_eq!(r["data_path"], if encrypt { "tls" } else { "spliced" });
    assert_eq!(r["encrypt"], encrypt);
    assert_eq!(
        (r["bytes_sent"].as_u64(), r["bytes_received"].as_u64()),
        (Some(BULK as u64), Some(BULK as u64))
    );
    assert_eq!(r["modes"][0], "Bidirectional");
    let r = find(&api, |r| {
        r["verdict"] == "allow" && r["destination"]["pu"] == "/acme/shop:db"
    });
    assert_eq!(
        r["peer_identity"],
        "spiffe://segmesh.local/ns/acme/shop/pu/db"
    );
    assert_eq!(r["data_path"], if encrypt { "tls" } else { "spliced" });

    // Resumption is used; the bytes went the way the mode says.
    let web_host = m.host("web");
    assert!(
        metric(
            &web_host,
            "segmesh_tunnel_handshakes_total{role=\"Client\",result=\"resumed\"}"
        ) >= 1.0
    );
    let db_host = m.host("db");
    if encrypt {
        assert!(metric(&db_host, "segmesh_tls_bytes_total") >= 2.0 * BULK as f64);
        assert_eq!(metric(&db_host, "segmesh_spliced_bytes_total"), 0.0);
    } else {
        assert!(metric(&db_host, "segmesh_spliced_bytes_total") >= 2.0 * BULK as f64);
        assert_eq!(metric(&db_host, "segmesh_tls_bytes_total"), 0.0);
    }
}

#[test]
fn netns_tunnel_three_tier_encrypted() {
    if netns_enabled() {
        three_tier(true);
    }
}

#[test]
fn netns_tunnel_three_tier_authenticated_only() {
    if netns_enabled() {
        three_tier(false);
    }
}
