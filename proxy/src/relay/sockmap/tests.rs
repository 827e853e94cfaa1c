//! The kernel relay against real sockets on loopback. Loading BPF needs root (CI is
//! root); without it these tests fail, unless `SEGMESH_SKIP_NETNS=1` says the person
//! running them cannot give root.

use super::*;
use crate::relay::splice::tests::stream;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn load() -> Option<Arc<Sockmap>> {
    match Sockmap::load(Default::default()) {
        Ok(s) => Some(s),
        Err(e) if std::env::var_os("SEGMESH_SKIP_NETNS").is_some_and(|v| v == "1") => {
            eprintln!("skipped (SEGMESH_SKIP_NETNS=1): {e}");
            None
        }
        Err(e) => panic!("BPF sockmap unavailable ({e}); run as root, or set SEGMESH_SKIP_NETNS=1"),
    }
}

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

struct Relayed {
    client: TcpStream,
    server: TcpStream,
    stop: Arc<Notify>,
    progress: Arc<Progress>,
    relay: tokio::task::JoinHandle<Outcome>,
}

/// client <-> [a kernel b] <-> server. `first`: what the client sent before the hand-off
/// (queued on `a` when it is handed over).
async fn relayed(sm: &Arc<Sockmap>, first: &[u8], idle: Duration) -> Relayed {
    let (mut client, a) = pair().await;
    let (b, server) = pair().await;
    client.write_all(first).await.unwrap();
    // The bytes are on `a` before it goes into the map.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !first.is_empty() && a.peek(&mut [0u8; 1]).await.unwrap() == 0 {
        assert!(Instant::now() < deadline);
    }
    let stop = Arc::new(Notify::new());
    let progress = Arc::new(Progress::default());
    let (sm2, stop2, p2) = (sm.clone(), stop.clone(), progress.clone());
    let relay = tokio::spawn(async move {
        match sm2.relay(a, b, idle, &p2, &stop2).await {
            Handoff::Done(o) => o,
            Handoff::Declined(..) => panic!("the kernel declined the flow"),
        }
    });
    Relayed {
        client,
        server,
        stop,
        progress,
        relay,
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out"))
}

/// The request the application sent before the enforcer decided is carried at once
/// (nothing else arrives to wake the verdict), and the answer comes back.
#[tokio::test]
async fn a_request_queued_before_the_hand_off_is_answered() {
    let Some(sm) = load() else { return };
    let mut r = relayed(&sm, b"GET / HTTP/1.1\r\n\r\n", Duration::from_secs(30)).await;
    let mut got = [0u8; 18];
    within("the queued request", r.server.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");
    r.server
        .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 27];
    within("the answer", r.client.read_exact(&mut answer))
        .await
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 204 No Content\r\n\r\n");
    assert_eq!(sm.flows(), 1);
    drop(r.client);
    drop(r.server);
    let o = within("the end", r.relay).await.unwrap();
    assert_eq!((o.forward, o.backward, o.close), (18, 27, Close::Closed));
    assert_eq!(o.path, DataPath::Kernel);
    assert_eq!(sm.flows(), 0, "the flow left the maps");
}

/// Bulk both ways, each side half-closing: every byte arrives in order before the FIN,
/// though the server's small receive buffer keeps redirected bytes waiting in the
/// kernel's backlog (and the direction paused) when the client's FIN comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_then_half_close_loses_nothing() {
    let Some(sm) = load() else { return };
    let r = relayed(&sm, b"", Duration::from_secs(30)).await;
    SockRef::from(&r.server)
        .set_recv_buffer_size(64 << 10)
        .unwrap();
    let up = stream(1, 16 << 20);
    let down = stream(2, 3 << 20);
    let (up2, down2) = (up.clone(), down.clone());
    let (mut client, mut server) = (r.client, r.server);
    let c = tokio::spawn(async move {
        let (mut rd, mut wr) = client.split();
        let send = async {
            wr.write_all(&up2).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = rd.read_to_end(&mut got);
        let ((), n) = tokio::join!(send, recv);
        n.unwrap();
        got
    });
    let s = tokio::spawn(async move {
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        server.write_all(&down2).await.unwrap();
        server.shutdown().await.unwrap();
        got
    });
    let s = within("the server's side", s).await.unwrap();
    assert_eq!(s.len(), up.len(), "upstream length");
    assert!(s == up, "upstream bytes intact and in order");
    assert!(
        within("the client's side", c).await.unwrap() == down,
        "downstream intact"
    );
    let o = within("the relay", r.relay).await.unwrap();
    assert_eq!(
        (o.forward, o.backward, o.close, o.path),
        (
            up.len() as u64,
            down.len() as u64,
            Close::Closed,
            DataPath::Kernel
        )
    );
}

/// A reset on one side is passed on as a reset.
#[tokio::test]
async fn a_reset_is_passed_on() {
    let Some(sm) = load() else { return };
    let mut r = relayed(&sm, b"x", Duration::from_secs(30)).await;
    let mut one = [0u8; 1];
    within("the first byte", r.server.read_exact(&mut one))
        .await
        .unwrap();
    socket::reset(r.client);
    let o = within("the relay", r.relay).await.unwrap();
    assert_eq!(o.close, Close::Reset);
    let e = within("the server's read", r.server.read(&mut one)).await;
    assert!(
        matches!(&e, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "the server sees a reset: {e:?}"
    );
}

/// A flow stopped by the enforcer (a snapshot rejects it) moves no byte after the stop:
/// both applications are reset and bytes sent after it never arrive.
#[tokio::test]
async fn a_stopped_flow_moves_nothing_more() {
    let Some(sm) = load() else { return };
    let mut r = relayed(&sm, b"before", Duration::from_secs(30)).await;
    let mut got = [0u8; 6];
    within("bytes before the stop", r.server.read_exact(&mut got))
        .await
        .unwrap();
    let stopped = Instant::now();
    r.stop.notify_one();
    let o = within("the relay", r.relay).await.unwrap();
    assert!(
        stopped.elapsed() < Duration::from_millis(100),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!((o.close, o.forward), (Close::Policy, 6));
    // The client may still write into its own buffer, but nothing reaches the server.
    let _ = r.client.write_all(b"after").await;
    let mut rest = Vec::new();
    let end = within("the server's read", r.server.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "bytes after the stop arrived: {rest:?}");
    assert!(end.is_err(), "the server is reset, not closed: {end:?}");
}

/// A flow idle in both directions past the timeout is closed; its counts are the
/// kernel's.
#[tokio::test]
async fn an_idle_flow_is_closed_with_the_kernels_counts() {
    let Some(sm) = load() else { return };
    let mut r = relayed(&sm, b"ping", Duration::from_millis(200)).await;
    let mut got = [0u8; 4];
    within("the ping", r.server.read_exact(&mut got))
        .await
        .unwrap();
    let o = within("the relay", r.relay).await.unwrap();
    assert_eq!((o.close, o.forward, o.backward), (Close::Idle, 4, 0));
    assert_eq!(r.progress.forward.load(Ordering::Relaxed), 4);
}

/// The wrappers the relay needs: `TCP_INFO`'s count of bytes written, and
/// `SO_RCVLOWAT`'s poke (which must not fail on an ordinary socket).
#[tokio::test]
async fn tcp_written_counts_what_entered_the_send_queue() {
    let (mut c, mut s) = pair().await;
    let before = socket::tcp_written(&c).unwrap();
    c.write_all(&[7u8; 100_000]).await.unwrap();
    assert_eq!(socket::tcp_written(&c).unwrap() - before, 100_000);
    let mut buf = vec![0u8; 100_000];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(socket::tcp_written(&c).unwrap() - before, 100_000);
    socket::poke_data_ready(&s).unwrap();
}

/// A server that does not read cannot make the kernel hold what its client sends: the
/// kernel gave redirected bytes no back-pressure (a client parked 512 MiB in seconds), so
/// the enforcer pauses a direction whose backlog outgrows its budget. When the server
/// reads again, every byte arrives, in order, across the pauses and resumptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_read_holds_back_its_client() {
    let Some(sm) = load() else { return };
    let r = relayed(&sm, b"", Duration::from_secs(30)).await;
    let (client, mut server) = (r.client, r.server);
    let pattern = |at: usize, n: usize| (at..at + n).map(|i| (i % 251) as u8).collect::<Vec<_>>();
    // Write until the client's writes stop being taken for 300 ms (or 256 MiB).
    let mut sent = 0usize;
    let started = Instant::now();
    while sent < (256 << 20) && started.elapsed() < Duration::from_secs(10) {
        let chunk = pattern(sent, 256 << 10);
        match client.try_write(&chunk) {
            Ok(n) => {
                sent += n;
                // The client is another process in real life: let the enforcer run.
                tokio::task::yield_now().await;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if tokio::time::timeout(Duration::from_millis(300), client.writable())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Err(e) => panic!("client write: {e}"),
        }
    }
    assert!(
        sent < 48 << 20,
        "the client parked {} MiB with a server that does not read",
        sent >> 20
    );
    // Now the server reads: everything arrives, in order, and the flow goes on.
    let mut got = vec![0u8; sent];
    within("the backlog", server.read_exact(&mut got))
        .await
        .unwrap();
    assert!(got == pattern(0, sent), "bytes in order across pauses");
    let mut client = client;
    client.write_all(b"more").await.unwrap();
    let mut more = [0u8; 4];
    within("bytes after the backlog", server.read_exact(&mut more))
        .await
        .unwrap();
    assert_eq!(&more, b"more");
    eprintln!("a client held back after {} KiB", sent >> 10);
}

/// The enforcer reads a preface (the ticket) off the same segment as the flow's first
/// bytes, then hands the socket over. The kernel's verdict takes whole buffers, ignoring
/// how much of one was already read, so the preface would go to the server again (seen
/// in the enforcer tests: ticket bytes echoed to the application). The hand-off first
/// moves what is queued itself; only whole buffers reach the verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_read_buffer_is_not_carried_twice() {
    let Some(sm) = load() else { return };
    for i in 0..50 {
        let (mut client, mut a) = pair().await;
        let (b, mut server) = pair().await;
        client.write_all(b"PREFACE:hello").await.unwrap();
        server.write_all(b"world").await.unwrap();
        let mut preface = [0u8; 8];
        a.read_exact(&mut preface).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while b.peek(&mut [0u8; 1]).await.unwrap() == 0 {
            assert!(Instant::now() < deadline);
        }
        let stop = Arc::new(Notify::new());
        let (sm2, stop2) = (sm.clone(), stop.clone());
        let relay = tokio::spawn(async move {
            let p = Progress::default();
            match sm2.relay(a, b, Duration::from_secs(30), &p, &stop2).await {
                Handoff::Done(o) => o,
                Handoff::Declined(..) => panic!("declined at {i}"),
            }
        });
        let mut got = [0u8; 5];
        within("the request", server.read_exact(&mut got))
            .await
            .unwrap();
        assert_eq!(&got, b"hello", "iteration {i}");
        within("the answer", client.read_exact(&mut got))
            .await
            .unwrap();
        assert_eq!(&got, b"world", "iteration {i}");
        // Once the kernel has the flow (before, the hand-off would move "again" itself,
        // and the client's FIN below could come before the sockets enter the map, which
        // the kernel refuses for a socket that has had its FIN).
        let deadline = Instant::now() + Duration::from_secs(5);
        while sm.flows() == 0 {
            assert!(
                Instant::now() < deadline,
                "the flow never reached the kernel"
            );
            tokio::task::yield_now().await;
        }
        server.write_all(b"again").await.unwrap();
        within("after the hand-off", client.read_exact(&mut got))
            .await
            .unwrap();
        assert_eq!(&got, b"again", "iteration {i}");
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        within("the server's end", server.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(
            rest.is_empty(),
            "iteration {i}: bytes carried twice: {rest:?}"
        );
        drop(server);
        let o = within("the relay", relay).await.unwrap();
        assert_eq!((o.forward, o.backward), (5, 10), "iteration {i}");
    }
}

/// Bulk both ways at once, each side half-closing when it has sent everything (as the
/// enforcer tests' bulk client and server do): every byte arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_at_once() {
    let Some(sm) = load() else { return };
    let r = relayed(&sm, b"", Duration::from_secs(30)).await;
    let n = 64 << 20;
    let side = |s: TcpStream, out: Vec<u8>| async move {
        let (mut rd, mut wr) = s.into_split();
        let send = async {
            wr.write_all(&out).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = rd.read_to_end(&mut got);
        let ((), res) = tokio::join!(send, recv);
        res.unwrap();
        got
    };
    let (up, down) = (stream(5, n), stream(6, n));
    let c = tokio::spawn(side(r.client, up.clone()));
    let s = tokio::spawn(side(r.server, down.clone()));
    let got_s = within("server side", s).await.unwrap();
    let got_c = within("client side", c).await.unwrap();
    assert_eq!((got_s.len(), got_c.len()), (n, n), "lengths");
    assert!(got_s == up && got_c == down, "bytes intact and in order");
    let o = within("the relay", r.relay).await.unwrap();
    assert_eq!(
        (o.forward, o.backward, o.close),
        (n as u64, n as u64, Close::Closed)
    );
}

/// A sender that writes at full speed from before the hand-off to well past it, to a
/// receiver that keeps up (the load harness's bulk stream): no byte lost or carried
/// twice, whether the kernel takes the flow or the sender keeps its queue full for the
/// whole hand-off and it is spliced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_sender_from_before_the_hand_off() {
    let Some(sm) = load() else { return };
    let (mut client, a) = pair().await;
    let (b, mut server) = pair().await;
    let total: usize = 512 << 20;
    let send = tokio::spawn(async move {
        let buf = vec![0x5au8; 1 << 20];
        let mut sent = 0;
        while sent < total {
            client.write_all(&buf).await.unwrap();
            sent += buf.len();
        }
        client.shutdown().await.unwrap();
        client
    });
    let (sm2, stop) = (sm.clone(), Arc::new(Notify::new()));
    let relay = tokio::spawn(async move {
        let p = Progress::default();
        // The enforcer's entry point: a flow the kernel declines is spliced.
        let idle = Duration::from_secs(30);
        super::super::splice::relay_until(a, b, idle, false, &p, &stop, Some(&sm2)).await
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = within("the sink", server.read(&mut buf)).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, total);
    drop(server);
    let _client = within("the sender", send).await.unwrap();
    let o = within("the relay", relay).await.unwrap();
    assert_eq!((o.forward, o.close), (total as u64, Close::Closed));
}

/// The last bytes and the FIN in one segment (the sender corks, writes and closes):
/// the FIN wakes the enforcer on one CPU while the verdict for that segment may still be
/// to run on the other. Passing the FIN on before the verdict's bytes were sent would
/// shut the peer's socket under them (EPIPE from the kernel's backlog, the bytes lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_bytes_and_the_fin_in_one_segment_all_arrive() {
    let Some(sm) = load() else { return };
    for i in 0..200usize {
        let r = relayed(&sm, b"", Duration::from_secs(30)).await;
        // In the kernel's hands before the client writes (a client that sends its FIN
        // before the hand-off is spliced instead).
        let deadline = Instant::now() + Duration::from_secs(5);
        while sm.flows() == 0 {
            assert!(Instant::now() < deadline, "flow {i} never handed over");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (mut client, mut server) = (r.client, r.server);
        let data = stream(i as u64 + 11, 1000 + (i * 7919) % 60_000);
        SockRef::from(&client).set_tcp_cork(true).unwrap();
        client.write_all(&data).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        within("the bytes and the end", server.read_to_end(&mut got))
            .await
            .unwrap_or_else(|e| panic!("flow {i}: {e}"));
        assert!(
            got == data,
            "flow {i}: {} of {} bytes",
            got.len(),
            data.len()
        );
        drop(server);
        let mut rest = Vec::new();
        within("the server's end", client.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|e| panic!("flow {i}: the client was reset: {e}"));
        let o = within("the relay's end", r.relay).await.unwrap();
        assert_eq!(o.close, Close::Closed, "flow {i}");
        assert_eq!(o.forward, data.len() as u64, "flow {i}");
    }
}

/// What an idle kernel-relayed flow keeps is mostly the relay's future, allocated whole
/// for as long as the flow lives: it stays small (a 4 KiB buffer used only during the
/// hand-off was part of it, 4.5 KiB in all, which put an idle kernel-relayed connection
/// at 7.9 KiB, above the 6 KiB goal).
#[tokio::test]
async fn a_kernel_relayed_flow_keeps_little_state() {
    let Some(sm) = load() else { return };
    let (_client, a) = pair().await;
    let (b, _server) = pair().await;
    let (progress, stop) = (Progress::default(), Notify::new());
    let relay = sm.relay(a, b, Duration::from_secs(1), &progress, &stop);
    let size = std::mem::size_of_val(&relay);
    eprintln!("the kernel relay's future: {size} bytes");
    assert!(size < 2048, "the kernel relay's future is {size} bytes");
}

/// Eight bulk streams at once, each sender writing, half-closing and closing its socket
/// without waiting for the receiver's end (as the load test's bulk source does), each
/// receiver reading to the end and closing: every flow ends closed, not reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_bulk_streams_closed_by_their_senders_end_cleanly() {
    let Some(sm) = load() else { return };
    let mut set_up = Vec::new();
    for _ in 0..8 {
        set_up.push(relayed(&sm, b"", Duration::from_secs(30)).await);
    }
    // All in the kernel's hands before any sender starts.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sm.flows() < 8 {
        assert!(Instant::now() < deadline, "not every flow was handed over");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut flows = Vec::new();
    for (i, r) in set_up.into_iter().enumerate() {
        let data = stream(100 + i as u64, 16 << 20);
        let (mut client, mut server) = (r.client, r.server);
        let sent = data.clone();
        let sender = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
        });
        let receiver = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        flows.push((data, sender, receiver, r.relay));
    }
    for (i, (data, sender, receiver, relay)) in flows.into_iter().enumerate() {
        within("the sender", sender).await.unwrap();
        let got = within("the receiver", receiver).await.unwrap();
        assert!(
            got == data,
            "flow {i}: {} of {} bytes",
            got.len(),
            data.len()
        );
        let o = within("the relay", relay).await.unwrap();
        assert_eq!(o.close, Close::Closed, "flow {i}");
        assert_eq!(o.forward, data.len() as u64, "flow {i}");
    }
}
