//! The enforcer with real capture rules in network namespaces: a workload `work` (its
//! enforcer runs as uid 1337, the workload's own processes as root), an allowed
//! external host `ext` and a blocked one `bad`.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use segmesh_iptables_init::apply;
use segmesh_iptables_init::rules::{Config as CaptureConfig, Family};
use segmesh_testkit::{Host, Topology, netns_enabled, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MB: usize = 1 << 20;
const BULK: usize = 100 * MB;
const LIMIT: Duration = Duration::from_secs(60);

/// Runs a future on a current-thread runtime on a thread inside `h`'s namespace.
fn in_ns<T: Send + 'static>(
    h: &Host,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    h.thread(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
}

/// The bulk stream: 1 MiB chunks of one random block, each stamped with its index, so
/// loss, duplication, reordering and corruption are all detected.
fn chunk(seed: u64, k: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut c: Vec<u8> = (0..MB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    c[..8].copy_from_slice(&(k as u64).to_le_bytes());
    c
}

async fn send_bulk(w: &mut (impl AsyncWriteExt + Unpin), seed: u64) -> std::io::Result<()> {
    for k in 0..BULK / MB {
        w.write_all(&chunk(seed, k)).await?;
    }
    w.shutdown().await
}

/// Reads to EOF and checks every byte; returns the count.
async fn recv_bulk(r: &mut (impl AsyncReadExt + Unpin), seed: u64) -> std::io::Result<usize> {
    let mut buf = vec![0u8; MB];
    let mut k = 0;
    loop {
        let mut filled = 0;
        while filled < MB {
            let n = r.read(&mut buf[filled..]).await?;
            if n == 0 {
                assert_eq!(filled, 0, "stream ended inside a chunk");
                return Ok(k * MB);
            }
            filled += n;
        }
        assert!(buf == chunk(seed, k), "chunk {k} differs");
        k += 1;
    }
}

/// Accepts one connection and exchanges BULK bytes each way (half-close aware).
async fn bulk_server(addr: SocketAddr) -> usize {
    let l = TcpListener::bind(addr).await.unwrap();
    let (s, _) = tokio::time::timeout(LIMIT, l.accept())
        .await
        .expect("bulk connection arrives")
        .unwrap();
    let (mut r, mut w) = s.into_split();
    let (got, sent) = tokio::join!(recv_bulk(&mut r, 1), send_bulk(&mut w, 2));
    sent.unwrap();
    got.unwrap()
}

/// Greets every connection; counts them. Runs for `LIMIT`.
async fn greeter(addr: SocketAddr, seen: Arc<AtomicUsize>) {
    let l = TcpListener::bind(addr).await.unwrap();
    let until = tokio::time::Instant::now() + LIMIT;
    while let Ok(Ok((mut s, _))) = tokio::time::timeout_at(until, l.accept()).await {
        seen.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let _ = s.write_all(b"hello\n").await;
            let mut b = [0u8; 64];
            while let Ok(n) = s.read(&mut b).await {
                if n == 0 || s.write_all(&b[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

#[derive(Debug, PartialEq)]
enum Attempt {
    /// The greeting arrived: the connection reached a server.
    Greeted,
    /// Reset (after the local handshake with the capture port) or refused.
    Refused(Duration),
    Other(String),
}

async fn attempt(to: SocketAddr) -> Attempt {
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = TcpStream::connect(to).await?;
        let mut b = [0u8; 6];
        s.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(b)
    })
    .await;
    match r {
        Ok(Ok(b)) if &b == b"hello\n" => Attempt::Greeted,
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Attempt::Refused(start.elapsed())
        }
        other => Attempt::Other(format!("{other:?}")),
    }
}

fn refused_fast(a: Attempt) {
    match a {
        Attempt::Refused(t) => assert!(t < Duration::from_secs(2), "refused, but only after {t:?}"),
        other => panic!("expected an immediate RST, got {other:?}"),
    }
}

/// A scratch folder the enforcer (uid 1337) can write to.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("segmesh-enforcer-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_config(dir: &Scratch, topo: &Topology) -> PathBuf {
    write_config_with(dir, topo, "")
}

fn write_config_with(dir: &Scratch, topo: &Topology, extra: &str) -> PathBuf {
    let (ext, bad) = (topo.host("ext"), topo.host("bad"));
    let policies = format!(
        r#"
kind: ExternalNetwork
name: partner
namespace: /lab
entries: ["{e4}", "{e6}"]
---
kind: ExternalNetwork
name: blocked
namespace: /lab
entries: ["{b4}", "{b6}"]
---
kind: NetworkPolicy
name: to-partner
namespace: /lab
action: Allow
mode: Outgoing
subject: [[app=work]]
object: [[ext:name=partner]]
ports: [tcp/7000-7002]
log: true
---
kind: NetworkPolicy
name: block-bad
namespace: /lab
action: Reject
mode: Outgoing
subject: [[app=work]]
object: [[ext:name=blocked]]
log: true
---
kind: NetworkPolicy
name: partner-in
namespace: /lab
action: Allow
mode: Incoming
subject: [[ext:name=partner]]
object: [[app=work]]
ports: [tcp/8000]
log: true
"#,
        e4 = ext.ip4,
        e6 = ext.ip6,
        b4 = bad.ip4,
        b6 = bad.ip6
    );
    std::fs::write(dir.0.join("policies.yaml"), policies).unwrap();
    let cfg = format!(
        "pu: {{name: work, namespace: /lab, tags: [app=work]}}\npolicies: [policies.yaml]\nflow_log: flows.jsonl\n{extra}"
    );
    let path = dir.0.join("enforcer.yaml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// Starts the enforcer in `work` as uid 1337 with the capabilities TPROXY needs.
fn start_enforcer(topo: &Topology, config: &PathBuf) -> u32 {
    let work = topo.host("work");
    let mut cmd = work.command("setpriv");
    cmd.args([
        "--reuid=1337",
        "--regid=1337",
        "--clear-groups",
        "--inh-caps=+net_admin,+net_raw",
        "--ambient-caps=+net_admin,+net_raw",
        "--",
        env!("CARGO_BIN_EXE_segmesh-proxy"),
        "--local-config",
    ]);
    cmd.arg(config);
    let pid = topo.spawn(cmd);
    wait_until("the enforcer is ready", Duration::from_secs(20), || {
        http_get(work, "/ready").0 == 200
    });
    pid
}

/// GET on the enforcer's admin port from inside `work`.
fn http_get(work: &Host, path: &'static str) -> (u16, String) {
    in_ns(work, async move {
        let Ok(mut s) = TcpStream::connect("127.0.0.1:15020").await else {
            return (0, String::new());
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            return (0, String::new());
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, out)
    })
    .join()
    .unwrap()
}

fn metric(work: &Host, name: &str) -> f64 {
    let (_, body) = http_get(work, "/metrics");
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn flow_records(dir: &Scratch) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.0.join("flows.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("flow records are JSON lines"))
        .collect()
}

fn capture(work: &Host) {
    work.thread(|| {
        let cfg = CaptureConfig::default();
        apply::apply(&cfg, Family::V4).expect("IPv4 capture rules");
        apply::apply(&cfg, Family::V6).expect("IPv6 capture rules");
    })
    .join()
    .unwrap();
}

fn ip(h: &Host, v6: bool) -> IpAddr {
    if v6 { h.ip6.into() } else { h.ip4.into() }
}

fn scenario(v6: bool) {
    let topo = Topology::new(&["work", "ext", "bad"]);
    let (work, ext, bad) = (
        topo.host("work").clone(),
        topo.host("ext").clone(),
        topo.host("bad").clone(),
    );
    let dir = Scratch::new(if v6 { "v6" } else { "v4" });
    let config = write_config(&dir, &topo);
    capture(&work);
    start_enforcer(&topo, &config);

    // Servers: a bulk peer on ext:7000; greeters on bad:7000 and bad:7777 (reachable if
    // anything bypassed the enforcer), on ext:7003 (a port no policy lists), and the workload's own on work:8000.
    let bulk = in_ns(&ext, bulk_server(SocketAddr::new(ip(&ext, v6), 7000)));
    let bad_seen = Arc::new(AtomicUsize::new(0));
    for port in [7000, 7777] {
        let _ = in_ns(
            &bad,
            greeter(SocketAddr::new(ip(&bad, v6), port), bad_seen.clone()),
        );
    }
    let ext_seen = Arc::new(AtomicUsize::new(0));
    let _ = in_ns(
        &ext,
        greeter(SocketAddr::new(ip(&ext, v6), 7003), ext_seen.clone()),
    );
    let work_seen = Arc::new(AtomicUsize::new(0));
    let _ = in_ns(
        &work,
        greeter("[::]:8000".parse().unwrap(), work_seen.clone()),
    );
    std::thread::sleep(Duration::from_millis(200)); // listeners bound (bounded: checked below by outcomes)

    // 1. Allowed outbound: 100 MB each way, half-closed, intact.
    let to = SocketAddr::new(ip(&ext, v6), 7000);
    let client = in_ns(&work, async move {
        let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(to))
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
        "the workload received everything"
    );
    assert_eq!(
        bulk.join().unwrap(),
        BULK,
        "the external host received everything"
    );

    // 2. Rejected outbound: an immediate RST, nothing reaches `bad`, even on a port no
    //    policy lists; an allowed host on an unlisted port is refused too.
    for port in [7000, 7777] {
        let to = SocketAddr::new(ip(&bad, v6), port);
        refused_fast(in_ns(&work, attempt(to)).join().unwrap());
    }
    refused_fast(
        in_ns(&work, attempt(SocketAddr::new(ip(&ext, v6), 7003)))
            .join()
            .unwrap(),
    );
    assert_eq!(
        bad_seen.load(Ordering::SeqCst),
        0,
        "nothing bypassed the enforcer"
    );
    assert_eq!(ext_seen.load(Ordering::SeqCst), 0);

    // 3. Inbound: the partner reaches the workload's server; `bad` does not.
    let target = SocketAddr::new(ip(&work, v6), 8000);
    assert_eq!(
        in_ns(&ext, attempt(target)).join().unwrap(),
        Attempt::Greeted
    );
    assert_eq!(work_seen.load(Ordering::SeqCst), 1);
    refused_fast(in_ns(&bad, attempt(target)).join().unwrap());
    assert_eq!(
        work_seen.load(Ordering::SeqCst),
        1,
        "the rejected connection never reached the workload"
    );

    // 4. Flow records name the deciding policy.
    wait_until("flow records", Duration::from_secs(10), || {
        flow_records(&dir).len() >= 6
    });
    let records = flow_records(&dir);
    let to_bad: Vec<_> = records
        .iter()
        .filter(|r| r["destination"]["ip"] == ip(&bad, v6).to_string())
        .collect();
    assert_eq!(to_bad.len(), 2, "{records:#?}");
    for r in to_bad {
        assert_eq!(r["verdict"], "reject");
        assert_eq!(r["policies"][0], "/lab:block-bad");
        assert_eq!(r["destination"]["external"][0], "/lab:blocked");
    }
    let bulk_rec = records
        .iter()
        .find(|r| r["destination"]["port"] == 7000 && r["verdict"] == "allow")
        .expect("bulk flow record");
    assert_eq!(bulk_rec["policies"][0], "/lab:to-partner");
    assert_eq!(bulk_rec["bytes_sent"], BULK);
    assert_eq!(bulk_rec["bytes_received"], BULK);
    assert_eq!(bulk_rec["data_path"], "spliced");
    let inbound_rej = records
        .iter()
        .find(|r| r["direction"] == "incoming" && r["verdict"] == "reject")
        .expect("inbound reject record");
    assert_eq!(inbound_rej["reason"], "default");

    // 5. The spliced path carried every byte.
    let moved = records
        .iter()
        .filter(|r| r["verdict"] == "allow")
        .map(|r| r["bytes_sent"].as_u64().unwrap() + r["bytes_received"].as_u64().unwrap())
        .sum::<u64>();
    wait_until("metrics settle", Duration::from_secs(5), || {
        metric(&work, "segmesh_spliced_bytes_total") as u64 == moved
    });
    assert!(moved >= 2 * BULK as u64);
    assert_eq!(metric(&work, "segmesh_copied_bytes_total"), 0.0);
}

#[test]
fn netns_enforcer_ipv4() {
    if netns_enabled() {
        scenario(false);
    }
}

#[test]
fn netns_enforcer_ipv6() {
    if netns_enabled() {
        scenario(true);
    }
}

#[test]
fn netns_enforcer_stopped_fails_closed() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["work", "ext", "bad"]);
    let (work, ext) = (topo.host("work").clone(), topo.host("ext").clone());
    let dir = Scratch::new("stop");
    let config = write_config(&dir, &topo);
    capture(&work);
    let pid = start_enforcer(&topo, &config);
    let seen = Arc::new(AtomicUsize::new(0));
    let _ = in_ns(
        &ext,
        greeter(SocketAddr::new(ext.ip4.into(), 7000), seen.clone()),
    );
    let _ = in_ns(
        &ext,
        greeter(SocketAddr::new(ext.ip6.into(), 7000), seen.clone()),
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        in_ns(&work, attempt(SocketAddr::new(ext.ip4.into(), 7000)))
            .join()
            .unwrap(),
        Attempt::Greeted
    );
    topo.kill(pid);
    for to in [
        SocketAddr::new(ext.ip4.into(), 7000),
        SocketAddr::new(ext.ip6.into(), 7000),
    ] {
        refused_fast(in_ns(&work, attempt(to)).join().unwrap());
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "with the enforcer gone nothing goes around it"
    );
}

#[test]
fn netns_enforcer_limits_timeouts_and_registered_pus() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["work", "ext", "bad"]);
    let (work, ext) = (topo.host("work").clone(), topo.host("ext").clone());
    let dir = Scratch::new("limits");
    let extra = "registry:\n  - {name: api, namespace: /lab, ips: [10.77.0.99]}\nlimits: {max_connections: 1, connect_timeout: 500ms}\n";
    let config = write_config_with(&dir, &topo, extra);
    capture(&work);
    start_enforcer(&topo, &config);
    let seen = Arc::new(AtomicUsize::new(0));
    let _ = in_ns(
        &ext,
        greeter(SocketAddr::new(ext.ip4.into(), 7000), seen.clone()),
    );
    // Port 7002 swallows SYNs: the enforcer's connect times out.
    ext.exec_ok(&[
        "iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", "7002", "-j", "DROP",
    ]);
    std::thread::sleep(Duration::from_millis(200));

    // One connection held open uses the only permit; the next is refused at once.
    let to = SocketAddr::new(ext.ip4.into(), 7000);
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let holder = in_ns(&work, async move {
        let mut s = TcpStream::connect(to).await.unwrap();
        let mut b = [0u8; 6];
        s.read_exact(&mut b).await.unwrap();
        let _ = tokio::task::spawn_blocking(move || held_rx.recv_timeout(Duration::from_secs(30)))
            .await;
        drop(s);
    });
    wait_until("the held connection", Duration::from_secs(10), || {
        seen.load(Ordering::SeqCst) == 1
    });
    refused_fast(in_ns(&work, attempt(to)).join().unwrap());
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "the second connection never reached the server"
    );
    held_tx.send(()).unwrap();
    holder.join().unwrap();
    wait_until("the permit is back", Duration::from_secs(10), || {
        in_ns(&work, attempt(to)).join().unwrap() == Attempt::Greeted
    });

    // A destination that never answers: reset after the connect timeout (once the last
    // relayed connection has given its permit back).
    wait_until("no open connection", Duration::from_secs(10), || {
        metric(&work, "segmesh_open_connections{direction=\"Outbound\"}") == 0.0
    });
    match in_ns(&work, attempt(SocketAddr::new(ext.ip4.into(), 7002)))
        .join()
        .unwrap()
    {
        Attempt::Refused(t) => assert!(
            t >= Duration::from_millis(400) && t < Duration::from_secs(3),
            "{t:?}"
        ),
        other => panic!("expected a reset after the connect timeout, got {other:?}"),
    }

    // A registered PU is not reachable in plaintext (that is the tunnel's job).
    refused_fast(
        in_ns(&work, attempt("10.77.0.99:8080".parse().unwrap()))
            .join()
            .unwrap(),
    );

    wait_until("flow records", Duration::from_secs(10), || {
        flow_records(&dir).len() >= 3
    });
    let records = flow_records(&dir);
    let reason_of = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        records
            .iter()
            .find(|r| pred(r))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        reason_of(&|r| r["reason"] == "overload")["verdict"],
        "reject",
        "{records:#?}"
    );
    assert_eq!(
        reason_of(&|r| r["destination"]["port"] == 7002)["close_reason"],
        "connect-timeout",
        "{records:#?}"
    );
    let reg = reason_of(&|r| r["reason"] == "registered-pu");
    assert_eq!(reg["destination"]["pu"], "/lab:api", "{records:#?}");
    assert!(metric(&work, "segmesh_connection_errors_total{kind=\"Overload\"}") >= 1.0);
}
