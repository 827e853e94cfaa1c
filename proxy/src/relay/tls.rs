//! Encrypted flows: bytes between the application's socket and the tunnel's TLS stream,
//! encrypted and decrypted by rustls in user space. Kernel TLS would carry them without
//! user-space copies; this build only detects it ([`ktls_available`], logged at start).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::{Notify, SetOnce};

use crate::mesh::conns::InStream;
use crate::mesh::stream::{H2Stream, io_error, poll_room};

use super::Moved;
use super::splice::{Close, DataPath, Progress};

/// Whether the kernel offers the `tls` upper-layer protocol (kernel TLS).
pub fn ktls_available() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|s| s.split_whitespace().any(|u| u == "tls"))
}

/// Largest read from the application's socket: one HTTP/2 frame's worth ([`MAX_FRAME`]),
/// TLS then cuts it in records of 16 KiB. A read that fills [`SMALL`] makes the next
/// one this large; a read shorter than that makes the next one small again, so that a
/// request/response flow does not clear 64 KiB per message.
///
/// [`MAX_FRAME`]: crate::mesh::conns::MAX_FRAME
const CHUNK: usize = 64 * 1024;
use super::splice::SMALL;

/// An authenticated-only flow that starts on its stream and may move to a spliced
/// connection of its own (`mesh/wire.rs`, "Moving flows").
pub(crate) struct Mover {
    /// Bytes moved (both ways together) after which the client opens the connection;
    /// `u64::MAX` at the server, which never does.
    pub after: u64,
    /// Where the connection arrives; shared with the server's ticket table, which puts
    /// it there.
    pub moving: Arc<Moving>,
    /// The client's: makes the future that opens the connection and has it accepted
    /// (`None`: refused, the flow stays on its stream), once `after` bytes have moved, so
    /// that an idle flow holds no connect's state. The server has none.
    pub open: Option<Box<dyn FnOnce() -> Opening + Send>>,
    /// The client's: the flow counted among those in streams on its connection
    /// ([`Mv::count`]).
    pub company: Option<InStream>,
}

/// The connection a flow moves to, on its way.
pub(crate) type Opening = std::pin::Pin<Box<dyn Future<Output = Option<TcpStream>> + Send>>;

/// A movable flow's connection, once it is there.
#[derive(Default)]
pub(crate) struct Moving {
    /// Notified once `after` bytes have moved (it keeps one permit: notifying again
    /// changes nothing).
    crossed: Notify,
    /// The connection, accepted: each direction moves to it in turn.
    pub conn: SetOnce<TcpStream>,
    /// What each direction (sent, received) had moved in the stream when it moved to the
    /// connection: those bytes went through TLS.
    switched: [std::sync::OnceLock<u64>; 2],
}

/// A relay's view of its flow's move.
struct Mv<'a> {
    m: &'a Moving,
    after: u64,
    /// The flow among those in streams on its connection.
    company: Option<&'a InStream>,
    /// Bytes counted towards `after` so far, both ways.
    counted: AtomicU64,
}

impl Mv<'_> {
    /// Counts `n` bytes a direction moved towards `after`: bytes of bulk (a read that
    /// filled its buffer, frames that filled one), or any bytes while the flow is alone
    /// on its connection. Short messages of a flow that shares its connection do not
    /// count: several flows' messages go in one TLS write and wake-up there, which
    /// costs less per message than a spliced connection of each flow's own (and a
    /// flow alone gains nothing by staying: it moves, as bulk does). docs/design.md,
    /// "Moving flows".
    fn count(&self, n: usize, full: bool) {
        if !full && self.company.is_some_and(|c| c.company() > 1) {
            return;
        }
        let total = self.counted.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total >= self.after {
            self.m.crossed.notify_one();
        }
    }
}

/// The trailer that ends a direction of a stream whose rest follows on the flow's
/// moved connection.
fn moved_trailer() -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert(
        crate::mesh::wire::H_MOVED,
        http::HeaderValue::from_static("1"),
    );
    h
}

/// Application → tunnel: each read is a chunk handed to the stream as it is (no copy:
/// h2 frames it from the buffer the socket was read into). The buffer is taken when
/// bytes wait and given back when none do, so an idle direction holds none. The end of
/// the application's stream ends ours. A flow that moves ends this direction of the
/// stream with the moved trailer after the last byte read, and splices the rest.
async fn up(
    app: &TcpStream,
    send: &mut h2::SendStream<Bytes>,
    moved: &AtomicU64,
    mv: Option<&Mv<'_>>,
) -> io::Result<()> {
    let mut size = SMALL;
    // Boxed, as everything about a move: an encrypted flow holds none of its state.
    let mut arrived = mv.map(|m| Box::pin(m.m.conn.wait()));
    loop {
        match arrived.as_mut() {
            Some(arrived) => tokio::select! {
                biased;
                tcp = arrived => {
                    send.send_trailers(moved_trailer()).map_err(io_error)?;
                    if let Some(m) = mv {
                        let _ = m.m.switched[0].set(moved.load(Ordering::Relaxed));
                    }
                    return Box::pin(spliced(app, tcp, moved)).await;
                }
                r = app.readable() => r?,
            },
            None => app.readable().await?,
        }
        let mut buf = BytesMut::zeroed(size);
        let n = match super::splice::read_draining(app, &mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            send.reserve_capacity(0);
            send.send_data(Bytes::new(), true).map_err(io_error)?;
            return Ok(());
        }
        let full = n == size;
        size = if full { CHUNK } else { SMALL };
        send_all(send, chunk_of(buf, n)).await?;
        moved.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(m) = mv {
            m.count(n, full);
        }
    }
}

/// The first `n` bytes read into `buf`, as the chunk queued on the stream. A chunk keeps
/// its whole allocation until h2 has written it: a short read into a large buffer is
/// copied out, so that what the stream's window lets a flow queue (1 MiB of bytes) never
/// holds more than twice that in memory (a workload writing 4 KiB, 1 byte, 4 KiB, ... to
/// a peer that does not read would otherwise make 64 KiB allocations for a few bytes
/// each, up to 32 MiB per flow). A read that filled half its buffer or more is the chunk
/// itself, uncopied.
fn chunk_of(mut buf: BytesMut, n: usize) -> Bytes {
    if n < buf.len() / 2 {
        return Bytes::copy_from_slice(&buf[..n]);
    }
    buf.truncate(n);
    buf.freeze()
}

/// Hands `data` to the stream as the peer's flow-control window admits it (a peer that
/// does not read holds us back here, and the application behind us).
async fn send_all(send: &mut h2::SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        let room = std::future::poll_fn(|cx| poll_room(send, cx, data.len())).await?;
        send.send_data(data.split_to(room), false)
            .map_err(io_error)?;
    }
    Ok(())
}

/// Frames written to the application in one `writev` at most.
const GATHER: usize = 16;

/// Tunnel → application: the frames received are written from h2's own buffers (no
/// copy), those already there gathered in one `writev`; their flow-control capacity is
/// released once the application's socket took them. The end of the stream is a FIN,
/// unless it carries the moved trailer: then the rest is spliced from the flow's moved
/// connection.
async fn down(
    recv: &mut h2::RecvStream,
    app: &TcpStream,
    moved: &AtomicU64,
    mv: Option<&Mv<'_>>,
) -> io::Result<()> {
    loop {
        // Made anew for each write: nothing is kept while waiting for the next frame.
        let mut chunks: Vec<Bytes> = Vec::new();
        // Wait for one frame, then take what else is already there: whether the stream
        // ended.
        let ended = std::future::poll_fn(|cx| {
            loop {
                match recv.poll_data(cx) {
                    Poll::Pending if chunks.is_empty() => return Poll::Pending,
                    Poll::Pending => return Poll::Ready(Ok(false)),
                    Poll::Ready(None) => return Poll::Ready(Ok(true)),
                    Poll::Ready(Some(Ok(b))) => {
                        if !b.is_empty() {
                            chunks.push(b);
                        }
                        if chunks.len() == GATHER {
                            return Poll::Ready(Ok(false));
                        }
                    }
                    Poll::Ready(Some(Err(e))) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                        return Poll::Ready(Ok(true));
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io_error(e))),
                }
            }
        })
        .await?;
        let total: usize = chunks.iter().map(Bytes::len).sum();
        write_all_chunks(app, &mut chunks).await?;
        if total > 0 {
            let _ = recv.flow_control().release_capacity(total);
            moved.fetch_add(total as u64, Ordering::Relaxed);
            if let Some(m) = mv {
                // Frames that took a read's worth or more arrived together: bulk.
                m.count(total, total >= SMALL);
            }
        }
        if ended {
            return match mv {
                Some(m) => Box::pin(moved_down(recv, app, moved, m.m)).await,
                None => crate::socket::shutdown_write(app),
            };
        }
    }
}

/// The end of a movable flow's stream, inbound: with the moved trailer the rest comes
/// on the flow's connection (the peer has it: it is ours too, or soon will be), else it
/// is the end.
async fn moved_down(
    recv: &mut h2::RecvStream,
    app: &TcpStream,
    moved: &AtomicU64,
    m: &Moving,
) -> io::Result<()> {
    let trailers = recv.trailers().await.ok().flatten();
    if trailers.is_some_and(|t| t.get(crate::mesh::wire::H_MOVED).is_some()) {
        let _ = m.switched[1].set(moved.load(Ordering::Relaxed));
        let tcp = m.conn.wait().await;
        return spliced(tcp, app, moved).await;
    }
    crate::socket::shutdown_write(app)
}

/// The rest of a moved flow's direction: spliced from `src` to `dst` until `src`'s end,
/// then passed on.
async fn spliced(src: &TcpStream, dst: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
    super::splice::pump_splice(src, dst, moved).await?;
    crate::socket::shutdown_write(dst)
}

/// Writes every chunk to `app`, as many at once as the socket takes.
async fn write_all_chunks(app: &TcpStream, chunks: &mut [Bytes]) -> io::Result<()> {
    let mut first = 0;
    while first < chunks.len() {
        app.writable().await?;
        let slices: Vec<io::IoSlice<'_>> = chunks[first..]
            .iter()
            .map(|b| io::IoSlice::new(b))
            .collect();
        let mut n = match app.try_write_vectored(&slices) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        drop(slices);
        while n > 0 {
            let c = &mut chunks[first];
            let take = n.min(c.len());
            c.advance(take);
            n -= take;
            if c.is_empty() {
                first += 1;
            }
        }
    }
    Ok(())
}

/// Relays through TLS until both sides end, `stop` is notified, or no byte moved either
/// way for `idle` (as spliced flows do); what moved is counted from `app`'s side (app →
/// peer is forward). A flow that does not end with both sides' FINs resets the
/// application's connection (and the stream, at the peer). With a [`Mover`], the flow
/// moves to its own connection when that is there, each direction after its last byte
/// in the stream, and is spliced from then on.
pub(crate) async fn relay(
    app: TcpStream,
    stream: H2Stream,
    idle: std::time::Duration,
    stop: &tokio::sync::Notify,
    mover: Option<Mover>,
) -> Moved {
    let (mut send, mut recv) = stream.into_parts();
    let progress = Progress::default();
    let (moving, open, after, company) = match mover {
        Some(m) => (Some(m.moving), m.open, m.after, m.company),
        None => (None, None, u64::MAX, None),
    };
    let mv = moving.as_deref().map(|m| Mv {
        m,
        after,
        company: company.as_ref(),
        counted: AtomicU64::new(0),
    });
    let mv = mv.as_ref();
    // The client opens the flow's connection once enough has moved; then nothing.
    let opening = match (mv, open) {
        (Some(mv), Some(open)) => Some(Box::pin(async move {
            mv.m.crossed.notified().await;
            if let Some(tcp) = open().await {
                let _ = tcp.set_nodelay(true);
                let _ = mv.m.conn.set(tcp);
                // Spliced from here on: the flows still in streams are without it.
                if let Some(c) = mv.company {
                    c.leave();
                }
            }
        })),
        _ => None,
    };
    let arrival = async {
        if let Some(o) = opening {
            o.await;
        }
        std::future::pending::<()>().await
    };
    let moved = || {
        (
            progress.forward.load(Ordering::Relaxed),
            progress.backward.load(Ordering::Relaxed),
        )
    };
    let idled = async {
        let tick = (idle / 4).max(std::time::Duration::from_millis(10));
        let (mut last, mut since) = (moved(), tokio::time::Instant::now());
        loop {
            tokio::time::sleep(tick).await;
            let now = moved();
            if now != last {
                (last, since) = (now, tokio::time::Instant::now());
            } else if since.elapsed() >= idle {
                return;
            }
        }
    };
    enum End {
        Copied(std::io::Result<(u64, u64)>),
        Stopped,
        Idle,
    }
    let end = tokio::select! {
        r = async {
            tokio::try_join!(
                up(&app, &mut send, &progress.forward, mv),
                down(&mut recv, &app, &progress.backward, mv),
            )
        } => End::Copied(r.map(|_| moved())),
        _ = stop.notified() => End::Stopped,
        _ = idled => End::Idle,
        _ = arrival => unreachable!("never ends"),
    };
    let (f, b) = moved();
    let (forward, backward, close) = match end {
        End::Copied(Ok((a, b))) => (a, b, Close::Closed),
        End::Stopped => (f, b, Close::Policy),
        End::Idle => (f, b, Close::Idle),
        End::Copied(Err(e)) if super::splice::is_reset(&e) => (f, b, Close::Reset),
        End::Copied(Err(_)) => (f, b, Close::Error),
    };
    // As spliced flows do: a reset (of the application, or of the stream by the peer)
    // is passed on as a reset, and an idle, failed or stopped flow resets the
    // application too, so that it does not wait on a half-dead peer. The stream, dropped
    // unended, is reset at the peer.
    // The ticket table holds no more than a weak reference: the connection is ours.
    let moving = moving.and_then(Arc::into_inner);
    // A direction that never moved (it had ended before) went through TLS whole.
    let in_tls = moving.as_ref().map_or(0, |m| {
        let at = |i: usize, total: u64| m.switched[i].get().map_or(total, |&n| n.min(total));
        at(0, f) + at(1, b)
    });
    let conn = moving.and_then(|m| m.conn.into_inner());
    let was_moved = conn.is_some();
    if close != Close::Closed {
        crate::socket::reset(app);
        if let Some(tcp) = conn {
            crate::socket::reset(tcp);
        }
    }
    Moved {
        forward,
        backward,
        // A moved flow: its first bytes went in the stream, the rest spliced.
        path: if was_moved {
            DataPath::Moved
        } else {
            DataPath::Copied
        },
        close,
        tls: !was_moved,
        in_tls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// application <-> [app relay ours] <-> theirs (a stream of one HTTP/2 connection):
    /// the application's end, the peer's stream and the relay's task.
    async fn relayed() -> (TcpStream, H2Stream, tokio::task::JoinHandle<Moved>) {
        let (client, app) = tcp_pair().await;
        let (ours, theirs) = crate::mesh::stream::tests::pair().await;
        let task = tokio::spawn(async move {
            let stop = tokio::sync::Notify::new();
            relay(app, ours, std::time::Duration::from_secs(30), &stop, None).await
        });
        (client, theirs, task)
    }

    /// A connected pair of sockets on loopback.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (app, _) = l.accept().await.unwrap();
        (client, app)
    }

    /// An encrypted flow with no bytes either way ends after the idle timeout (it held
    /// a connection and 128 KiB of buffers forever before).
    #[tokio::test]
    async fn an_idle_encrypted_flow_ends() {
        let (client, app) = tcp_pair().await;
        let (ours, _theirs) = crate::mesh::stream::tests::pair().await;
        let stop = tokio::sync::Notify::new();
        let started = std::time::Instant::now();
        let m = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            relay(
                app,
                ours,
                std::time::Duration::from_millis(200),
                &stop,
                None,
            ),
        )
        .await
        .expect("ended by itself");
        assert_eq!(m.close, Close::Idle);
        assert!(started.elapsed() >= std::time::Duration::from_millis(200));
        drop(client);
    }

    /// Every byte both ways, in order and counted, trickles (one byte at a time, small
    /// reads) and bulk (full chunks, more than the stream's window) alike; each side's
    /// end is passed on as the other's EOF while the other direction goes on.
    #[tokio::test]
    async fn a_relayed_stream_is_exact_both_ways_and_passes_the_end_on() {
        let (mut client, mut theirs, relay) = relayed().await;
        let up: Vec<u8> = crate::relay::splice::tests::stream(7, 5 << 20);
        let down: Vec<u8> = crate::relay::splice::tests::stream(8, 3 << 20);
        let (up2, down2) = (up.clone(), down.clone());
        let writer = tokio::spawn(async move {
            for b in &up2[..100] {
                client.write_all(&[*b]).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.write_all(&up2[100..]).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).await.unwrap();
        assert!(
            got == up,
            "every byte up, in order ({} of {})",
            got.len(),
            up.len()
        );
        for b in &down2[..100] {
            theirs.write_all(&[*b]).await.unwrap();
            tokio::task::yield_now().await;
        }
        theirs.write_all(&down2[100..]).await.unwrap();
        theirs.shutdown().await.unwrap();
        let back = writer.await.unwrap();
        assert!(
            back == down,
            "every byte down, in order ({} of {})",
            back.len(),
            down.len()
        );
        let m = relay.await.unwrap();
        assert_eq!(m.close, Close::Closed);
        assert_eq!(
            (m.forward, m.backward),
            (up.len() as u64, down.len() as u64)
        );
    }

    /// An application that does not read holds the peer back (flow control): the relay
    /// does not buffer the stream's bytes without bound.
    #[tokio::test]
    async fn an_application_that_does_not_read_holds_the_peer_back() {
        let (client, mut theirs, _relay) = relayed().await;
        let chunk = vec![0u8; 64 << 10];
        let mut sent = 0usize;
        // Writes succeed until the stream's window, the socket buffers and what the
        // relay holds are full; then they wait.
        loop {
            match tokio::time::timeout(
                std::time::Duration::from_millis(500),
                theirs.write_all(&chunk),
            )
            .await
            {
                Ok(r) => r.unwrap(),
                Err(_) => break,
            }
            sent += chunk.len();
            assert!(
                sent < 64 << 20,
                "64 MiB taken from a peer whose application reads nothing"
            );
        }
        drop(client);
    }

    /// Reads `r` to its end, which must be a reset within 5 s.
    async fn reads_a_reset(mut r: impl tokio::io::AsyncRead + Unpin, who: &str) {
        let mut rest = Vec::new();
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), r.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("{who} never learned of the reset"))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{who}: {e}");
    }

    /// A reset is passed on as a reset, both ways: the application's reset resets the
    /// stream at the peer, and the peer's reset of the stream resets the application
    /// (an encrypted flow passed it on as a FIN before).
    #[tokio::test]
    async fn a_reset_is_passed_on_both_ways() {
        let (client, theirs, task) = relayed().await;
        crate::socket::reset(client);
        reads_a_reset(theirs, "the peer").await;
        assert_eq!(task.await.unwrap().close, Close::Reset);

        let (client, theirs, task) = relayed().await;
        drop(theirs);
        reads_a_reset(client, "the application").await;
        assert_eq!(task.await.unwrap().close, Close::Reset);
    }

    /// A short read is copied out of its large buffer before it is queued (so that a
    /// workload cannot make its enforcer keep 64 KiB allocations for a few bytes each up
    /// to the stream's window); a read that filled its buffer is queued uncopied.
    #[test]
    fn short_reads_do_not_keep_their_large_buffer() {
        let big = BytesMut::zeroed(CHUNK);
        let at = big.as_ptr();
        let one = chunk_of(big, 1);
        assert_eq!(one.len(), 1);
        assert_ne!(one.as_ptr(), at, "a 1-byte chunk holds the 64 KiB buffer");
        let full = BytesMut::zeroed(CHUNK);
        let at = full.as_ptr();
        let chunk = chunk_of(full, CHUNK);
        assert_eq!(
            (chunk.len(), chunk.as_ptr()),
            (CHUNK, at),
            "bulk is not copied"
        );
    }
}
