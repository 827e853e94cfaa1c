//! The in-process tier: enforcers started in this process on loopback addresses
//! (127.0.0.x, every listener on its enforcer's address), no root, no network
//! namespaces, no capture rules. What capture would do is done by hand: the test accepts
//! the application's connection and hands it to the enforcer with its original
//! destination ([`Enforcer::proxy_outbound`]). Tested here: the tunnel protocol at both
//! ends, impersonation, one multiplexed connection for every flow, tickets, reloads, the re-decision of open flows, graceful
//! shutdown, and the flow records' shape. Authenticated-only flows here have a
//! connection of their own from their first byte (`move_after: 0`: tickets, books, the
//! kernel relay); flows that start in their stream and move are tested in
//! `netns_tunnel.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use segmesh_identity::spiffe::SpiffeId;
use segmesh_identity::{Ca, KeyAlgorithm, WorkloadKey};
use segmesh_proxy::config::ConfigSource;
use segmesh_proxy::enforcer::{Enforcer, Listener};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(10);

/// Polls `f` until it holds, for at most `LIMIT`.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A scratch folder with a CA, policies, and an enforcer configuration per PU.
struct Lab {
    dir: PathBuf,
    ca: Ca,
    /// The tunnel port every enforcer of the lab listens on (each on its own address).
    tunnel: u16,
    /// `(name, address)` of every PU, the registry of every enforcer.
    pus: Vec<(&'static str, &'static str)>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    fn new(tag: &str, pus: &[(&'static str, &'static str)]) -> Lab {
        let dir = std::env::temp_dir().join(format!("segmesh-direct-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A port free on every address of the lab, below the ephemeral range (a port the
        // kernel handed out and freed again could go to the next client socket before
        // the enforcers bind it: the tests open hundreds of connections at once), and
        // distinct for each lab of this process.
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let tunnel = loop {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let port = 20_000 + (std::process::id() % 64) as u16 * 128 + n % 128;
            if pus
                .iter()
                .all(|(_, a)| std::net::TcpListener::bind((*a, port)).is_ok())
            {
                break port;
            }
            assert!(n < 1024, "no free tunnel port for the lab");
        };
        Lab {
            dir,
            ca: Ca::new_root("segmesh.local", KeyAlgorithm::EcdsaP256).unwrap(),
            tunnel,
            pus: pus.to_vec(),
        }
    }

    fn policies(&self, text: &str) {
        let path = self.dir.join("policies.yaml");
        let tmp = self.dir.join(".policies.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// Starts `name`'s enforcer at its address; its certificate names `cert_name` (the
    /// PU itself, unless the test impersonates).
    async fn enforcer(&self, name: &str, cert_name: &str, tags: &[&str]) -> Enforcer {
        self.enforcer_with(name, cert_name, tags, "").await
    }

    /// [`enforcer`](Self::enforcer) with more `limits` (YAML map entries).
    async fn enforcer_with(
        &self,
        name: &str,
        cert_name: &str,
        tags: &[&str],
        limits: &str,
    ) -> Enforcer {
        let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let id = SpiffeId::new("segmesh.local", "/acme/shop", cert_name).unwrap();
        let tag_list: Vec<String> = tags.iter().map(|s| s.to_string()).collect();
        let issued = self
            .ca
            .issue(
                &key.csr_pem(cert_name).unwrap(),
                &id,
                &tag_list,
                Duration::from_secs(3600),
            )
            .unwrap();
        segmesh_identity::ca::save_issued(&self.dir.join(name), &issued, &key).unwrap();
        let addr = self.pus.iter().find(|(n, _)| *n == name).unwrap().1;
        let registry: String = self
            .pus
            .iter()
            .map(|(n, a)| format!("  - {{name: {n}, namespace: /acme/shop, ips: [{a}]}}\n"))
            .collect();
        let cfg = format!(
            "pu: {{name: {cert_name}, namespace: /acme/shop, tags: [{tags}]}}\n\
             identity: {{cert: {name}.crt, key: {name}.key, bundle: {name}.bundle.crt}}\n\
             registry:\n{registry}\
             policies: [policies.yaml]\n\
             flow_log: {name}.jsonl\n\
             listeners: {{outbound: 0, inbound: 0, admin: 0, tunnel: {tunnel}, address: {addr}}}\n\
             limits: {{handshake_timeout: 2s{limits}}}\n\
             move_after: 0\n",
            tags = tags.join(", "),
            tunnel = self.tunnel,
        );
        let path = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&path, cfg).unwrap();
        let e = Enforcer::start(ConfigSource::File(path)).await.unwrap();
        assert!(e.shared.is_ready(), "{name} is ready");
        e
    }

    fn records(&self, name: &str) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join(format!("{name}.jsonl")))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for a record of `name`'s enforcer that satisfies `f`.
    async fn record(&self, name: &str, f: impl Fn(&Value) -> bool) -> Value {
        let mut found = None;
        eventually(&format!("a record of {name}"), || {
            found = self.records(name).into_iter().find(&f);
            found.is_some()
        })
        .await;
        found.unwrap()
    }
}

/// A workload server on `addr` that echoes each connection until EOF, then closes.
async fn echo_server(addr: &str) -> SocketAddr {
    let l = TcpListener::bind((addr, 0)).await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    a
}

/// The application's connection as capture would hand it over: the test connects to a
/// listener of its own, the enforcer serves the accepted end with `target` as the
/// original destination. Returns the application's end.
async fn app_connect(e: &Arc<Enforcer>, from: &str, target: SocketAddr) -> TcpStream {
    let l = TcpListener::bind((from, 0)).await.unwrap();
    let app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (captured, _) = l.accept().await.unwrap();
    let e = e.clone();
    tokio::spawn(async move { e.proxy_outbound(captured, target).await });
    app
}

/// Sends `msg`, half-closes, and reads to EOF: what came back, or the error.
async fn exchange(mut s: TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(LIMIT, async {
        s.write_all(msg).await?;
        s.shutdown().await?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await?;
        Ok(back)
    })
    .await
    .expect("bounded")
}

fn policies(enc: u16, plain: u16, out_only: u16) -> String {
    format!(
        "kind: NetworkPolicy\nname: web-to-api\nnamespace: /acme/shop\naction: Allow\n\
         mode: Bidirectional\nsubject: [[app=web]]\nobject: [[app=api]]\nports: [tcp/{enc}]\nlog: true\n\
         ---\n\
         kind: NetworkPolicy\nname: web-to-api-plain\nnamespace: /acme/shop\naction: Allow\n\
         mode: Bidirectional\nsubject: [[app=web]]\nobject: [[app=api]]\nports: [tcp/{plain}]\n\
         encrypt: false\nlog: true\n\
         ---\n\
         kind: NetworkPolicy\nname: web-out-only\nnamespace: /acme/shop\naction: Allow\n\
         mode: Outgoing\nsubject: [[app=web]]\nobject: [[app=api]]\nports: [tcp/{out_only}]\n"
    )
}

const WEB: (&str, &str) = ("web", "127.0.0.2");
const API: (&str, &str) = ("api", "127.0.0.3");

/// Two enforcers, web → api, and api's workload servers: encrypted, authenticated-only,
/// and one port only web's enforcer allows.
struct Pair {
    lab: Lab,
    web: Arc<Enforcer>,
    api: Arc<Enforcer>,
    enc: SocketAddr,
    plain: SocketAddr,
    out_only: SocketAddr,
}

async fn pair(tag: &str) -> Pair {
    let lab = Lab::new(tag, &[WEB, API]);
    let (enc, plain, out_only) = (
        echo_server(API.1).await,
        echo_server(API.1).await,
        echo_server(API.1).await,
    );
    lab.policies(&policies(enc.port(), plain.port(), out_only.port()));
    let web = Arc::new(lab.enforcer("web", "web", &["app=web"]).await);
    let api = Arc::new(lab.enforcer("api", "api", &["app=api"]).await);
    Pair {
        lab,
        web,
        api,
        enc,
        plain,
        out_only,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_carries_encrypted_and_spliced_flows_and_records_both_ends() {
    let p = pair("modes").await;
    for (target, path) in [(p.enc, "tls"), (p.plain, "plain")] {
        let app = app_connect(&p.web, WEB.1, target).await;
        let msg = vec![7u8; 300_000];
        assert_eq!(exchange(app, &msg).await.unwrap(), msg, "{path}");
        let port = target.port();
        let client = p
            .lab
            .record("web", |r| r["destination"]["port"] == port)
            .await;
        let server = p
            .lab
            .record("api", |r| r["destination"]["port"] == port)
            .await;
        for (r, end) in [(&client, "client"), (&server, "server")] {
            assert_eq!(r["verdict"], "allow", "{end} {path}: {r}");
            assert_eq!(r["reason"], "policy", "{end} {path}: {r}");
            if path == "tls" {
                assert_eq!(r["data_path"], path, "{end}: {r}");
            } else {
                let e = if end == "client" { &p.web } else { &p.api };
                assert!(
                    plain_paths(e).contains(&r["data_path"].as_str().unwrap()),
                    "{end}: {r}"
                );
            }
            assert_eq!(r["encrypt"], path == "tls", "{end}: {r}");
            assert_eq!(r["bytes_sent"], 300_000, "{end}: {r}");
            assert_eq!(r["bytes_received"], 300_000, "{end}: {r}");
            assert_eq!(r["close_reason"], "closed", "{end}: {r}");
            assert_eq!(r["source"]["pu"], "/acme/shop:web", "{end}: {r}");
            assert_eq!(r["destination"]["pu"], "/acme/shop:api", "{end}: {r}");
        }
        assert_eq!(
            client["peer_identity"],
            "spiffe://segmesh.local/ns/acme/shop/pu/api"
        );
        assert_eq!(client["peer_reason"], "accepted");
        assert_eq!(
            server["peer_identity"],
            "spiffe://segmesh.local/ns/acme/shop/pu/web"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_end_decides_and_says_who_refused() {
    let p = pair("ends").await;
    // Allowed as outgoing at web, but api's enforcer has no incoming allow.
    let app = app_connect(&p.web, WEB.1, p.out_only).await;
    let err = exchange(app, b"x").await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    let port = p.out_only.port();
    let client = p
        .lab
        .record("web", |r| r["destination"]["port"] == port)
        .await;
    assert_eq!(client["verdict"], "reject");
    assert_eq!(client["rejected_by"], "server");
    assert_eq!(client["peer_reason"], "default");
    let server = p
        .lab
        .record("api", |r| r["destination"]["port"] == port)
        .await;
    assert_eq!(server["reason"], "default");
    assert_eq!(server["rejected_by"], "server");

    // Nothing allows port 9 at web: refused before any request reaches api.
    let nowhere = SocketAddr::new(API.1.parse().unwrap(), 9);
    let app = app_connect(&p.web, WEB.1, nowhere).await;
    assert!(exchange(app, b"x").await.is_err());
    let client = p.lab.record("web", |r| r["destination"]["port"] == 9).await;
    assert_eq!(client["rejected_by"], "client");
    assert_eq!(client["reason"], "default");
    assert!(
        p.lab
            .records("api")
            .iter()
            .all(|r| r["destination"]["port"] != 9)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_certificate_at_another_pus_address_is_an_impersonation() {
    // The registry says api lives at 127.0.0.3, but db answers there with its own
    // (valid) certificate.
    let lab = Lab::new("imp", &[WEB, API]);
    let target = echo_server(API.1).await;
    lab.policies(&policies(target.port(), 1, 2));
    let web = Arc::new(lab.enforcer("web", "web", &["app=web"]).await);
    let _db = lab.enforcer("api", "db", &["app=api"]).await;
    let app = app_connect(&web, WEB.1, target).await;
    assert!(exchange(app, b"x").await.is_err());
    let r = lab.record("web", |r| r["reason"] == "impersonation").await;
    assert_eq!(r["rejected_by"], "client");
    assert_eq!(
        r["peer_identity"],
        "spiffe://segmesh.local/ns/acme/shop/pu/db"
    );
}

fn metric(e: &Enforcer, name: &str) -> f64 {
    e.shared
        .metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Tickets redeemed at `e`, per flow (asked on a stream) or from a book.
fn tickets_redeemed(e: &Enforcer) -> f64 {
    ["redeemed", "book-redeemed"]
        .iter()
        .map(|r| {
            metric(
                e,
                &format!("segmesh_tunnel_tickets_total{{result=\"{r}\"}}"),
            )
        })
        .sum()
}

/// Every flow between two enforcers, encrypted or not, takes the one connection made
/// for the first: one TLS handshake at each end, whatever the number of flows; the
/// authenticated-only ones each redeem one ticket (per flow, or from a book).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_every_flow() {
    let p = pair("mux").await;
    for i in 0..6 {
        let target = if i % 2 == 0 { p.enc } else { p.plain };
        let app = app_connect(&p.web, WEB.1, target).await;
        let msg = format!("flow {i}");
        assert_eq!(exchange(app, msg.as_bytes()).await.unwrap(), msg.as_bytes());
    }
    let full = "segmesh_tunnel_handshakes_total{role=\"Client\",result=\"ok\"}";
    assert_eq!(metric(&p.web, full), 1.0);
    let served = "segmesh_tunnel_handshakes_total{role=\"Server\",result=\"ok\"}";
    assert_eq!(metric(&p.api, served), 1.0);
    let reused = "segmesh_tunnel_connections_total{result=\"reused\"}";
    assert_eq!(metric(&p.web, reused), 5.0);
    // The first asks on a stream and gets a ticket for it (and web's enforcer a book);
    // the others take tickets from the book unless it has not come yet.
    assert_eq!(tickets_redeemed(&p.api), 3.0);
    // Each flow is recorded once at each end.
    eventually("six records at each end", || {
        p.lab.records("web").len() == 6 && p.lab.records("api").len() == 6
    })
    .await;
    let spliced = p.lab.records("api");
    let spliced: Vec<&Value> = spliced
        .iter()
        .filter(|r| r["destination"]["port"] == p.plain.port())
        .collect();
    assert_eq!(spliced.len(), 3);
    for r in spliced {
        let path = r["data_path"].as_str().unwrap();
        assert!(plain_paths(&p.api).contains(&path), "{r}");
        assert_eq!(r["source"]["ip"], WEB.1, "{r}");
    }
}

/// Many authenticated-only flows set up at once from one peer (each opens a data
/// connection to the tunnel port) all pass: a peer enforcer's address is not held to the
/// small share of undecided connections an unknown address gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_authenticated_only_flows_at_once_all_pass() {
    let lab = Lab::new("burst", &[WEB, API]);
    let plain = echo_server(API.1).await;
    lab.policies(&policies(1, plain.port(), 2));
    // One handshake in flight per unknown address: a peer enforcer still gets 64
    // undecided connections.
    let tight = ", max_handshakes_per_source: 1";
    let web = Arc::new(lab.enforcer_with("web", "web", &["app=web"], tight).await);
    let api = lab.enforcer_with("api", "api", &["app=api"], tight).await;
    let mut flows = Vec::new();
    for i in 0..200 {
        let app = app_connect(&web, WEB.1, plain).await;
        flows.push(tokio::spawn(async move {
            let msg = format!("flow {i}");
            exchange(app, msg.as_bytes())
                .await
                .map(|b| b == msg.as_bytes())
        }));
    }
    for f in flows {
        assert!(f.await.unwrap().unwrap(), "echoed");
    }
    assert_eq!(tickets_redeemed(&api), 200.0);
}

/// Flows that share a connection do not hold each other up: one whose application
/// never reads (its stream's window fills) leaves another free to move megabytes; a
/// reset of one ends only that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_on_one_connection_are_isolated() {
    let lab = Lab::new("isolated", &[WEB, API]);
    let enc = echo_server(API.1).await;
    // A server that accepts and never reads.
    let stuck_server = TcpListener::bind((API.1, 0)).await.unwrap();
    let stuck_addr = stuck_server.local_addr().unwrap();
    lab.policies(
        &policies(enc.port(), stuck_addr.port(), 1).replace("encrypt: false", "encrypt: true"),
    );
    let web = Arc::new(lab.enforcer("web", "web", &["app=web"]).await);
    let _api = lab.enforcer("api", "api", &["app=api"]).await;
    let held = tokio::spawn(async move {
        let (s, _) = stuck_server.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    let mut stuck = app_connect(&web, WEB.1, stuck_addr).await;
    // Fill the stuck flow: writes stop completing once every buffer on its path is full.
    let chunk = vec![1u8; 64 << 10];
    let mut pushed = 0usize;
    while let Ok(Ok(())) =
        tokio::time::timeout(Duration::from_millis(500), stuck.write_all(&chunk)).await
    {
        pushed += chunk.len();
        assert!(pushed < 256 << 20, "the stuck flow never filled");
    }
    // Meanwhile another flow on the same connection moves 8 MiB both ways.
    let app = app_connect(&web, WEB.1, enc).await;
    let (mut rd, mut wr) = app.into_split();
    let writer = tokio::spawn(async move {
        let msg = vec![9u8; 8 << 20];
        wr.write_all(&msg).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(LIMIT, rd.read_to_end(&mut echoed))
        .await
        .expect("the free flow is not held up")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), 8 << 20);
    // Resetting the stuck flow ends it alone; the connection carries the next flow.
    app_reset(stuck);
    let app = app_connect(&web, WEB.1, enc).await;
    assert_eq!(exchange(app, b"after").await.unwrap(), b"after");
    let full = "segmesh_tunnel_handshakes_total{role=\"Client\",result=\"ok\"}";
    assert_eq!(metric(&web, full), 1.0, "all on one connection");
    held.abort();
}

/// An RST from the application: SO_LINGER 0, then close.
fn app_reset(s: TcpStream) {
    let s = s.into_std().unwrap();
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_rejects_closes_open_flows_and_new_ones() {
    let p = pair("reload").await;
    let mut app = app_connect(&p.web, WEB.1, p.plain).await;
    app.write_all(b"hello").await.unwrap();
    let mut b = [0u8; 5];
    app.read_exact(&mut b).await.unwrap();
    // Only the encrypted port stays allowed.
    p.lab.policies(&policies(p.enc.port(), 1, 2));
    let closed = tokio::time::timeout(LIMIT, app.read(&mut b))
        .await
        .expect("closed within the limit");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    // Both enforcers re-decide; the first to close makes the other see a reset or an
    // end, so at least one end says `policy`, and both record the flow's end.
    let port = p.plain.port();
    let ended = |r: &Value| r["destination"]["port"] == port;
    let web_end = p.lab.record("web", ended).await;
    let api_end = p.lab.record("api", ended).await;
    let by_policy: Vec<&Value> = [&web_end, &api_end]
        .into_iter()
        .filter(|r| r["close_reason"] == "policy")
        .collect();
    assert!(!by_policy.is_empty(), "web: {web_end}\napi: {api_end}");
    for r in by_policy {
        assert_eq!(r["closed_by"], serde_json::json!(["default"]), "{r}");
        assert_eq!(r["bytes_sent"], 5, "{r}");
    }
    let app = app_connect(&p.web, WEB.1, p.plain).await;
    assert!(exchange(app, b"x").await.is_err(), "new flows are refused");
    let app = app_connect(&p.web, WEB.1, p.enc).await;
    assert_eq!(exchange(app, b"ok").await.unwrap(), b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_closes_and_records() {
    let p = pair("drain").await;
    // One flow that ends during the drain, one that never ends by itself.
    let mut finishing = app_connect(&p.web, WEB.1, p.enc).await;
    let mut lingering = app_connect(&p.web, WEB.1, p.plain).await;
    for s in [&mut finishing, &mut lingering] {
        s.write_all(b"hi").await.unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.unwrap();
    }
    let Pair { lab, web, api, .. } = p;
    let tunnel = web.address(Listener::Tunnel).unwrap();
    let started = Instant::now();
    let draining = web.clone();
    let shutdown = tokio::spawn(async move { draining.shutdown(Duration::from_millis(800)).await });
    // New connections are refused at once.
    eventually("the listeners close", || {
        std::net::TcpStream::connect(tunnel).is_err()
    })
    .await;
    finishing.shutdown().await.unwrap();
    let mut rest = Vec::new();
    finishing.read_to_end(&mut rest).await.unwrap();
    tokio::time::timeout(LIMIT, shutdown)
        .await
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "waited for the drain"
    );
    let records = lab.records("web");
    let by_port = |port: u16| {
        records
            .iter()
            .find(|r| r["destination"]["port"] == port)
            .cloned()
            .unwrap_or_default()
    };
    let done = by_port(p_port(&records, "tls"));
    assert_eq!(done["close_reason"], "closed", "{done}");
    let cut = by_port(p_port(&records, plain_path(&web)));
    assert_eq!(cut["close_reason"], "shutdown", "{cut}");
    assert_eq!(cut["bytes_sent"], 2, "{cut}");
    let mut b = [0u8; 1];
    let end = tokio::time::timeout(LIMIT, lingering.read(&mut b))
        .await
        .unwrap();
    assert!(
        matches!(end, Ok(0) | Err(_)),
        "the lingering flow was closed"
    );
    drop(api);
}

/// How an enforcer moves authenticated-only flows: the kernel relay where BPF sockmap
/// loaded (as root), else splice.
fn plain_path(e: &Enforcer) -> &'static str {
    if e.shared.kernel_relay() {
        "kernel"
    } else {
        "spliced"
    }
}

/// The same for a flow whose client may send its FIN before the enforcer has decided
/// (the kernel takes no socket that has had its FIN: such a flow is spliced).
fn plain_paths(e: &Enforcer) -> &'static [&'static str] {
    if e.shared.kernel_relay() {
        &["kernel", "spliced"]
    } else {
        &["spliced"]
    }
}

/// The destination port of the record whose data path is `path`.
fn p_port(records: &[Value], path: &str) -> u16 {
    records
        .iter()
        .find(|r| r["data_path"] == path)
        .and_then(|r| r["destination"]["port"].as_u64())
        .unwrap_or_else(|| panic!("no {path} record in {records:?}")) as u16
}

/// The keys and reason values of recorded flows, by kind, against the fixture that
/// holds what the enforcer wrote before its reasons were typed: the JSON is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_records_keep_their_shape() {
    let p = pair("shape").await;
    for target in [p.enc, p.plain, p.out_only] {
        let app = app_connect(&p.web, WEB.1, target).await;
        let _ = exchange(app, b"shape").await;
    }
    let nowhere = SocketAddr::new("192.0.2.1".parse().unwrap(), 443);
    let app = app_connect(&p.web, WEB.1, nowhere).await;
    let _ = exchange(app, b"x").await;
    eventually("every record", || {
        p.lab.records("web").len() == 4 && p.lab.records("api").len() == 3
    })
    .await;
    let fixture: Value = serde_json::from_str(include_str!("fixtures/flow_records.json")).unwrap();
    let shape = |r: &Value| {
        let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        serde_json::json!({
            "keys": keys,
            "reason": r["reason"],
            "close_reason": r["close_reason"],
            "verdict": r["verdict"],
        })
    };
    let kind = |end: &str, port: u16| {
        let r = p
            .lab
            .records(end)
            .into_iter()
            .find(|r| r["destination"]["port"] == port)
            .unwrap();
        shape(&r)
    };
    let got = serde_json::json!({
        "client_encrypted": kind("web", p.enc.port()),
        "server_encrypted": kind("api", p.enc.port()),
        "client_spliced": kind("web", p.plain.port()),
        "server_spliced": kind("api", p.plain.port()),
        "client_refused_by_server": kind("web", p.out_only.port()),
        "server_refusal": kind("api", p.out_only.port()),
        "external_refused": kind("web", 443),
    });
    assert_eq!(
        got,
        fixture,
        "got:\n{}",
        serde_json::to_string_pretty(&got).unwrap()
    );
}
