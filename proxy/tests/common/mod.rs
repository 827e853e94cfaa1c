//! Helpers of the enforcer's network-namespace tests.
#![allow(dead_code)]

pub mod console;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use segmesh_iptables_init::apply;
use segmesh_iptables_init::rules::{Config as CaptureConfig, Family};
use segmesh_testkit::{Host, Topology, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const MB: usize = 1 << 20;
pub const BULK: usize = 100 * MB;
pub const LIMIT: Duration = Duration::from_secs(60);

/// Runs a future on a thread inside `h`'s namespace.
pub fn in_ns<T: Send + 'static>(
    h: &Host,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    h.run(f)
}

/// The bulk stream: 1 MiB chunks of one random block, each stamped with its index, so
/// loss, duplication, reordering and corruption are all detected.
pub fn chunk(seed: u64, k: usize) -> Vec<u8> {
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

pub async fn send_bulk(w: &mut (impl AsyncWriteExt + Unpin), seed: u64) -> std::io::Result<()> {
    for k in 0..BULK / MB {
        w.write_all(&chunk(seed, k)).await?;
    }
    w.shutdown().await
}

/// Reads to EOF and checks every byte; returns the count.
pub async fn recv_bulk(r: &mut (impl AsyncReadExt + Unpin), seed: u64) -> std::io::Result<usize> {
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

/// Connects and exchanges BULK bytes each way (sending, then half-closing), checking
/// what comes back; returns how many bytes arrived.
pub async fn bulk_client(to: SocketAddr) -> usize {
    let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(to))
        .await
        .unwrap()
        .unwrap();
    let (mut r, mut w) = s.into_split();
    let (sent, got) = tokio::join!(send_bulk(&mut w, 1), recv_bulk(&mut r, 2));
    sent.unwrap();
    got.unwrap()
}

/// Accepts one connection and exchanges BULK bytes each way (half-close aware).
pub async fn bulk_server(addr: SocketAddr) -> usize {
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

/// Sends back what `s` reads until it ends or fails.
pub async fn echo_back(s: &mut tokio::net::TcpStream) {
    let mut b = [0u8; 1024];
    while let Ok(n) = s.read(&mut b).await {
        if n == 0 || s.write_all(&b[..n]).await.is_err() {
            return;
        }
    }
}

/// Greets every connection; counts them. Runs for `LIMIT`.
pub async fn greeter(addr: SocketAddr, seen: Arc<AtomicUsize>) {
    let l = TcpListener::bind(addr).await.unwrap();
    let until = tokio::time::Instant::now() + LIMIT;
    while let Ok(Ok((mut s, _))) = tokio::time::timeout_at(until, l.accept()).await {
        seen.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let _ = s.write_all(b"hello\n").await;
            echo_back(&mut s).await;
        });
    }
}

/// Starts a [`greeter`] at `addr` in `h` and returns once it listens: a connection made
/// before the bind would be refused, and the enforcer would reset the client as if a
/// policy had.
pub fn greet(h: &Host, addr: SocketAddr, seen: Arc<AtomicUsize>) -> std::thread::JoinHandle<()> {
    let server = in_ns(h, greeter(addr, seen));
    wait_listening(h, addr.port());
    server
}

/// Waits until something listens on TCP `port` in `h` ([`Host::bound`]), for at most
/// 10 s.
pub fn wait_listening(h: &Host, port: u16) {
    let what = format!("a listener on port {port} in {}", h.name);
    wait_until(&what, Duration::from_secs(10), || h.bound(port, false));
}

/// Waits until `n` UDP sockets are bound to `port` in `h` (an echo server per address
/// family), for at most 10 s.
pub fn wait_udp_bound(h: &Host, port: u16, n: usize) {
    let what = format!("{n} UDP sockets on port {port} in {}", h.name);
    wait_until(&what, Duration::from_secs(10), || {
        let out = h.exec(&["ss", "-Hlun", &format!("sport = :{port}")]);
        String::from_utf8_lossy(&out.stdout).lines().count() >= n
    });
}

#[derive(Debug, PartialEq)]
pub enum Attempt {
    /// The greeting arrived: the connection reached a server.
    Greeted,
    /// Reset (after the local handshake with the capture port) or refused.
    Refused(Duration),
    Other(String),
}

pub async fn attempt(to: SocketAddr) -> Attempt {
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

pub fn refused_fast(a: Attempt) {
    match a {
        Attempt::Refused(t) => assert!(t < Duration::from_secs(2), "refused, but only after {t:?}"),
        other => panic!("expected an immediate RST, got {other:?}"),
    }
}

/// A scratch folder the enforcer (uid 1337) can write to.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
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

/// GET on the enforcer's admin port from inside `work`.
pub fn http_get(work: &Host, path: &'static str) -> (u16, String) {
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

pub fn metric(work: &Host, name: &str) -> f64 {
    let (_, body) = http_get(work, "/metrics");
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub fn flow_records(dir: &Scratch) -> Vec<serde_json::Value> {
    flow_log(&dir.0.join("flows.jsonl"))
}

pub fn capture(work: &Host) {
    work.thread(|| {
        let cfg = CaptureConfig::default();
        apply::apply(&cfg, Family::V4).expect("IPv4 capture rules");
        apply::apply(&cfg, Family::V6).expect("IPv6 capture rules");
    })
    .join()
    .unwrap();
}

pub fn ip(h: &Host, v6: bool) -> IpAddr {
    if v6 { h.ip6.into() } else { h.ip4.into() }
}

/// Starts the enforcer in `host` as uid 1337 with the capabilities TPROXY needs.
pub fn start_enforcer(topo: &Topology, host: &str, config: &PathBuf) -> u32 {
    let work = topo.host(host);
    let mut cmd = work.enforcer_command(std::path::Path::new(env!("CARGO_BIN_EXE_segmesh-proxy")));
    cmd.args(["--local-config"]);
    cmd.arg(config);
    let pid = topo.spawn(cmd);
    wait_until("the enforcer is ready", Duration::from_secs(20), || {
        http_get(work, "/ready").0 == 200
    });
    pid
}

/// The JSON lines of a flow log.
pub fn flow_log(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("flow records are JSON lines"))
        .collect()
}

/// Capture rules with options (e.g. a mark that bypasses them, for attack tests).
pub fn capture_with(h: &Host, cfg: CaptureConfig) {
    h.thread(move || {
        apply::apply(&cfg, Family::V4).expect("IPv4 capture rules");
        apply::apply(&cfg, Family::V6).expect("IPv6 capture rules");
    })
    .join()
    .unwrap();
}

/// A binary of the workspace (built by `cargo test --workspace`) next to this test's.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so every binary is built",
        p.display()
    );
    p
}

/// Echoes every datagram back to its sender; counts them. Runs for `LIMIT`.
pub async fn udp_echo(addr: SocketAddr, seen: Arc<AtomicUsize>) {
    let s = tokio::net::UdpSocket::bind(addr).await.unwrap();
    let until = tokio::time::Instant::now() + LIMIT;
    let mut b = [0u8; 2048];
    while let Ok(Ok((n, from))) = tokio::time::timeout_at(until, s.recv_from(&mut b)).await {
        seen.fetch_add(1, Ordering::SeqCst);
        let _ = s.send_to(&b[..n], from).await;
    }
}

/// Sends `msg` to `to` from a new socket; the answer and who sent it, within 2 s.
pub async fn ask(to: SocketAddr, msg: &'static [u8]) -> Option<(Vec<u8>, SocketAddr)> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let s = tokio::net::UdpSocket::bind(any).await.unwrap();
    s.send_to(msg, to).await.unwrap();
    let mut b = [0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut b))
        .await
        .ok()?
        .ok()?;
    Some((b[..n].to_vec(), from))
}

/// Writes `policies` (as `policies.yaml`) and an enforcer configuration into `dir`,
/// captures `host`'s traffic and starts its enforcer; the enforcer's pid.
pub fn enforce(topo: &Topology, host: &str, dir: &Scratch, policies: &str, config: &str) -> u32 {
    std::fs::write(dir.0.join("policies.yaml"), policies).unwrap();
    let path = dir.0.join("enforcer.yaml");
    std::fs::write(&path, config).unwrap();
    capture(topo.host(host));
    start_enforcer(topo, host, &path)
}

/// The heap each of `enforcers` takes per item while `client` holds `n` items that
/// `open` makes there (connections, UDP sessions): `segmesh_heap_in_use_bytes` read
/// before and while they are held, after the relays' 100 ms idle timers have given back
/// what they took while bytes flowed.
pub fn heap_per_held<T, F, Fut>(client: &Host, enforcers: &[&Host], n: usize, open: F) -> Vec<f64>
where
    T: Send + 'static,
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + Send,
{
    let heap = |h: &&Host| metric(h, "segmesh_heap_in_use_bytes");
    let before: Vec<f64> = enforcers.iter().map(heap).collect();
    assert!(
        before.iter().all(|b| *b > 0.0),
        "no heap figure: {before:?}"
    );
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = in_ns(client, async move {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            held.push(open().await);
        }
        held_tx.send(()).unwrap();
        let _ = tokio::time::timeout(LIMIT, release_rx).await;
        drop(held);
    });
    held_rx.recv_timeout(LIMIT).expect("the items opened");
    std::thread::sleep(Duration::from_millis(300));
    let during: Vec<f64> = enforcers.iter().map(heap).collect();
    let _ = release_tx.send(());
    holder.join().unwrap();
    before
        .iter()
        .zip(&during)
        .map(|(b, d)| (d - b) / n as f64)
        .collect()
}

/// Connects to `to` and reads a [`greeter`]'s greeting (within 5 s); the connection,
/// still open.
pub async fn greeted(to: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    let mut b = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .expect("no greeting")
        .unwrap();
    s
}
