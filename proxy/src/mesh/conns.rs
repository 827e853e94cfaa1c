//! The client role's connections: one long-lived HTTP/2 connection over mTLS per peer
//! enforcer, made on the first flow to that peer and shared by every flow after it (each
//! flow one stream, see [`wire`](super::wire)). A flow pays no handshake unless it is the
//! first to the peer, the connection broke, our certificate changed, or it sat idle for
//! [`CLIENT_IDLE`] (the server closes connections idle for [`SERVER_IDLE`], longer, so a
//! client never picks a connection the server is closing).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls_pki_types::ServerName;
use segmesh_identity::{TlsConfigs, WorkloadIdentity, peer_identity};

use super::tickets::BOOK_USE;
use super::wire::{MAX_BOOK, Ticket};
use super::{handshake_result, rejection_of};
use crate::metrics::{ErrorKind, Role};
use crate::state::Shared;

/// A connection with no flow for this long is not used again (the server closes it
/// after [`SERVER_IDLE`]).
pub const CLIENT_IDLE: Duration = Duration::from_secs(20);
/// How long a server keeps a connection that carries no flow.
pub const SERVER_IDLE: Duration = Duration::from_secs(30);
/// A connection is replaced after this long even when busy (its flows go on), so that
/// certificates and registrations are checked again by a fresh handshake.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// Flow-control windows: per stream (one flow) and per connection. Large enough for one
/// bulk flow to fill a fast link; what a peer can make us buffer per flow is bounded by
/// the stream window.
pub const STREAM_WINDOW: u32 = 1 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// HTTP/2 frames up to 64 KiB: fewer frames per byte (TLS cuts its own records).
pub const MAX_FRAME: u32 = 64 << 10;

/// Why no tunnel connection could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EstablishError {
    #[error("the peer's tunnel port cannot be reached")]
    Unreachable,
    #[error("the peer's certificate was refused: {0}")]
    PeerCertificate(&'static str),
    #[error("the TLS handshake did not finish in time")]
    HandshakeTimeout,
    #[error("too many tunnel handshakes in flight")]
    Overload,
}

/// An established connection to a peer enforcer, its identity checked.
pub(crate) struct Conn {
    pub send: h2::client::SendRequest<Bytes>,
    /// Set when the connection ended (its task finished).
    closed: Arc<AtomicBool>,
    pub peer: WorkloadIdentity,
    /// The peer's tags ([`super::peer_tags`]), for every flow over this connection.
    pub tags: Arc<segmesh_policy::TagSet>,
    /// Whether its TLS session was resumed.
    pub resumed: bool,
    created: Instant,
    last_used: Mutex<Instant>,
    /// The configuration it was made with: a rotated certificate retires it.
    tls: Arc<TlsConfigs>,
    /// Tickets from the peer's books, each good for one authenticated-only flow.
    book: Mutex<Book>,
    /// Plain connections to the peer's tunnel port opened ahead of the book flows that
    /// will take them.
    spares: Mutex<Spares>,
    /// Flows in their streams on this connection now ([`InStream`]).
    streams: Arc<AtomicUsize>,
}

/// A flow in its stream on a connection: counted in the connection's
/// [`Conn::streams`] until it ends or moves to a connection of its own
/// ([`InStream::leave`]).
pub(crate) struct InStream {
    streams: Arc<AtomicUsize>,
    left: AtomicBool,
}

impl InStream {
    pub(crate) fn new(conn: &Conn) -> InStream {
        conn.streams.fetch_add(1, Ordering::Relaxed);
        InStream {
            streams: conn.streams.clone(),
            left: AtomicBool::new(false),
        }
    }

    /// Flows in streams on the connection now, this one included (unless it left).
    pub(crate) fn company(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// The flow is no longer in its stream (it moved): no longer counted.
    pub(crate) fn leave(&self) {
        if !self.left.swap(true, Ordering::Relaxed) {
            self.streams.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InStream {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Data connections opened ahead of use, oldest first, each with when it connected.
#[derive(Default)]
struct Spares {
    ready: VecDeque<(Instant, tokio::net::TcpStream)>,
    /// Being connected.
    opening: usize,
    /// A task closes spares as they age out (one per connection, while any is ready).
    sweeping: bool,
}

/// At most this many spare data connections per peer, ready or being opened: one flow
/// after another keeps one; flows that start together keep as many as started at once.
pub const MAX_SPARES: usize = 8;
/// A spare unused for this long is closed. The server closes a connection that said
/// nothing after its handshake timeout (and records that): a spare is kept for at most
/// half of ours, which meshes configure alike.
pub const SPARE_AGE: Duration = Duration::from_secs(1);

/// A connection's unused tickets, oldest first, with when each came.
#[derive(Default)]
struct Book {
    tickets: VecDeque<(Ticket, Instant)>,
    /// A request for more is out.
    asking: bool,
    /// No request before this (the last one got nothing).
    quiet_until: Option<Instant>,
}

/// A book is asked for more when it holds fewer tickets than this.
const BOOK_LOW: usize = MAX_BOOK / 2;
/// After a request for tickets that got none, how long before the next.
const BOOK_QUIET: Duration = Duration::from_secs(1);

impl Conn {
    fn usable(&self, tls: &Arc<TlsConfigs>) -> bool {
        let idle = self.last_used.lock().expect("lock poisoned").elapsed();
        !self.closed.load(Ordering::Relaxed)
            && Arc::ptr_eq(&self.tls, tls)
            && idle < CLIENT_IDLE
            && self.created.elapsed() < MAX_AGE
    }

    fn touch(&self) {
        *self.last_used.lock().expect("lock poisoned") = Instant::now();
    }

    /// A ticket from the book if it holds one young enough, and whether the caller
    /// should ask for more ([`Conn::refilled`] when the answer came; one request at a
    /// time).
    pub(crate) fn ticket(&self) -> (Option<Ticket>, bool) {
        let mut b = self.book.lock().expect("lock poisoned");
        let now = Instant::now();
        while b
            .tickets
            .front()
            .is_some_and(|(_, at)| now - *at >= BOOK_USE)
        {
            b.tickets.pop_front();
        }
        let t = b.tickets.pop_front().map(|(t, _)| t);
        let ask = b.tickets.len() < BOOK_LOW && !b.asking && b.quiet_until.is_none_or(|q| now >= q);
        if ask {
            b.asking = true;
        }
        (t, ask)
    }

    /// The answer to a request for tickets (none: it failed or the server had none).
    pub(crate) fn refilled(&self, tickets: Vec<Ticket>) {
        let mut b = self.book.lock().expect("lock poisoned");
        let now = Instant::now();
        b.asking = false;
        b.quiet_until = tickets.is_empty().then(|| now + BOOK_QUIET);
        b.tickets.extend(tickets.into_iter().map(|t| (t, now)));
    }

    /// The server refused a ticket from the book as unknown: the rest are likely void
    /// too (its connection state was lost); the next flows ask on streams.
    pub(crate) fn void_book(&self) {
        self.book.lock().expect("lock poisoned").tickets.clear();
    }

    /// The newest spare data connection that the peer has not closed, and how many
    /// were dropped to find it (a spare the peer wrote to or closed: an honest server
    /// says nothing first).
    pub(crate) fn spare(&self) -> (Option<tokio::net::TcpStream>, u64) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut s = self.spares.lock().expect("lock poisoned");
        let mut dropped = 0;
        while let Some((_, tcp)) = s.ready.pop_back() {
            // The reactor's readiness, no syscall: nothing arrived on a live spare.
            if tcp.poll_read_ready(&mut cx).is_pending() {
                return (Some(tcp), dropped);
            }
            dropped += 1;
        }
        (None, dropped)
    }

    /// Whether to open a spare: fewer than [`MAX_SPARES`] are ready or being opened
    /// (counted as being opened from here on; [`Conn::spare_opened`] when done).
    pub(crate) fn want_spare(&self) -> bool {
        let mut s = self.spares.lock().expect("lock poisoned");
        if s.ready.len() + s.opening >= MAX_SPARES || self.closed.load(Ordering::Relaxed) {
            return false;
        }
        s.opening += 1;
        true
    }

    /// A spare was connected (or could not be): whether the caller is to start the
    /// sweeper ([`Conn::sweep`]), which no task runs yet.
    pub(crate) fn spare_opened(&self, tcp: Option<tokio::net::TcpStream>) -> bool {
        let mut s = self.spares.lock().expect("lock poisoned");
        s.opening -= 1;
        let Some(tcp) = tcp else { return false };
        s.ready.push_back((Instant::now(), tcp));
        !std::mem::replace(&mut s.sweeping, true)
    }

    /// Closes the spares older than `age`: how many, and when the oldest left will be
    /// that old (none: the sweeper stops, and the next spare starts another).
    pub(crate) fn sweep(&self, age: Duration) -> (u64, Option<Instant>) {
        let mut s = self.spares.lock().expect("lock poisoned");
        let now = Instant::now();
        let mut closed = 0;
        while s.ready.front().is_some_and(|(at, _)| now - *at >= age) {
            s.ready.pop_front();
            closed += 1;
        }
        let next = s.ready.front().map(|(at, _)| *at + age);
        s.sweeping = next.is_some();
        (closed, next)
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>;

/// The connections by peer tunnel address.
#[derive(Default)]
pub(crate) struct Conns {
    peers: Mutex<HashMap<SocketAddr, Slot>>,
}

impl Conns {
    /// The connection to the enforcer at `ip`, and whether it was made for this flow.
    /// Flows that arrive while it is being made wait for it (one handshake per peer).
    pub(crate) async fn get(
        &self,
        shared: &Shared,
        tls: &Arc<TlsConfigs>,
        ip: IpAddr,
    ) -> Result<(Arc<Conn>, bool), EstablishError> {
        let addr = SocketAddr::new(ip, shared.settings.listeners.tunnel);
        let slot = self
            .peers
            .lock()
            .expect("lock poisoned")
            .entry(addr)
            .or_default()
            .clone();
        let mut held = slot.lock().await;
        if let Some(c) = held.as_ref().filter(|c| c.usable(tls)) {
            c.touch();
            return Ok((c.clone(), false));
        }
        // A connection replaced here keeps carrying its open flows, then closes.
        *held = None;
        let Ok(_permit) = shared.handshakes.clone().try_acquire_owned() else {
            shared.error(ErrorKind::Overload);
            return Err(EstablishError::Overload);
        };
        let c = Arc::new(establish(shared, tls, addr).await?);
        *held = Some(c.clone());
        Ok((c, true))
    }

    /// Forgets `conn` (it failed a request): the next flow makes a new one.
    pub(crate) async fn discard(&self, ip: IpAddr, port: u16, conn: &Arc<Conn>) {
        let slot = self
            .peers
            .lock()
            .expect("lock poisoned")
            .get(&SocketAddr::new(ip, port))
            .cloned();
        if let Some(slot) = slot {
            let mut held = slot.lock().await;
            if held.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
                *held = None;
            }
        }
    }
}

/// TCP, TLS, the peer's identity and the HTTP/2 preface.
async fn establish(
    shared: &Shared,
    tls: &Arc<TlsConfigs>,
    addr: SocketAddr,
) -> Result<Conn, EstablishError> {
    let listeners = &shared.settings.listeners;
    let limits = &shared.settings.limits;
    let connect = crate::socket::connect(addr, listeners.address, shared.settings.socket_mark);
    let tcp = match tokio::time::timeout(limits.connect_timeout, connect).await {
        Ok(Ok(t)) => t,
        Ok(Err(_)) | Err(_) => {
            shared.error(ErrorKind::ConnectFailed);
            return Err(EstablishError::Unreachable);
        }
    };
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
    let handshake = connector.connect(ServerName::IpAddress(addr.ip().into()), tcp);
    let stream = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let why = rejection_of(&e);
            handshake_result(shared, Role::Client, why);
            return Err(EstablishError::PeerCertificate(why));
        }
        Err(_) => {
            handshake_result(shared, Role::Client, "timeout");
            return Err(EstablishError::HandshakeTimeout);
        }
    };
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    handshake_result(shared, Role::Client, if resumed { "resumed" } else { "ok" });
    let peer = peer_identity(stream.get_ref().1)
        .map_err(|e| EstablishError::PeerCertificate(e.rejection().as_str()))?;
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(16 << 10);
    let handshake = b.handshake::<_, Bytes>(stream);
    let (send, conn) = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
        Ok(Ok(c)) => c,
        _ => return Err(EstablishError::HandshakeTimeout),
    };
    let closed = Arc::new(AtomicBool::new(false));
    let ended = closed.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, peer = %addr, "tunnel connection ended");
        }
        ended.store(true, Ordering::Relaxed);
    });
    let now = Instant::now();
    Ok(Conn {
        send,
        closed,
        tags: Arc::new(super::peer_tags(&peer)),
        peer,
        resumed,
        created: now,
        last_used: Mutex::new(now),
        tls: tls.clone(),
        book: Mutex::default(),
        spares: Mutex::default(),
        streams: Arc::default(),
    })
}
