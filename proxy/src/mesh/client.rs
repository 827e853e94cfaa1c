//! The tunnel's client role: our PU connects to a registered PU. The flow takes the
//! multiplexed connection to the peer's enforcer ([`conns`](super::conns)); the peer's
//! certificate must name the PU registered at the address; our decision on its
//! certificate tags; the request and the server's answer on a new stream; then the bytes,
//! encrypted in that stream or, with the server's ticket, spliced on a connection of
//! their own. An authenticated-only flow starts in its stream and moves to a spliced
//! connection of its own once `move_after` bytes have moved ([`move_to`]).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use segmesh_api::{FlowReason, Side};
use segmesh_policy::{Direction, FlowPort, Protocol, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::conns::{Conn, EstablishError, InStream, SPARE_AGE};
use super::decide;
use super::stream::H2Stream;
use super::wire::{MAX_BOOK, Reason, Request, Response, Ticket, book_from_http, book_request};
use crate::flow::{Recorder, reason_of};
use crate::open::Peer;
use crate::relay::splice::{self, Progress};
use crate::relay::{Moved, tls};
use crate::snapshot::RegisteredPu;
use crate::state::Shared;

impl EstablishError {
    fn reason(&self) -> FlowReason {
        match self {
            EstablishError::Unreachable => FlowReason::TunnelUnreachable,
            EstablishError::PeerCertificate(why) => FlowReason::PeerCertificate((*why).into()),
            EstablishError::HandshakeTimeout => FlowReason::HandshakeTimeout,
            EstablishError::Overload => FlowReason::Overload,
        }
    }
}

/// Where a negotiated flow's bytes go.
pub(crate) enum Data {
    /// Encrypted: the flow's own stream on the multiplexed connection (counted there
    /// while it lives).
    Stream(H2Stream, InStream),
    /// Authenticated-only: a plain connection to the peer's tunnel port that presented
    /// the server's ticket.
    Plain(TcpStream),
    /// Authenticated-only, started in its stream: the ticket that moves it to a
    /// connection of its own, to the peer at the address (counted on the multiplexed
    /// connection while it lives).
    Movable(H2Stream, Ticket, std::net::IpAddr, InStream),
}

/// A flow to the PU registered at `target`, its identity checked, our decision on its
/// certificate taken, the request sent and accepted: what the flow's data plane then
/// uses. The error is the refusal and who refused.
pub(crate) struct Negotiated {
    pub data: Data,
    /// Bytes of the application's already on their way (its first bytes, sent with the
    /// request): counted as the flow's.
    pub sent: u64,
    /// The peer's tags, shared with its connection.
    pub tags: Arc<segmesh_policy::TagSet>,
    pub reason: Reason,
}

pub(crate) type Refusal = (FlowReason, Option<Side>);

/// The connection to the peer at `ip`, counted as reused or new.
async fn connection(
    shared: &Arc<Shared>,
    tls: &Arc<segmesh_identity::TlsConfigs>,
    ip: std::net::IpAddr,
) -> Result<(Arc<Conn>, bool), EstablishError> {
    let got = shared.conns.get(shared, tls, ip).await;
    if let Ok((_, new)) = &got {
        let result = if *new { "new" } else { "reused" };
        crate::metrics::count(&shared.metrics.pool, result, 1);
    }
    got
}

/// Sends `request` on a new stream of `conn`, the application's `first` bytes right
/// behind it (and what it sends while the answer is on its way, up to [`FIRST`] in
/// all), and reads the answer (bounded by the handshake timeout): the answer and the
/// stream's send half.
async fn exchange(
    shared: &Shared,
    conn: &Conn,
    request: http::Request<()>,
    first: Option<&mut First<'_>>,
) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>), ()> {
    let send = conn.send.clone();
    let limit = shared.settings.limits.handshake_timeout;
    let sent = async {
        let mut send = send.ready().await.map_err(|_| ())?;
        let (answer, mut stream) = send.send_request(request, false).map_err(|_| ())?;
        let Some(f) = first else {
            return Ok((answer.await.map_err(|_| ())?, stream));
        };
        let data = |stream: &mut h2::SendStream<Bytes>, b: Bytes| {
            shared.metrics.first_bytes.inc_by(b.len() as u64);
            // Within the stream's window: h2 sends it with the request's frame.
            stream.send_data(b, false).map_err(|_| ())
        };
        // What an earlier try read goes again, then what waits now.
        f.look();
        for b in &f.read {
            data(&mut stream, b.clone())?;
        }
        let mut answer = std::pin::pin!(answer);
        loop {
            tokio::select! {
                biased;
                a = &mut answer => return Ok((a.map_err(|_| ())?, stream)),
                r = f.app.readable(), if f.wants_more() => match r {
                    Ok(()) => {
                        if let Some(b) = f.read_ready() {
                            data(&mut stream, b)?;
                        }
                    }
                    // Left for the relay to meet.
                    Err(_) => f.done = true,
                },
            }
        }
    };
    tokio::time::timeout(limit, sent).await.map_err(|_| ())?
}

/// The most of an application's first bytes that go out with its flow's request.
/// Within the stream's window ([`STREAM_WINDOW`](super::conns::STREAM_WINDOW)); one
/// request of most client-speaks-first protocols (HTTP, a TLS ClientHello, redis).
pub(crate) const FIRST: usize = 16 * 1024;

/// A TCP flow's application socket and what it sent before its flow's request went out.
/// Those bytes travel in the stream right behind the request, so that a client that
/// speaks first does not wait a round trip between the enforcers for the answer: the
/// server holds them, unread, until both ends decided and its workload is connected, and
/// drops them with a refusal (docs/design.md, "First bytes"). Read once, when a flow's
/// request is about to go out on a stream; a flow tried on several endpoints (a
/// Service's) sends the same bytes to each.
pub(crate) struct First<'a> {
    app: &'a TcpStream,
    /// What was read, in order (at most [`FIRST`] bytes): sent on each stream the
    /// flow's request goes out on.
    read: Vec<Bytes>,
    /// The socket was looked at once (its first bytes taken, if there were any).
    looked: bool,
    /// The application's end, an error, or [`FIRST`] bytes: no more reads (the relay
    /// meets the end or the error itself: a socket's end reads as 0 again).
    done: bool,
}

impl<'a> First<'a> {
    pub(crate) fn of(app: &'a TcpStream) -> First<'a> {
        First {
            app,
            read: Vec::new(),
            looked: false,
            done: false,
        }
    }

    /// Takes the bytes already waiting on the application's socket, without waiting,
    /// the first time only.
    fn look(&mut self) {
        if !self.looked {
            self.looked = true;
            // Through tokio's readiness, which takes a socket its listener accepted for
            // ready (`TcpStream::new_accepted`): the read is made, and when it finds
            // nothing, that readiness is cleared, so the wait for more that follows does
            // not read the empty socket a second time (it did, one syscall per flow).
            self.read_ready();
        }
    }

    fn wants_more(&self) -> bool {
        !self.done
    }

    /// Bytes read so far.
    fn sent(&self) -> u64 {
        self.read.iter().map(|b| b.len() as u64).sum()
    }

    /// After the socket said it is readable: what it had (tokio's readiness cleared
    /// when it had nothing).
    fn read_ready(&mut self) -> Option<Bytes> {
        let r = self
            .app
            .try_io(tokio::io::Interest::READABLE, || self.recv());
        self.took(r)
    }

    /// One read without waiting, of what room is left, copied out at its size (h2
    /// holds it until written).
    fn recv(&self) -> std::io::Result<Bytes> {
        let mut buf = [0u8; FIRST];
        let room = FIRST - self.sent() as usize;
        let n = nix::sys::socket::recv(
            self.app.as_raw_fd(),
            &mut buf[..room],
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .map_err(std::io::Error::from)?;
        Ok(Bytes::copy_from_slice(&buf[..n]))
    }

    fn took(&mut self, r: std::io::Result<Bytes>) -> Option<Bytes> {
        match r {
            Ok(b) if b.is_empty() => self.done = true,
            Ok(b) => {
                self.read.push(b.clone());
                self.done = self.sent() >= FIRST as u64;
                return Some(b);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.done = true,
        }
        None
    }
}

/// Negotiates a flow to `pu` at `target` on `port` (`udp/N`: a UDP session, which stays
/// encrypted in its stream). A TCP flow's `first` bytes go with its request when its
/// bytes are to travel in the stream.
pub(crate) async fn negotiate(
    rec: &mut Recorder,
    target: SocketAddr,
    pu: &RegisteredPu,
    port: FlowPort,
    first: Option<&mut First<'_>>,
) -> Result<Negotiated, Refusal> {
    let shared = rec.shared().clone();
    let snap = rec.snapshot().clone();
    let Some(tls) = snap.tls.clone() else {
        return Err((FlowReason::NoIdentity, None));
    };
    if !rec.admit() {
        return Err((FlowReason::Overload, None));
    }
    let ip = target.ip();
    // Someone else answers at that address with a valid certificate.
    let impersonated = |c: &Conn| c.peer.name != pu.name || c.peer.namespace != pu.namespace;
    let (mut conn, mut new) = connection(&shared, &tls, ip)
        .await
        .map_err(|e| (e.reason(), None))?;
    rec.peer_identity = Some(conn.peer.spiffe_id().to_string());
    rec.resumed = Some(conn.resumed);
    if impersonated(&conn) {
        return Err((FlowReason::Impersonation, Some(Side::Client)));
    }
    let d = decide(&snap, Direction::Outgoing, &conn.tags, port, &shared);
    let (verdict, encrypt, reason) = (d.verdict, d.encrypt, reason_of(&d));
    rec.decided(d);
    if verdict == Verdict::Reject {
        return Err((reason, Some(Side::Client)));
    }
    let udp = port.protocol == Protocol::Udp;
    let mut request = Request {
        port: target.port(),
        encrypt: encrypt || udp,
        udp,
        // Starts in its stream (no connection of its own to set up for a short flow),
        // unless the kernel relays plaintext flows: it moves theirs with no wake-up at
        // all, from the first byte.
        movable: !(encrypt || udp) && shared.settings.move_after > 0 && shared.kernel().is_none(),
    };
    // An authenticated-only flow with a ticket from the peer's book: no request on the
    // connection; the flow is asked for, decided and answered on its data connection.
    if !request.encrypt && !request.movable {
        let (ticket, ask) = conn.ticket();
        if ask {
            refill(&shared, &conn);
        }
        if let Some(t) = ticket {
            match Box::pin(by_book(&shared, &conn, ip, t, target.port())).await {
                Ok((_, Some(tcp))) => {
                    return Ok(Negotiated {
                        data: Data::Plain(tcp),
                        sent: 0,
                        tags: conn.tags.clone(),
                        reason: Reason::Accepted,
                    });
                }
                // The server's decision wants encryption: asked again on a stream.
                Ok((Reason::Encrypt, None)) => request.encrypt = true,
                // Void (the server lost the connection's state): asked on a stream.
                Ok((Reason::Ticket, None)) => conn.void_book(),
                Ok((r, None)) => {
                    rec.peer_reason = Some(r.as_str().into());
                    return Err((reason, Some(Side::Server)));
                }
                Err(why) => return Err((why, Some(Side::Server))),
            }
        }
    }
    let to_http = || request.to_http(target);
    // An authenticated-only flow will need its data connection: opened while the
    // request is out, so its handshake costs no round trip of its own (dropped unused
    // when the answer is a refusal; the server sees a connection that says nothing).
    let early = (!request.encrypt && !request.movable).then(|| {
        let shared = shared.clone();
        Early(tokio::spawn(
            async move { data_connection(&shared, ip).await },
        ))
    });
    // The flow's bytes go in its stream (a movable one's too, until it moves): its first
    // ones with the request.
    let mut first = first.filter(|_| request.encrypt || request.movable);
    let (answer, stream) = loop {
        match exchange(&shared, &conn, to_http(), first.as_deref_mut()).await {
            Ok(a) => break a,
            // A reused connection the server was closing as we sent: once more on a
            // new one (the server never saw the stream).
            Err(()) if !new => {
                shared
                    .conns
                    .discard(ip, shared.settings.listeners.tunnel, &conn)
                    .await;
                (conn, new) = connection(&shared, &tls, ip)
                    .await
                    .map_err(|e| (e.reason(), None))?;
                if impersonated(&conn) {
                    return Err((FlowReason::Impersonation, Some(Side::Client)));
                }
            }
            Err(()) => return Err((FlowReason::TunnelProtocol, Some(Side::Server))),
        }
    };
    let resp = match Response::from_http(answer.status(), answer.headers()) {
        Ok(r) => r,
        Err(_) => return Err((FlowReason::TunnelProtocol, Some(Side::Server))),
    };
    if !resp.accept() {
        rec.peer_reason = Some(resp.reason.as_str().into());
        return Err((reason, Some(Side::Server)));
    }
    if resp.moves.is_some() && !request.movable {
        // Only a flow that asked may move; a move would take an encrypted one out of TLS.
        rec.peer_reason = Some("dropped-encryption".into());
        return Err((FlowReason::TunnelProtocol, Some(Side::Server)));
    }
    let data = match resp.ticket {
        // Without a move ticket the server's decision wants encryption: the flow stays.
        None => match resp.moves {
            None => Data::Stream(
                H2Stream::new(stream, answer.into_body()),
                InStream::new(&conn),
            ),
            Some(t) => Data::Movable(
                H2Stream::new(stream, answer.into_body()),
                t,
                ip,
                InStream::new(&conn),
            ),
        },
        // Our decision asked for encryption: a server that answers with a ticket (an
        // honest one never does: it encrypts when either end asks) would get the flow in
        // plaintext.
        Some(_) if request.encrypt => {
            rec.peer_reason = Some("dropped-encryption".into());
            return Err((FlowReason::TunnelProtocol, Some(Side::Server)));
        }
        Some(ticket) => {
            let opened = async {
                let mut tcp = match early {
                    Some(mut early) => (&mut early.0)
                        .await
                        .map_err(|_| std::io::Error::from(std::io::ErrorKind::Interrupted))??,
                    // A flow that asked to start in its stream got a ticket of its own
                    // instead: a server that does not move flows (an earlier build of
                    // `segmesh/2`, during an upgrade). Its connection is opened now.
                    None => data_connection(&shared, ip).await?,
                };
                let _ = tcp.set_nodelay(true);
                tcp.write_all(&ticket.preface()).await?;
                // The first bytes went in a stream this server does not read: again here.
                for b in first.as_ref().map_or(&[][..], |f| &f.read[..]) {
                    tcp.write_all(b).await?;
                }
                Ok::<_, std::io::Error>(tcp)
            };
            match opened.await {
                Ok(tcp) => Data::Plain(tcp),
                Err(_) => return Err((FlowReason::TunnelUnreachable, Some(Side::Server))),
            }
        }
    };
    Ok(Negotiated {
        data,
        sent: first.map_or(0, |f| f.sent()),
        tags: conn.tags.clone(),
        reason: resp.reason,
    })
}

/// Opens a flow to the peer's workload `port` with a ticket from its book, on a spare
/// data connection when one is ready (no connection handshake on the flow's path): the
/// server's answer, and the data connection when it accepted.
async fn by_book(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    ip: std::net::IpAddr,
    t: Ticket,
    port: u16,
) -> Result<(Reason, Option<TcpStream>), FlowReason> {
    let (spare, closed) = conn.spare();
    count_data(shared, "spare-closed", closed);
    add_spare(shared, conn, ip);
    let (mut tcp, spared) = match spare {
        Some(tcp) => (tcp, true),
        None => match data_connection(shared, ip).await {
            Ok(tcp) => (tcp, false),
            Err(_) => return Err(FlowReason::TunnelUnreachable),
        },
    };
    count_data(shared, if spared { "spare" } else { "opened" }, 1);
    let _ = tcp.set_nodelay(true);
    let limit = shared.settings.limits.handshake_timeout;
    let preface = t.book_preface(port);
    let mut code = tokio::time::timeout(limit, ask_with(&mut tcp, &preface)).await;
    if spared && matches!(code, Ok(Err(_))) {
        // The peer closed the spare as we took it (before it read a byte: the ticket
        // is unused): once more on a connection of the flow's own.
        count_data(shared, "spare-closed", 1);
        tcp = match data_connection(shared, ip).await {
            Ok(tcp) => tcp,
            Err(_) => return Err(FlowReason::TunnelUnreachable),
        };
        let _ = tcp.set_nodelay(true);
        code = tokio::time::timeout(limit, ask_with(&mut tcp, &preface)).await;
    }
    let code = match code {
        Ok(Ok(c)) => c,
        // Closed, reset or silent: the server would not take the connection.
        _ => return Err(FlowReason::TunnelUnreachable),
    };
    match Reason::from_code(code) {
        Some(Reason::Accepted) => Ok((Reason::Accepted, Some(tcp))),
        Some(r) => Ok((r, None)),
        None => Err(FlowReason::TunnelProtocol),
    }
}

/// Presents a ticket's `preface` (from a book, or a move) on `tcp`: the server's
/// one-byte answer.
async fn ask_with(tcp: &mut TcpStream, preface: &[u8]) -> std::io::Result<u8> {
    tcp.write_all(preface).await?;
    let mut a = [0u8; 1];
    tcp.read_exact(&mut a).await?;
    Ok(a[0])
}

/// Opens a spare data connection to the peer at `ip` for one of `conn`'s next book
/// flows (unless [`MAX_SPARES`](super::conns::MAX_SPARES) are ready or being opened),
/// in the background. One that no flow takes within [`SPARE_AGE`] (or half our
/// handshake timeout, if shorter) is closed: before a byte, which the server does not
/// record. One task per connection closes them, while any is ready.
fn add_spare(shared: &Arc<Shared>, conn: &Arc<Conn>, ip: std::net::IpAddr) {
    if !conn.want_spare() {
        return;
    }
    let (shared, conn) = (shared.clone(), Arc::downgrade(conn));
    tokio::spawn(async move {
        let tcp = data_connection(&shared, ip).await.ok();
        let Some(start) = conn.upgrade().map(|c| c.spare_opened(tcp)) else {
            return;
        };
        if !start {
            return;
        }
        let age = SPARE_AGE.min(shared.settings.limits.handshake_timeout / 2);
        let mut until = Instant::now() + age;
        loop {
            tokio::time::sleep_until(until.into()).await;
            let Some((closed, next)) = conn.upgrade().map(|c| c.sweep(age)) else {
                return;
            };
            count_data(&shared, "spare-expired", closed);
            match next {
                Some(n) => until = n,
                None => return,
            }
        }
    });
}

/// Counts a book flow's data connection by how it came (`spare`, `opened`), and spares
/// that went unused (`spare-expired`) or were found closed when taken or used
/// (`spare-closed`).
fn count_data(shared: &Shared, result: &'static str, n: u64) {
    crate::metrics::count(&shared.metrics.data_connections, result, n);
}

/// A plain connection to the tunnel port of the peer at `ip`, for a flow's bytes
/// (bounded by the connect timeout).
async fn data_connection(shared: &Shared, ip: std::net::IpAddr) -> std::io::Result<TcpStream> {
    let l = &shared.settings.listeners;
    let c = crate::socket::connect(
        SocketAddr::new(ip, l.tunnel),
        l.address,
        shared.settings.socket_mark,
    );
    match tokio::time::timeout(shared.settings.limits.connect_timeout, c).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Opens the connection a movable flow moves to: `ticket` presented to the peer at
/// `ip` and accepted (else the flow stays in its stream).
async fn move_to(shared: Arc<Shared>, ip: std::net::IpAddr, ticket: Ticket) -> Option<TcpStream> {
    let mut tcp = data_connection(&shared, ip).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let limit = shared.settings.limits.handshake_timeout;
    let preface = ticket.move_preface();
    let code = tokio::time::timeout(limit, ask_with(&mut tcp, &preface)).await;
    let accepted = matches!(code, Ok(Ok(c)) if Reason::from_code(c) == Some(Reason::Accepted));
    let result = if accepted {
        "move-accepted"
    } else {
        "move-refused"
    };
    super::tickets::count_n(&shared, result, 1);
    accepted.then_some(tcp)
}

/// Asks the peer for a book of tickets on `conn`, in the background.
fn refill(shared: &Arc<Shared>, conn: &Arc<Conn>) {
    let (limit, conn) = (shared.settings.limits.handshake_timeout, conn.clone());
    let shared = shared.clone();
    tokio::spawn(async move {
        let asked = async {
            let mut send = conn.send.clone().ready().await.ok()?;
            let (answer, _) = send.send_request(book_request(MAX_BOOK), true).ok()?;
            let a = answer.await.ok()?;
            book_from_http(a.status(), a.headers()).ok()
        };
        let got = tokio::time::timeout(limit, asked)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        super::tickets::count_n(&shared, "book-received", got.len() as u64);
        conn.refilled(got);
    });
}

/// A data connection being opened ahead of the answer; aborted when dropped unused.
struct Early(tokio::task::JoinHandle<std::io::Result<TcpStream>>);

impl Drop for Early {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Our PU connects to the registered PU `pu` at `target`.
pub(crate) async fn connect(
    mut rec: Recorder,
    app: TcpStream,
    target: SocketAddr,
    pu: RegisteredPu,
) {
    // Boxed: the negotiation's state (the request's futures, several KiB) is freed when
    // it ends instead of staying part of the flow's task for as long as it relays.
    let mut first = First::of(&app);
    match Box::pin(negotiate(
        &mut rec,
        target,
        &pu,
        FlowPort::tcp(target.port()),
        Some(&mut first),
    ))
    .await
    {
        Ok(n) => carry(rec, app, target.port(), n),
        Err((reason, by)) => rec.reset(app, reason, by),
    }
}

/// Moves the bytes of a negotiated flow to `port` of the peer's workload until it ends,
/// in a task of its own ([`Recorder::finish_after`]).
pub(crate) fn carry(mut rec: Recorder, app: TcpStream, port: u16, n: Negotiated) {
    let Negotiated {
        data,
        sent,
        tags,
        reason,
    } = n;
    let stop = rec.relaying(Peer::Pu(tags), port);
    rec.peer_reason = Some(reason.as_str().into());
    let shared = rec.shared().clone();
    rec.finish_after(async move {
        let idle = shared.settings.limits.idle_timeout;
        let mut moved = match data {
            Data::Stream(s, _in_stream) => tls::relay(app, s, idle, &stop.notify, None).await,
            Data::Movable(s, ticket, ip, in_stream) => {
                let sh = shared.clone();
                let mover = tls::Mover {
                    after: shared.settings.move_after,
                    moving: Default::default(),
                    open: Some(Box::new(move || -> tls::Opening {
                        Box::pin(move_to(sh, ip, ticket))
                    })),
                    company: Some(in_stream),
                };
                tls::relay(app, s, idle, &stop.notify, Some(mover)).await
            }
            Data::Plain(tcp) => {
                let p = Progress::default();
                let k = shared.kernel();
                Moved::plain(splice::relay_until(app, tcp, idle, false, &p, &stop.notify, k).await)
            }
        };
        moved.forward += sent;
        moved
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A socket accepted by tokio, as the enforcer's listeners accept, with `sent`
    /// already waiting on it (looked for without touching tokio's readiness).
    async fn fresh(sent: &[u8]) -> (std::net::TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        app.write_all(sent).unwrap();
        let (s, _) = l.accept().await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let peek = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        while !sent.is_empty()
            && nix::sys::socket::recv(s.as_raw_fd(), &mut [0u8; 1], peek).unwrap_or(0) == 0
        {
            assert!(std::time::Instant::now() < deadline, "the bytes never came");
            std::thread::yield_now();
        }
        (app, s)
    }

    /// The look at a flow's first bytes relies on tokio taking a socket its listener
    /// accepted for readable (tokio 1.54 does: `TcpStream::new_accepted`): what the application sent before is
    /// read at once, and an empty socket is read once, its readiness then cleared, so
    /// that the wait for more does not read it again. A tokio that stops doing so fails
    /// here (the look would then be skipped, and the bytes would follow the request a
    /// moment later instead of going with it).
    #[tokio::test]
    async fn the_first_look_reads_a_fresh_socket_once() {
        let (_app, s) = fresh(b"GET / HTTP/1.1\r\n\r\n").await;
        let mut f = First::of(&s);
        f.look();
        assert_eq!(
            f.read.concat(),
            b"GET / HTTP/1.1\r\n\r\n",
            "the waiting bytes"
        );
        let (_app, s) = fresh(b"").await;
        let mut f = First::of(&s);
        f.look();
        assert!(
            f.read.is_empty() && !f.done,
            "nothing was sent, nothing ended"
        );
        let mut again = false;
        let _ = s.try_io(tokio::io::Interest::READABLE, || {
            again = true;
            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
        });
        assert!(!again, "the empty socket would be read a second time");
    }
}
