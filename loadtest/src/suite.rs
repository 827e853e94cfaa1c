//! The full run: every scenario on one topology (a client and a server namespace),
//! baselines first (direct TCP, a plain socat relay pair mirroring the enforcer pair),
//! then the same load through both enforcers' mesh tunnel, authenticated-only
//! (spliced) and encrypted. Every loop is bounded in count and time.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use segmesh_testkit::{Host, Topology};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{in_ns, proxy_path, start_enforcer};

/// How big each scenario is.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub bulk_bytes: u64,
    pub rr_rounds: usize,
    pub connections: u32,
    pub idle: usize,
    pub fanout: Vec<usize>,
    pub fanout_rounds: usize,
    pub limit: Duration,
    pub clients: crate::clients::Sizes,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            bulk_bytes: 1 << 30,
            rr_rounds: 20_000,
            connections: 2_000,
            idle: 10_000,
            fanout: vec![100, 1_000],
            fanout_rounds: 5,
            limit: Duration::from_secs(30),
            clients: crate::clients::Sizes {
                rounds: 3,
                wrk: Duration::from_secs(5),
                redis: 100_000,
            },
        }
    }

    pub fn quick() -> Sizes {
        Sizes {
            bulk_bytes: 32 << 20,
            rr_rounds: 500,
            connections: 100,
            idle: 200,
            fanout: vec![20],
            fanout_rounds: 2,
            limit: Duration::from_secs(15),
            clients: crate::clients::Sizes {
                rounds: 1,
                wrk: Duration::from_secs(1),
                redis: 2_000,
            },
        }
    }
}

/// Port ranges: what the policies make of them.
const ENCRYPTED: u16 = 9000;
const PLAIN: u16 = 10000;
const DIRECT: u16 = 11000;
const RELAY_IN: u16 = 12000;
const RELAY_HOP: u16 = 13000;
const RELAY_OUT: u16 = 14000;
/// UDP echo servers on the `outside` host (an external network to the client's
/// enforcer: UDP between PUs is not carried yet).
const UDP_PORTS: u16 = 15500;
/// UDP echo servers on the server PU (through both enforcers' tunnel).
const UDP_MESH: u16 = 15600;
/// The real clients' direct path (HTTP, Redis): ports the capture rules leave alone, so
/// that direct runs can alternate with the enforcers' paths.
const DIRECT_HTTP: u16 = 16100;
const DIRECT_REDIS: u16 = 16101;
/// Inbound external connections (from `outside`, a host outside the mesh, to the
/// server's PU): straight to the server before capture, then through its enforcer.
const EXT_DIRECT: u16 = 17000;
const EXT_IN: u16 = 17500;

/// Answers every A query with one address (TTL 60 s) until `limit`.
async fn dns_responder(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let s = tokio::net::UdpSocket::bind(addr).await?;
    let until = tokio::time::Instant::now() + limit;
    let mut b = [0u8; 1500];
    while let Ok(Ok((n, from))) = tokio::time::timeout_at(until, s.recv_from(&mut b)).await {
        let ip = Ipv4Addr::new(192, 0, 2, 1);
        if let Some(answer) = segmesh_testkit::dns::answer(&b[..n], |_| true, ip, 60) {
            let _ = s.send_to(&answer, from).await;
        }
    }
    Ok(())
}

/// DNS queries (a distinct name each, from a new socket each, as a stub resolver does)
/// to `to`, one after another: the queries per second and each one's time.
fn dns_rate(
    topo: &Topology,
    to: SocketAddr,
    queries: usize,
    limit: Duration,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    in_ns(topo.host("client"), async move {
        let mut each = Vec::with_capacity(queries);
        let start = Instant::now();
        let mut b = [0u8; 1500];
        for i in 0..queries {
            if start.elapsed() > limit {
                break;
            }
            let q = segmesh_testkit::dns::query(i as u16, &format!("q{i}.example.test."))
                .context("a DNS query")?;
            let t = Instant::now();
            let s = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
            s.send_to(&q, to).await?;
            match tokio::time::timeout(Duration::from_secs(1), s.recv(&mut b)).await {
                Ok(Ok(n)) if !segmesh_testkit::dns::addresses(&b[..n]).is_empty() => {
                    each.push(t.elapsed())
                }
                _ => break,
            }
        }
        Ok((
            each.len() as f64 / start.elapsed().as_secs_f64().max(1e-9),
            each,
        ))
    })
    .join()
    .expect("client thread")
}

/// Echoes every datagram back to its sender until `limit`.
async fn udp_echo(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let s = tokio::net::UdpSocket::bind(addr).await?;
    let until = tokio::time::Instant::now() + limit;
    let mut b = [0u8; 2048];
    while let Ok(Ok((n, from))) = tokio::time::timeout_at(until, s.recv_from(&mut b)).await {
        let _ = s.send_to(&b[..n], from).await;
    }
    Ok(())
}

/// UDP round trips of 64-byte datagrams: `rounds` on one socket (one session), after
/// 100 warm-up rounds; and `sessions` queries each from a new socket (a new session
/// each, as DNS clients do). Round-trip times of both; a lost datagram ends the run
/// (it is counted as the missing rounds).
fn udp(
    topo: &Topology,
    host: &str,
    listen: SocketAddr,
    to: SocketAddr,
    rounds: usize,
    sessions: usize,
    limit: Duration,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, f64)> {
    let _srv = in_ns(
        topo.host(host),
        udp_echo(listen, limit * 2 + Duration::from_secs(5)),
    );
    wait_udp_bound(topo.host(host), listen.port())?;
    in_ns(topo.host("client"), async move {
        let wait = Duration::from_secs(1);
        let s = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
        s.connect(to).await?;
        let msg = [0x42u8; 64];
        let mut back = [0u8; 64];
        let mut rr = Vec::with_capacity(rounds);
        let start = Instant::now();
        for i in 0..rounds + 100 {
            if start.elapsed() > limit {
                break;
            }
            let t = Instant::now();
            s.send(&msg).await?;
            if tokio::time::timeout(wait, s.recv(&mut back)).await.is_err() {
                break;
            }
            if i >= 100 {
                rr.push(t.elapsed());
            }
        }
        let mut each = Vec::with_capacity(sessions);
        let start = Instant::now();
        for _ in 0..sessions {
            if start.elapsed() > limit {
                break;
            }
            let t = Instant::now();
            let q = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
            q.send_to(&msg, to).await?;
            if tokio::time::timeout(wait, q.recv(&mut back)).await.is_err() {
                break;
            }
            each.push(t.elapsed());
        }
        let per_second = each.len() as f64 / start.elapsed().as_secs_f64().max(1e-9);
        Ok((rr, each, per_second))
    })
    .join()
    .expect("client thread")
}

/// Receives `streams` connections until each ends; returns Gbit/s over the whole
/// transfer (first byte to last EOF).
async fn sink_many(addr: SocketAddr, streams: usize, limit: Duration) -> anyhow::Result<f64> {
    let l = TcpListener::bind(addr).await?;
    let deadline = tokio::time::Instant::now() + limit;
    let first = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let mut readers = Vec::new();
    for _ in 0..streams {
        let (mut s, _) = tokio::time::timeout_at(deadline, l.accept())
            .await
            .context("a bulk stream did not arrive")??;
        let first = first.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
                    .await
                    .context("receive timed out")??;
                if n == 0 {
                    return Ok::<_, anyhow::Error>(total);
                }
                first.lock().unwrap().get_or_insert_with(Instant::now);
                total += n as u64;
            }
        }));
    }
    let mut total = 0;
    for r in readers {
        total += r.await??;
    }
    let start = first.lock().unwrap().context("nothing arrived")?;
    Ok(total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
}

async fn source(to: SocketAddr, bytes: u64, limit: Duration) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(to).await?;
    let buf = vec![0x5au8; 1 << 20];
    let deadline = Instant::now() + limit;
    let mut sent = 0u64;
    while sent < bytes && Instant::now() < deadline {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await?;
        sent += n as u64;
    }
    s.shutdown().await?;
    Ok(())
}

/// `streams` parallel bulk streams from client to `to` (the server listens on
/// `listen`); bytes are split between the streams.
fn bulk(
    topo: &Topology,
    from: &str,
    listen: SocketAddr,
    to: SocketAddr,
    streams: usize,
    bytes: u64,
    limit: Duration,
) -> anyhow::Result<f64> {
    let rx = in_ns(
        topo.host("server"),
        sink_many(listen, streams, limit + Duration::from_secs(10)),
    );
    wait_listening(topo.host("server"), listen.port())?;
    in_ns(topo.host(from), async move {
        let per = bytes / streams as u64;
        let mut tx = Vec::new();
        for _ in 0..streams {
            tx.push(tokio::spawn(source(to, per, limit)));
        }
        for t in tx {
            t.await??;
        }
        Ok::<_, anyhow::Error>(())
    })
    .join()
    .expect("client thread")?;
    rx.join().expect("server thread")
}

/// Echoes whatever arrives, on every connection, until `limit`.
async fn echo(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).await?;
    let until = tokio::time::Instant::now() + limit;
    while let Ok(Ok((mut s, _))) = tokio::time::timeout_at(until, l.accept()).await {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
    Ok(())
}

/// Round trips of 64-byte messages over one established connection (after 100
/// warm-up rounds); the round-trip times.
fn rr(
    topo: &Topology,
    from: &str,
    listen: SocketAddr,
    to: SocketAddr,
    rounds: usize,
    limit: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let _srv = in_ns(
        topo.host("server"),
        echo(listen, limit + Duration::from_secs(5)),
    );
    wait_listening(topo.host("server"), listen.port())?;
    in_ns(topo.host(from), async move {
        let mut s = TcpStream::connect(to).await?;
        s.set_nodelay(true)?;
        let msg = [0x42u8; 64];
        let mut back = [0u8; 64];
        let mut out = Vec::with_capacity(rounds);
        let start = Instant::now();
        for i in 0..rounds + 100 {
            if start.elapsed() > limit {
                break;
            }
            let t = Instant::now();
            s.write_all(&msg).await?;
            s.read_exact(&mut back).await?;
            if i >= 100 {
                out.push(t.elapsed());
            }
        }
        Ok(out)
    })
    .join()
    .expect("client thread")
}

/// Greets connections until `limit`; holds each open until the client closes it.
async fn greeter(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).await?;
    let until = tokio::time::Instant::now() + limit;
    while let Ok(Ok((mut s, _))) = tokio::time::timeout_at(until, l.accept()).await {
        tokio::spawn(async move {
            let _ = s.write_all(b"hello\n").await;
            let mut b = [0u8; 1];
            let _ = tokio::time::timeout_at(until, s.read(&mut b)).await;
        });
    }
    Ok(())
}

/// Sequential new connections from host `from` (connect, read the greeting, close; or with
/// `client_first`, connect, send 6 bytes and read them echoed, close): per second, and
/// each one's time from connect to the server's first 6 bytes.
fn conn_rate(
    topo: &Topology,
    from: &str,
    listen: SocketAddr,
    to: SocketAddr,
    n: u32,
    limit: Duration,
    client_first: bool,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let serve = limit + Duration::from_secs(5);
    let _srv = in_ns(topo.host("server"), async move {
        if client_first {
            echo(listen, serve).await
        } else {
            greeter(listen, serve).await
        }
    });
    wait_listening(topo.host("server"), listen.port())?;
    in_ns(topo.host(from), async move {
        let start = Instant::now();
        let mut lat = Vec::with_capacity(n as usize);
        let mut b = [0u8; 6];
        while lat.len() < n as usize && start.elapsed() < limit {
            let t = Instant::now();
            let mut s = TcpStream::connect(to).await?;
            if client_first {
                s.write_all(b"hello\n").await?;
            }
            s.read_exact(&mut b).await?;
            lat.push(t.elapsed());
        }
        Ok((lat.len() as f64 / start.elapsed().as_secs_f64(), lat))
    })
    .join()
    .expect("client thread")
}

/// From `outside` (a host outside the mesh) to the server's PU: sequential new
/// connections ([`conn_rate`]), one bulk stream and 64-byte round trips, each to a port
/// of its own from `port()`; with `pids` (the server's enforcer), its CPU per unit of
/// work, and with `perf`, a profile of each (`inbound-external-*.data`).
fn from_outside(
    topo: &Topology,
    mut port: impl FnMut() -> u16,
    sizes: &Sizes,
    pids: &[(&'static str, u32)],
    perf: Option<&Path>,
) -> anyhow::Result<Value> {
    let ends = |p: u16| {
        (
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), p),
            SocketAddr::new(topo.host("server").ip4.into(), p),
        )
    };
    let limit = sizes.limit;
    let name = |scenario: &str| format!("inbound-external-{scenario}");
    let (listen, to) = ends(port());
    let ((r, lat), used) = costed(pids, perf, &name("connections"), || {
        conn_rate(topo, "outside", listen, to, sizes.connections, limit, false)
    })?;
    let per_1000_connections = used / (lat.len().max(1) as f64 / 1000.0);
    let (listen, to) = ends(port());
    let (gbps, used) = costed(pids, perf, &name("bulk1"), || {
        bulk(topo, "outside", listen, to, 1, sizes.bulk_bytes, limit)
    })?;
    let per_gb = used / (sizes.bulk_bytes as f64 / 1e9);
    let (listen, to) = ends(port());
    let (rounds, used) = costed(pids, perf, &name("rr"), || {
        rr(topo, "outside", listen, to, sizes.rr_rounds, limit)
    })?;
    // The warm-up rounds count: the enforcer did that work too.
    let per_1000_requests = used / ((rounds.len() + 100) as f64 / 1000.0);
    let mut v = json!({
        "per_second": r,
        "connect": quantiles(&lat),
        "bulk_gbps_1": gbps,
        "round_trip": quantiles(&rounds),
    });
    if !pids.is_empty() {
        v["ms_per_1000_connections"] = json!(per_1000_connections);
        v["ms_per_gb_1_stream"] = json!(per_gb);
        v["ms_per_1000_requests"] = json!(per_1000_requests);
    }
    Ok(v)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Opens `n` connections through the enforcers and holds them idle; RSS and file
/// descriptors of each enforcer before and while they are held.
fn idle(
    topo: &Topology,
    listen: SocketAddr,
    to: SocketAddr,
    n: usize,
    pids: &[(&'static str, u32)],
    limit: Duration,
) -> anyhow::Result<Value> {
    let heap = |name: &str| crate::heap_in_use(topo.host(name)).unwrap_or(0.0);
    let before: Vec<(u64, usize, f64)> = pids
        .iter()
        .map(|&(name, p)| (status_kib(p, "VmRSS:"), fds(p), heap(name)))
        .collect();
    let hold = limit * 4;
    let _srv = in_ns(
        topo.host("server"),
        greeter(listen, hold + Duration::from_secs(5)),
    );
    wait_listening(topo.host("server"), listen.port())?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let client = in_ns(topo.host("client"), async move {
        let mut held = Vec::with_capacity(n);
        let start = Instant::now();
        let mut b = [0u8; 6];
        while held.len() < n && start.elapsed() < hold {
            let opened = async {
                let mut s = TcpStream::connect(to).await?;
                s.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(s)
            };
            match opened.await {
                Ok(s) => held.push(s),
                Err(e) => {
                    let _ =
                        ready_tx.send(Err(format!("connection {} of {n}: {e}", held.len() + 1)));
                    return Ok(());
                }
            }
        }
        let _ = ready_tx.send(Ok((held.len(), start.elapsed())));
        let _ = tokio::time::timeout(hold, done_rx).await;
        drop(held);
        Ok::<_, anyhow::Error>(())
    });
    let (opened, took) = ready_rx
        .recv_timeout(hold + Duration::from_secs(10))
        .context("idle connections")?
        .map_err(|e| anyhow::anyhow!("idle connections: {e}"))?;
    // Let the enforcers settle: records, and the spliced directions give
    // their pipes back after 100 ms without bytes.
    std::thread::sleep(Duration::from_millis(1500));
    let mut per = Vec::new();
    for (i, &(name, pid)) in pids.iter().enumerate() {
        let (rss, fd, heap_held) = (status_kib(pid, "VmRSS:"), fds(pid), heap(name));
        let (rss0, fd0, heap0) = before[i];
        per.push(json!({
            "enforcer": name,
            "rss_kib_before": rss0,
            "rss_kib_held": rss,
            "rss_bytes_per_connection": (rss.saturating_sub(rss0) * 1024) as f64 / opened.max(1) as f64,
            // RSS grows only by what the allocator did not already hold: connections
            // opened after a scenario that freed as much reuse its memory. The heap in
            // use is what they take.
            "heap_bytes_per_connection": (heap_held - heap0).max(0.0) / opened.max(1) as f64,
            "fds_before": fd0,
            "fds_held": fd,
            "fds_per_connection": fd.saturating_sub(fd0) as f64 / opened.max(1) as f64,
        }));
    }
    let _ = done_tx.send(());
    client.join().expect("client thread")?;
    // The next measurement starts from the enforcers' resting state.
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids
        .iter()
        .zip(&before)
        .any(|(&(_, p), &(_, fd0, _))| fds(p) > fd0 + 16)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    if opened < n {
        bail!("only {opened} of {n} idle connections opened in {took:?}");
    }
    Ok(json!({ "connections": opened, "open_seconds": took.as_secs_f64(), "enforcers": per }))
}

pub fn quantiles(v: &[Duration]) -> Value {
    let mut v = v.to_vec();
    v.sort();
    let q = |q: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6
        }
    };
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().map(|d| d.as_secs_f64()).sum::<f64>() / v.len() as f64 * 1e6
    };
    json!({ "samples": v.len(), "p50_us": q(0.5), "p99_us": q(0.99), "p999_us": q(0.999), "mean_us": mean })
}

/// socat, installed when asked.
fn relay_available(install: bool) -> bool {
    let have = || {
        std::process::Command::new("socat")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have() && install {
        let _ = std::process::Command::new("apt-get")
            .args(["install", "-y", "socat"])
            .status();
    }
    have()
}

/// A socat relay pair mirroring the enforcer pair: client-side on loopback, across the
/// veth to the server side, then to the server on loopback.
fn start_relays(topo: &Topology, port_in: u16, hop: u16, out: u16) {
    let server = topo.host("server");
    let mut c = topo.host("client").command("socat");
    c.args([
        &format!("TCP-LISTEN:{port_in},bind=127.0.0.1,fork,reuseaddr,nodelay"),
        &format!("TCP:{}:{hop},nodelay", server.ip4),
    ]);
    topo.spawn(c);
    let mut s = server.command("socat");
    s.args([
        &format!("TCP-LISTEN:{hop},fork,reuseaddr,nodelay"),
        &format!("TCP:127.0.0.1:{out},nodelay"),
    ]);
    topo.spawn(s);
}

/// Waits until something listens on TCP `port` in `h` (no probe connection goes
/// through a relay: see [`Host::bound`]).
pub(crate) fn wait_listening(h: &Host, port: u16) -> anyhow::Result<()> {
    wait_bound(h, port, false)
}

/// Waits until a UDP socket is bound to `port` in `h`.
fn wait_udp_bound(h: &Host, port: u16) -> anyhow::Result<()> {
    wait_bound(h, port, true)
}

fn wait_bound(h: &Host, port: u16, udp: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.bound(port, udp) {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} in {}", h.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Bulk (1 and 8 streams), round trips and new connections, per path.
#[derive(Default)]
struct PathFigures {
    bulk1: serde_json::Map<String, Value>,
    bulk8: serde_json::Map<String, Value>,
    latency: serde_json::Map<String, Value>,
    rate: serde_json::Map<String, Value>,
    /// New connections where the client speaks first.
    rate_first: serde_json::Map<String, Value>,
    cpu: serde_json::Map<String, Value>,
    /// Where `perf record` writes a profile of the enforcers per scenario, if asked.
    perf: Option<PathBuf>,
}

/// `perf record -g` of some processes while it lives (stopped with SIGINT when dropped,
/// and waited for, so that the file is complete).
pub(crate) struct Profile(Option<std::process::Child>);

impl Profile {
    pub(crate) fn start(dir: Option<&Path>, name: &str, pids: &[(&'static str, u32)]) -> Profile {
        let Some(dir) = dir.filter(|_| !pids.is_empty()) else {
            return Profile(None);
        };
        let pids: Vec<String> = pids.iter().map(|(_, p)| p.to_string()).collect();
        let out = dir.join(format!("{name}.data"));
        // Rust code has no frame pointers: `SEGMESH_PERF_CALL_GRAPH=dwarf` gives its
        // callers too, at a lower rate (the files are far larger).
        let graph: Vec<String> = match std::env::var("SEGMESH_PERF_CALL_GRAPH") {
            Ok(g) => ["-F", "499", "--call-graph", g.as_str()]
                .map(String::from)
                .into(),
            Err(_) => vec!["-g".into()],
        };
        let child = std::process::Command::new("perf")
            .args(["record", "-q"])
            .args(&graph)
            .arg("-o")
            .arg(&out)
            .args(["-p", &pids.join(",")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(c) => Profile(Some(c)),
            Err(e) => {
                eprintln!(
                    "perf record not started ({e}): no profile {}",
                    out.display()
                );
                Profile(None)
            }
        }
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = c.wait();
        }
    }
}

/// Runs `scenario` with the processes `pids` recorded by `perf record` as `name` (when
/// `perf` names a directory): its result and the CPU time (ms) they used meanwhile.
pub(crate) fn costed<T>(
    pids: &[(&'static str, u32)],
    perf: Option<&Path>,
    name: &str,
    scenario: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, f64)> {
    let _recording = Profile::start(perf, name, pids);
    let (r, cost) = cost_of(pids, scenario)?;
    Ok((r, cost.enforcers))
}

/// What a run cost: the enforcers' CPU and the whole machine's busy time, in ms.
#[derive(Clone, Copy)]
pub(crate) struct Cost {
    pub(crate) enforcers: f64,
    pub(crate) machine: f64,
}

/// Runs `f`, and what it cost (`pids`: the enforcers).
pub(crate) fn cost_of<T>(
    pids: &[(&'static str, u32)],
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Cost)> {
    let (c0, m0) = (cpu_ms(pids), machine_busy_ms());
    let r = f()?;
    let cost = Cost {
        enforcers: cpu_ms(pids) - c0,
        machine: machine_busy_ms() - m0,
    };
    Ok((r, cost))
}

/// The whole machine's busy CPU time so far, in ms: every process and the kernel's
/// work outside any process (softirqs, kernel workers such as the one that sends what
/// BPF sockmap redirects), all CPUs together; idle, I/O wait and time stolen by the
/// hypervisor are not busy. From the first line of `/proc/stat`.
pub(crate) fn machine_busy_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    busy_ticks(&stat) as f64 * ms_per_tick()
}

/// Milliseconds per clock tick, the unit of `/proc`'s CPU times.
fn ms_per_tick() -> f64 {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    1000.0 / tick
}

/// Busy ticks of `/proc/stat`'s `cpu` line: user, nice, system, irq and softirq (guest
/// time is already in user; idle, iowait and steal are not busy).
fn busy_ticks(stat: &str) -> u64 {
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| v.get(i).copied().unwrap_or(0))
        .sum()
}

/// CPU time (user and system, every thread) the processes `pids` used so far, in ms.
/// Far steadier on a shared machine than any rate: it is what the work cost.
pub(crate) fn cpu_ms(pids: &[(&'static str, u32)]) -> f64 {
    let ms = ms_per_tick();
    pids.iter()
        .map(|&(_, p)| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // Fields after the command name: state is the first, utime the 12th, stime
            // the 13th (proc(5): fields 14 and 15).
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| {
                fields
                    .get(i)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (ticks(11) + ticks(12)) as f64 * ms
        })
        .sum()
}

impl PathFigures {
    /// Measures one path; `endpoints` gives each scenario a fresh (server listen
    /// address, client target) pair.
    /// `pids`: the enforcers on the path, whose CPU time per unit of work is recorded
    /// (none for the baselines).
    fn path(
        &mut self,
        name: &str,
        topo: &Topology,
        sizes: &Sizes,
        pids: &[(&'static str, u32)],
        mut endpoints: impl FnMut() -> anyhow::Result<(SocketAddr, SocketAddr)>,
    ) -> anyhow::Result<()> {
        let (bytes, limit) = (sizes.bulk_bytes, sizes.limit);
        let perf = self.perf.as_deref();
        let scenario = |s: &str| format!("{name}-{s}");
        let (listen, to) = endpoints()?;
        let (gbps, used) = costed(pids, perf, &scenario("bulk1"), || {
            bulk(topo, "client", listen, to, 1, bytes, limit)
        })?;
        self.bulk1.insert(name.into(), json!(gbps));
        let per_gb = used / (bytes as f64 / 1e9);
        let (listen, to) = endpoints()?;
        self.bulk8.insert(
            name.into(),
            json!(bulk(topo, "client", listen, to, 8, bytes, limit)?),
        );
        let (listen, to) = endpoints()?;
        let (rounds, used) = costed(pids, perf, &scenario("rr"), || {
            rr(topo, "client", listen, to, sizes.rr_rounds, limit)
        })?;
        // The warm-up rounds count: the enforcers did that work too.
        let per_1000_requests = used / ((rounds.len() + 100) as f64 / 1000.0);
        self.latency.insert(name.into(), quantiles(&rounds));
        let (listen, to) = endpoints()?;
        let ((r, lat), used) = costed(pids, perf, &scenario("connections"), || {
            conn_rate(topo, "client", listen, to, sizes.connections, limit, false)
        })?;
        let per_1000_connections = used / (lat.len().max(1) as f64 / 1000.0);
        self.rate.insert(
            name.into(),
            json!({ "per_second": r, "connect": quantiles(&lat) }),
        );
        // How many of those flows had their first bytes sent before their request's
        // answer (6 bytes each, counted by the client's enforcer; not by builds without
        // the counter).
        let first_bytes = || {
            (!pids.is_empty())
                .then(|| crate::metric(topo.host("client"), "segmesh_tunnel_first_bytes_total"))
                .flatten()
        };
        let (listen, to) = endpoints()?;
        let before = first_bytes();
        let (r, lat) = conn_rate(topo, "client", listen, to, sizes.connections, limit, true)?;
        let share = before
            .zip(first_bytes())
            .map(|(b, a)| (a - b) / 6.0 / lat.len().max(1) as f64);
        self.rate_first.insert(
            name.into(),
            json!({ "per_second": r, "connect": quantiles(&lat), "first_bytes_share": share }),
        );
        if !pids.is_empty() {
            self.cpu.insert(
                name.into(),
                json!({
                    "ms_per_gb_1_stream": per_gb,
                    "ms_per_1000_requests": per_1000_requests,
                    "ms_per_1000_connections": per_1000_connections,
                }),
            );
        }
        Ok(())
    }
}

/// The paths measured, in report order.
/// The enforcers' files (configurations, keys, flow logs, nginx's), removed when the
/// run ends, however it ends.
struct RunDir(std::path::PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub const PATHS: [&str; 4] = ["direct", "relay", "authenticated-only", "encrypted"];

/// Runs everything; returns the report's figures.
pub fn run(
    sizes: &Sizes,
    proxy: Option<PathBuf>,
    control: &Path,
    install_relay: bool,
    sockmap: &str,
    perf: Option<PathBuf>,
) -> anyhow::Result<Value> {
    use segmesh_identity::{Ca, KeyAlgorithm, SpiffeId, WorkloadKey};
    let proxy = proxy_path(proxy)?;
    let topo = Topology::new(&["client", "server", "outside"]);
    let (client, server) = (topo.host("client").clone(), topo.host("server").clone());
    let any = |p: u16| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), p);
    let at_server = |p: u16| SocketAddr::new(server.ip4.into(), p);
    let local = |p: u16| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), p);
    let limit = sizes.limit;
    if let Some(dir) = &perf {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut figures = PathFigures {
        perf,
        ..Default::default()
    };
    let mut notes: Vec<String> = Vec::new();
    let mut port = 0u16;
    let mut next = || {
        port += 1;
        port
    };

    // Baselines, before any capture rule exists.
    figures.path("direct", &topo, sizes, &[], || {
        let p = DIRECT + next();
        Ok((any(p), at_server(p)))
    })?;
    let outside = topo.host("outside").ip4;
    let mut inbound = serde_json::Map::new();
    inbound.insert(
        "direct".into(),
        from_outside(&topo, || EXT_DIRECT + next(), sizes, &[], None)?,
    );
    let mut udp_figures = serde_json::Map::new();
    // UDP echo on `host` at port `p`, asked from the client.
    let udp_path = |topo: &Topology, host: &str, p: u16| -> anyhow::Result<Value> {
        let to = SocketAddr::new(topo.host(host).ip4.into(), p);
        let (rr, each, per_second) = udp(
            topo,
            host,
            any(p),
            to,
            sizes.rr_rounds,
            sizes.connections as usize,
            limit,
        )?;
        Ok(json!({
            "round_trip": quantiles(&rr),
            "rounds": rr.len(),
            "new_session": quantiles(&each),
            "sessions_per_second": per_second,
            "sessions": each.len(),
        }))
    };
    udp_figures.insert("direct".into(), udp_path(&topo, "outside", UDP_PORTS)?);
    // A DNS server on `outside` for the whole run (queries decided, forwarded and learned
    // from by the client's enforcer later).
    let dns_server = SocketAddr::new(outside.into(), 53);
    let _dns = in_ns(
        topo.host("outside"),
        dns_responder(
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 53),
            Duration::from_secs(900),
        ),
    );
    wait_udp_bound(topo.host("outside"), 53)?;
    let mut dns_figures = serde_json::Map::new();
    let dns_path = |topo: &Topology| -> anyhow::Result<Value> {
        let (per_second, each) = dns_rate(topo, dns_server, sizes.connections as usize, limit)?;
        Ok(json!({ "per_second": per_second, "query": quantiles(&each), "queries": each.len() }))
    };
    dns_figures.insert("direct".into(), dns_path(&topo)?);

    if relay_available(install_relay) {
        // Each scenario gets its own relay pair (socat forks per connection).
        figures.path("relay", &topo, sizes, &[], || {
            let i = next();
            start_relays(&topo, RELAY_IN + i, RELAY_HOP + i, RELAY_OUT + i);
            wait_listening(&client, RELAY_IN + i)?;
            wait_listening(&server, RELAY_HOP + i)?;
            Ok((any(RELAY_OUT + i), local(RELAY_IN + i)))
        })?;
    } else {
        notes.push("socat is not installed: no relay baseline (pass --install-relay)".into());
    }

    // The enforcer pair.
    let run_dir =
        RunDir(std::env::temp_dir().join(format!("segmesh-loadtest-run-{}", std::process::id())));
    let dir = &run_dir.0;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let ca = Ca::new_root("segmesh.local", KeyAlgorithm::EcdsaP256)?;
    let registry: String = ["client", "server"]
        .iter()
        .map(|n| {
            format!(
                "  - {{name: {n}, namespace: /lt, ips: [{}]}}\n",
                topo.host(n).ip4
            )
        })
        .collect();
    std::fs::write(
        dir.join("policies.yaml"),
        format!(
            "kind: NetworkPolicy\nname: encrypted\nnamespace: /lt\naction: Allow\nmode: Bidirectional\nsubject: [[app=client]]\nobject: [[app=server]]\nports: [tcp/{ENCRYPTED}-{}]\n---\n\
             kind: NetworkPolicy\nname: plain\nnamespace: /lt\naction: Allow\nmode: Bidirectional\nsubject: [[app=client]]\nobject: [[app=server]]\nports: [tcp/{PLAIN}-{}]\nencrypt: false\n---\n\
             kind: ExternalNetwork\nname: outside\nnamespace: /lt\nentries: [{outside}]\n---\n\
             kind: NetworkPolicy\nname: ext-in\nnamespace: /lt\naction: Allow\nmode: Incoming\nsubject: [[ext:name=outside]]\nobject: [[app=server]]\nports: [tcp/{EXT_IN}-{}]\n---\n\
             kind: NetworkPolicy\nname: udp-out\nnamespace: /lt\naction: Allow\nmode: Outgoing\nsubject: [[app=client]]\nobject: [[ext:name=outside]]\nports: [udp/{UDP_PORTS}-{}]\n---\n\
             kind: NetworkPolicy\nname: dns-out\nnamespace: /lt\naction: Allow\nmode: Outgoing\nsubject: [[app=client]]\nobject: [[ext:name=outside]]\nports: [udp/53]\n---\n\
             kind: NetworkPolicy\nname: udp-mesh\nnamespace: /lt\naction: Allow\nmode: Bidirectional\nsubject: [[app=client]]\nobject: [[app=server]]\nports: [udp/{UDP_MESH}-{}]\n",
            ENCRYPTED + 999,
            PLAIN + 999,
            EXT_IN + 99,
            UDP_PORTS + 99,
            UDP_MESH + 99
        ),
    )?;
    let mut pids = Vec::new();
    for name in ["client", "server"] {
        let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256)?;
        let id = SpiffeId::new("segmesh.local", "/lt", name)?;
        let issued = ca.issue(
            &key.csr_pem(name)?,
            &id,
            &[format!("app={name}")],
            Duration::from_secs(3600),
        )?;
        for f in segmesh_identity::ca::save_issued(&dir.join(name), &issued, &key)? {
            std::os::unix::fs::chown(&f, Some(1337), Some(1337))?;
        }
        let cfg = dir.join(format!("{name}.yaml"));
        let text = format!(
            "pu: {{name: {name}, namespace: /lt, tags: [app={name}]}}\nidentity: {{cert: {name}.crt, key: {name}.key, bundle: {name}.bundle.crt}}\nregistry:\n{registry}policies: [policies.yaml]\nlimits: {{max_connections: 65536, max_handshakes: 1024, udp_idle_timeout: 5s}}\nsockmap: {sockmap}\n"
        );
        std::fs::write(&cfg, &text)?;
        let host = topo.host(name).clone();
        pids.push((
            if name == "client" { "client" } else { "server" },
            start_enforcer(&topo, &host, &proxy, &cfg, &[DIRECT_HTTP, DIRECT_REDIS])?,
        ));
    }
    for (mode, base) in [("authenticated-only", PLAIN), ("encrypted", ENCRYPTED)] {
        figures.path(mode, &topo, sizes, &pids, || {
            let p = base + next();
            Ok((any(p), at_server(p)))
        })?;
    }
    // Inbound external connections through the server's enforcer alone: captured
    // (TPROXY), checked to be for one of the namespace's own addresses, decided on the
    // external network, connected to the workload.
    let server_pid: Vec<(&'static str, u32)> = pids
        .iter()
        .filter(|(n, _)| *n == "server")
        .copied()
        .collect();
    inbound.insert(
        "enforcer".into(),
        from_outside(
            &topo,
            || EXT_IN + next(),
            sizes,
            &server_pid,
            figures.perf.as_deref(),
        )?,
    );
    // Real clients, the paths alternating.
    let mut clients = Value::Null;
    let missing = crate::clients::missing();
    if missing.is_empty() {
        let paths = [
            crate::clients::Path3 {
                name: "direct",
                from: "client",
                http_port: DIRECT_HTTP,
                redis_port: DIRECT_REDIS,
                pids: Vec::new(),
            },
            crate::clients::Path3 {
                name: "authenticated-only",
                from: "client",
                http_port: PLAIN + next(),
                redis_port: PLAIN + next(),
                pids: pids.clone(),
            },
            crate::clients::Path3 {
                name: "encrypted",
                from: "client",
                http_port: ENCRYPTED + next(),
                redis_port: ENCRYPTED + next(),
                pids: pids.clone(),
            },
            // Clients outside the mesh: the server's enforcer alone (TPROXY, the
            // external decision), against direct from the client's host (the same
            // bridge, one hop to the server either way).
            crate::clients::Path3 {
                name: "inbound external",
                from: "outside",
                http_port: EXT_IN + next(),
                redis_port: EXT_IN + next(),
                pids: server_pid.clone(),
            },
        ];
        crate::clients::start_servers(&topo, dir, &paths)?;
        clients = crate::clients::measure(
            &topo,
            server.ip4,
            &paths,
            &sizes.clients,
            figures.perf.as_deref(),
        )?;
    } else {
        notes.push(format!(
            "real clients not measured: {} missing (scripts/install-deps installs them)",
            missing.join(", ")
        ));
    }
    // Each held connection costs this process two descriptors (both ends) and each
    // enforcer two, plus a pipe (two more) for a second after its greeting: stay under
    // the descriptor limit this machine allows.
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(s, _)| s);
    let idle_n = sizes.idle.min((soft.saturating_sub(2048) / 3) as usize);
    if idle_n < sizes.idle {
        notes.push(format!(
            "idle connections: {idle_n} instead of {} (the descriptor limit here is {soft} and cannot be raised: no CAP_SYS_RESOURCE)",
            sizes.idle
        ));
    }
    let mut idle_results = serde_json::Map::new();
    for (mode, base) in [("authenticated-only", PLAIN), ("encrypted", ENCRYPTED)] {
        let p = base + next();
        idle_results.insert(
            mode.into(),
            idle(&topo, any(p), at_server(p), idle_n, &pids, limit)?,
        );
    }
    // UDP through the client's enforcer (one enforcer: the server side is outside the
    // mesh), after the idle scenario: its sessions hold descriptors until they idle out.
    udp_figures.insert(
        "enforcer".into(),
        udp_path(&topo, "outside", UDP_PORTS + 1)?,
    );
    // DNS through the client's enforcer: every query a new session, decided, forwarded,
    // and its answer learned from.
    dns_figures.insert("enforcer".into(), dns_path(&topo)?);
    // Between the two PUs: both enforcers, datagrams framed inside the mesh tunnel.
    udp_figures.insert(
        "both enforcers (tunnel)".into(),
        udp_path(&topo, "server", UDP_MESH)?,
    );
    drop(topo);
    drop(run_dir);

    let mut fanout = Vec::new();
    for setup in [
        crate::fanout::Setup::Redb,
        crate::fanout::Setup::Etcd { replicas: 1 },
        crate::fanout::Setup::Etcd { replicas: 2 },
    ] {
        fanout.extend(crate::fanout::run(
            control,
            setup,
            &sizes.fanout,
            sizes.fanout_rounds,
            Duration::from_secs(30),
        )?);
    }
    let fanout: Vec<Value> = fanout
        .iter()
        .map(|r| {
            json!({
                "setup": r.setup.name(),
                "watchers": r.clients,
                "p50_ms": r.quantile(0.5).as_secs_f64() * 1e3,
                "p99_ms": r.quantile(0.99).as_secs_f64() * 1e3,
                "max_ms": r.quantile(1.0).as_secs_f64() * 1e3,
                "missed": r.missed,
                "commit_p50_ms": r.commit_p50().as_secs_f64() * 1e3,
            })
        })
        .collect();
    Ok(json!({
        "sizes": {
            "bulk_bytes": sizes.bulk_bytes,
            "rr_rounds": sizes.rr_rounds,
            "connections": sizes.connections,
            "idle": sizes.idle,
            "fanout_rounds": sizes.fanout_rounds,
        },
        "bulk_gbps": { "1": figures.bulk1, "8": figures.bulk8 },
        "latency": figures.latency,
        "connections": figures.rate,
        "connections_client_first": figures.rate_first,
        "connections_inbound_external": inbound,
        "enforcer_cpu": figures.cpu,
        "clients": clients,
        "idle": idle_results,
        "fanout": fanout,
        "udp": udp_figures,
        "dns": dns_figures,
        "notes": notes,
        "sockmap": sockmap,
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn busy_time_is_user_nice_system_irq_and_softirq() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 2 30 5000 7 1 20 9 4 0\ncpu0 50 1 15 2500 3 0 10 4 2 0\nintr 1\n";
        assert_eq!(super::busy_ticks(stat), 100 + 2 + 30 + 1 + 20);
        assert_eq!(super::busy_ticks("intr 1\n"), 0);
        // This machine's counter only grows.
        let (a, b) = (super::machine_busy_ms(), super::machine_busy_ms());
        assert!(a > 0.0 && b >= a, "{a} then {b}");
    }
}
