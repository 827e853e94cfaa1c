use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A connected pair of streams on loopback.
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

/// client <-> [a relay b] <-> server; returns the app ends and the relay's outcome.
async fn setup(
    force_copy: bool,
    idle: Duration,
) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Outcome>) {
    let (client, a) = pair().await;
    let (b, server) = pair().await;
    let h = tokio::spawn(async move { relay(a, b, idle, force_copy, &Progress::default()).await });
    (client, server, h)
}

/// `n` pseudo-random bytes (xorshift from `seed`): loss, duplication and reordering show.
pub(crate) fn stream(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn both_ways(force_copy: bool) {
    let (mut client, mut server, h) = setup(force_copy, Duration::from_secs(30)).await;
    let up = stream(1, 8 << 20);
    let down = stream(2, 3 << 20);
    let (up2, down2) = (up.clone(), down.clone());
    let c = tokio::spawn(async move {
        let (mut r, mut w) = client.split();
        let send = async {
            w.write_all(&up2).await.unwrap();
            w.shutdown().await.unwrap(); // half-close: we are done sending
        };
        let mut got = Vec::new();
        let recv = r.read_to_end(&mut got);
        let ((), n) = tokio::join!(send, recv);
        n.unwrap();
        got
    });
    let s = tokio::spawn(async move {
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap(); // the client's FIN arrived...
        server.write_all(&down2).await.unwrap(); // ...and we can still answer
        server.shutdown().await.unwrap();
        got
    });
    assert!(s.await.unwrap() == up, "upstream bytes intact");
    assert!(c.await.unwrap() == down, "downstream bytes intact");
    let o = h.await.unwrap();
    assert_eq!(
        (o.forward, o.backward, o.close),
        (up.len() as u64, down.len() as u64, Close::Closed)
    );
    assert_eq!(
        o.path,
        if force_copy {
            DataPath::Copied
        } else {
            DataPath::Spliced
        }
    );
}

#[tokio::test]
async fn splices_both_ways_with_half_close() {
    both_ways(false).await;
}

#[tokio::test]
async fn copy_fallback_moves_the_same_bytes() {
    both_ways(true).await;
}

#[tokio::test]
async fn reset_is_passed_on() {
    let (client, mut server, h) = setup(false, Duration::from_secs(30)).await;
    socket::reset(client);
    let mut b = [0u8; 1];
    let e = server.read(&mut b).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(h.await.unwrap().close, Close::Reset);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let (mut client, _server, h) = setup(false, Duration::from_millis(300)).await;
    let start = Instant::now();
    let o = tokio::time::timeout(Duration::from_secs(5), h)
        .await
        .expect("bounded")
        .unwrap();
    assert_eq!(o.close, Close::Idle);
    assert!(start.elapsed() >= Duration::from_millis(300));
    let mut b = [0u8; 1];
    assert!(
        client.read(&mut b).await.is_err(),
        "the client sees the connection reset"
    );
}

/// Short messages (copied) and bulk (spliced) in one direction, switching back and
/// forth (the pipe idles out in between): every byte arrives, in order.
#[tokio::test]
async fn short_reads_and_bulk_interleave_in_order() {
    let (mut client, mut server, h) = setup(false, Duration::from_secs(30)).await;
    let mut sent = Vec::new();
    let mut got = Vec::new();
    for round in 0..3u64 {
        for i in 0..50u64 {
            let msg = stream(round * 100 + i, 100);
            client.write_all(&msg).await.unwrap();
            let mut b = vec![0u8; msg.len()];
            server.read_exact(&mut b).await.unwrap();
            got.extend_from_slice(&b);
            sent.extend_from_slice(&msg);
        }
        let bulk = stream(round + 7, 2 << 20);
        let (mut r, _w) = server.split();
        let read = async {
            let mut b = vec![0u8; bulk.len()];
            r.read_exact(&mut b).await.unwrap();
            b
        };
        let (b, ()) = tokio::join!(read, async { client.write_all(&bulk).await.unwrap() });
        got.extend_from_slice(&b);
        sent.extend_from_slice(&bulk);
        // Long enough for the pipe to be given back.
        tokio::time::sleep(PIPE_IDLE * 2).await;
    }
    assert!(got == sent, "every byte, in order");
    drop(client);
    drop(server);
    let o = h.await.unwrap();
    assert_eq!(o.forward, sent.len() as u64);
}

/// A short read clears the socket's readiness without the EAGAIN read: bytes that arrive
/// after it wake the reader again, and bytes followed by a FIN that both arrived before
/// the read still end the stream at the next wait (the end of stream is never cleared).
#[tokio::test]
async fn a_draining_read_misses_neither_later_bytes_nor_the_end() {
    let (mut w, r) = pair().await;
    let mut buf = [0u8; 64];
    for round in 0..100u8 {
        w.write_all(&[round; 10]).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                r.readable().await.unwrap();
                match read_draining(&r, &mut buf) {
                    Ok(n) => return n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await
        .expect("woken for bytes written after a draining read");
        assert_eq!(&buf[..n], &[round; 10][..n]);
        // A message split over two reads would show as a short count here.
        if n < 10 {
            r.readable().await.unwrap();
            let m = read_draining(&r, &mut buf[n..]).unwrap();
            assert_eq!(n + m, 10);
        }
    }
    // Bytes and the FIN both queued before the read.
    w.write_all(b"last").await.unwrap();
    w.shutdown().await.unwrap();
    // Time for the FIN to arrive before the read (should it come later, the test covers
    // the other order, which must pass as well).
    tokio::time::sleep(Duration::from_millis(50)).await;
    r.readable().await.unwrap();
    assert_eq!(read_draining(&r, &mut buf).unwrap(), 4);
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            r.readable().await.unwrap();
            match read_draining(&r, &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other.unwrap(),
            }
        }
    })
    .await
    .expect("the end of stream is seen after a draining read");
    assert_eq!(end, 0);
}

/// Passing a FIN on to a side whose peer reset it meanwhile fails with ENOTCONN: that is
/// the side's reset, not an error of the relay (the kernel relay logged it as a broken
/// flow and recorded it so; the splice relay recorded `error`).
#[tokio::test]
async fn a_fin_towards_a_socket_reset_meanwhile_is_its_reset() {
    let (client, a) = pair().await;
    crate::socket::reset(client);
    // The reset has arrived once `a` is ready (readable, with its error and hang-up).
    tokio::time::timeout(
        Duration::from_secs(5),
        a.ready(tokio::io::Interest::READABLE),
    )
    .await
    .expect("the reset arrives")
    .unwrap();
    let e = crate::socket::shutdown_write(&a).expect_err("no FIN on a reset socket");
    assert_eq!(e.kind(), io::ErrorKind::NotConnected, "{e}");
    assert!(is_reset(&e), "{e}: taken for a reset");
    assert!(!is_reset(&io::Error::from(io::ErrorKind::PermissionDenied)));
}
