//! The kernel relay (BPF sockmap) under real capture: a workload `work` whose enforcer
//! (uid 1337, `sockmap: require`) hands its allowed flows to an external host `ext` to
//! the kernel. Half-close and reset pass through it, every byte arrives, and a
//! rejecting reload stops a flow that the kernel is moving within 100 ms.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use segmesh_testkit::{Host, Topology, netns_enabled, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn policies(ports: &str, ext: &Host) -> String {
    format!(
        "kind: ExternalNetwork\nname: partner\nnamespace: /lab\nentries: [\"{}\", \"{}\"]\n---\n\
         kind: NetworkPolicy\nname: to-partner\nnamespace: /lab\naction: Allow\nmode: Outgoing\n\
         subject: [[app=work]]\nobject: [[ext:name=partner]]\nports: [{ports}]\nlog: true\n",
        ext.ip4, ext.ip6
    )
}

/// `work` with capture and its enforcer (`sockmap: require`), and `ext`.
fn lab(tag: &str) -> (Topology, Host, Host, Scratch) {
    let topo = Topology::new(&["work", "ext"]);
    let (work, ext) = (topo.host("work").clone(), topo.host("ext").clone());
    let (dir, cfg) = setup(tag, &topo);
    capture(&work);
    start_enforcer(&topo, "work", &cfg);
    (topo, work, ext, dir)
}

fn setup(tag: &str, topo: &Topology) -> (Scratch, PathBuf) {
    let dir = Scratch::new(tag);
    std::fs::write(
        dir.0.join("policies.yaml"),
        policies("tcp/7000-7002", topo.host("ext")),
    )
    .unwrap();
    let cfg = dir.0.join("enforcer.yaml");
    std::fs::write(
        &cfg,
        "pu: {name: work, namespace: /lab, tags: [app=work]}\npolicies: [policies.yaml]\n\
         flow_log: flows.jsonl\nsockmap: require\n",
    )
    .unwrap();
    (dir, cfg)
}

/// The pattern a side sends: byte `i` is `i % 251` shifted by `seed`.
fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| ((i % 251) as u8).wrapping_add(seed))
        .collect()
}

/// Answers "ping" with "pong" (so the client knows the enforcer has decided and handed
/// the flow over), then serves `then`.
async fn ping_pong(s: &mut TcpStream) {
    let mut ping = [0u8; 4];
    s.read_exact(&mut ping).await.unwrap();
    assert_eq!(&ping, b"ping");
    s.write_all(b"pong").await.unwrap();
}

async fn client_ping(ext: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(ext).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    tokio::time::timeout(LIMIT, s.read_exact(&mut pong))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&pong, b"pong");
    s
}

const UP: usize = 8 * MB;
const DOWN: usize = MB;

#[test]
fn netns_sockmap_carries_half_close_and_reset() {
    if !netns_enabled() {
        return;
    }
    let (_topo, work, ext, dir) = lab("sockmap");
    let at = |port| SocketAddr::new(ext.ip4.into(), port);

    // ext:7000 reads the client's bytes to its FIN, then answers and closes; ext:7001
    // resets after the ping, once the flow is in the kernel (told through `go`: a reset
    // before the hand-off makes the kernel refuse the socket, and the flow is spliced).
    let (a7000, a7001) = (at(7000), at(7001));
    let (go, gone) = tokio::sync::oneshot::channel::<()>();
    let (ready, listening) = std::sync::mpsc::channel();
    let server = in_ns(&ext, async move {
        let l0 = TcpListener::bind(a7000).await.unwrap();
        let l1 = TcpListener::bind(a7001).await.unwrap();
        ready.send(()).unwrap();
        let half = tokio::spawn(async move {
            let (mut s, _) = l0.accept().await.unwrap();
            ping_pong(&mut s).await;
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&pattern(7, DOWN)).await.unwrap();
            s.shutdown().await.unwrap();
            got
        });
        let (mut s, _) = l1.accept().await.unwrap();
        ping_pong(&mut s).await;
        tokio::time::timeout(LIMIT, gone).await.unwrap().unwrap();
        let s = s.into_std().unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
        tokio::time::timeout(LIMIT, half).await.unwrap().unwrap()
    });
    // Connecting before the servers listen would be refused (the enforcer then resets
    // the client), which is not what this test is about.
    listening.recv_timeout(LIMIT).unwrap();
    let client = in_ns(&work, async move {
        // Half-close: the server sees every byte and the FIN, and still answers.
        let mut s = client_ping(a7000).await;
        s.write_all(&pattern(3, UP)).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(LIMIT, s.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        // Reset: passed on as a reset.
        // Out of this thread's runtime: the next step runs on another.
        let r = client_ping(a7001).await.into_std().unwrap();
        (back, r)
    });
    let (back, r) = client.join().unwrap();
    wait_until("the flow in the kernel", Duration::from_secs(10), || {
        metric(&work, "segmesh_kernel_flows") == 1.0
    });
    go.send(()).unwrap();
    let client = in_ns(&work, async move {
        let mut r = TcpStream::from_std(r).unwrap();
        let end = tokio::time::timeout(LIMIT, r.read(&mut [0u8; 16]))
            .await
            .unwrap();
        (back, end.map_err(|e| e.kind()))
    });
    let (back, end) = client.join().unwrap();
    let got = server.join().unwrap();
    assert_eq!(got.len(), UP, "the server got every byte before the FIN");
    assert!(got == pattern(3, UP), "upstream intact and in order");
    assert!(back == pattern(7, DOWN), "the answer after the half-close");
    assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset));

    wait_until("both flow records", Duration::from_secs(10), || {
        flow_records(&dir).len() >= 2
    });
    let records = flow_records(&dir);
    let by_port = |p: u16| {
        records
            .iter()
            .find(|r| r["destination"]["port"] == p)
            .cloned()
            .unwrap_or_else(|| panic!("no record for port {p}: {records:?}"))
    };
    let half = by_port(7000);
    assert_eq!(half["data_path"], "kernel", "{half}");
    assert_eq!(half["close_reason"], "closed", "{half}");
    assert_eq!(half["bytes_sent"], (4 + UP) as u64, "{half}");
    assert_eq!(half["bytes_received"], (4 + DOWN) as u64, "{half}");
    let reset = by_port(7001);
    assert_eq!(reset["data_path"], "kernel", "{reset}");
    assert_eq!(reset["close_reason"], "reset", "{reset}");
    let moved: u64 = records
        .iter()
        .map(|r| r["bytes_sent"].as_u64().unwrap() + r["bytes_received"].as_u64().unwrap())
        .sum();
    wait_until("the kernel byte count", Duration::from_secs(5), || {
        metric(&work, "segmesh_kernel_bytes_total") as u64 == moved
    });
    assert_eq!(metric(&work, "segmesh_spliced_bytes_total"), 0.0);
}

/// A stream the kernel is moving stops within 100 ms of the snapshot that rejects it.
#[test]
fn netns_sockmap_a_rejecting_reload_stops_the_kernel_within_100ms() {
    if netns_enabled() {
        stops_within_100ms(false);
    }
}

/// The same over IPv6: the kernel relay takes IPv6 sockets too, and a rejected IPv6 flow
/// must not outlive its policy in the kernel.
#[test]
fn netns_sockmap_a_rejecting_reload_stops_the_kernel_within_100ms_ipv6() {
    if netns_enabled() {
        stops_within_100ms(true);
    }
}

fn stops_within_100ms(v6: bool) {
    let (_topo, work, ext, dir) = lab(if v6 {
        "sockmap-reload6"
    } else {
        "sockmap-reload"
    });
    let a7002 = SocketAddr::new(ip(&ext, v6), 7002);

    // The server streams until its writes fail (bounded: 30 s).
    let (ready, listening) = std::sync::mpsc::channel();
    let _server = in_ns(&ext, async move {
        let l = TcpListener::bind(a7002).await.unwrap();
        ready.send(()).unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        ping_pong(&mut s).await;
        let chunk = vec![5u8; 64 << 10];
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until && s.write_all(&chunk).await.is_ok() {}
    });
    listening.recv_timeout(LIMIT).unwrap();
    let received = Arc::new(Mutex::new((0usize, Instant::now())));
    let seen = received.clone();
    let client = in_ns(&work, async move {
        let mut s = client_ping(a7002).await;
        let mut buf = vec![0u8; 64 << 10];
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(until.into(), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    let mut r = seen.lock().unwrap();
                    r.0 += n;
                    r.1 = Instant::now();
                }
                Ok(end) => return end.map(|_| ()).map_err(|e| e.kind()),
                Err(_) => panic!("the stream was never stopped"),
            }
        }
    });
    wait_until("the stream flows", Duration::from_secs(20), || {
        received.lock().unwrap().0 >= 4 * MB
    });
    let version = |h: &Host| {
        let (_, body) = http_get(h, "/config");
        let body = body.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default()["version"].clone()
    };
    let before = version(&work);
    let file = dir.0.join("policies.yaml");
    let tmp = dir.0.join("policies.yaml.tmp");
    std::fs::write(&tmp, policies("tcp/7000-7001", &ext)).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    wait_until("the rejecting snapshot", Duration::from_secs(10), || {
        version(&work) != before
    });
    let installed = Instant::now();
    let end = client.join().unwrap();
    let last = received.lock().unwrap().1;
    assert!(end.is_err(), "the client is reset: {end:?}");
    let after = last.saturating_duration_since(installed);
    assert!(
        after <= Duration::from_millis(100),
        "bytes still arrived {after:?} after the rejecting snapshot was seen"
    );
    wait_until("the flow record", Duration::from_secs(10), || {
        flow_records(&dir)
            .iter()
            .any(|r| r["destination"]["port"] == 7002)
    });
    let records = flow_records(&dir);
    let r = records
        .iter()
        .find(|r| r["destination"]["port"] == 7002)
        .unwrap();
    assert_eq!(r["data_path"], "kernel", "{r}");
    assert_eq!(r["close_reason"], "policy", "{r}");
}
