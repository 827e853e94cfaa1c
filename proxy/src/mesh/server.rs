//! The tunnel's server role: a peer enforcer connects to our tunnel port. A connection
//! that starts with a ticket preface is an authenticated-only flow's data
//! ([`tickets`](super::tickets)); any other must be TLS whose certificate chains to our
//! bundle and names the PU registered at the address it comes from, then HTTP/2. Each
//! stream is one flow: decided as incoming on the certificate's tags (with the snapshot
//! of the stream's moment), answered, connected to our workload and relayed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use segmesh_api::{CloseReason, FlowReason, Side};
use segmesh_identity::{WorkloadIdentity, peer_identity};
use segmesh_policy::{Direction, FlowPort, Verdict};
use tokio::net::TcpStream;

use super::conns::{CONNECTION_WINDOW, MAX_AGE, MAX_FRAME, SERVER_IDLE, STREAM_WINDOW};
use super::stream::H2Stream;
use super::tickets::{Holder, Pending};
use super::wire::{BOOK_PREFACE_LEN, MAGIC, Reason, Request, Response, book_answer, book_count};
use super::{decide, handshake_result, peer_tags, rejection_of};
use crate::flow::{Flow, Recorder, reason_of};
use crate::metrics::{ErrorKind, Role};
use crate::open::Peer;
use crate::relay::splice::Close;
use crate::relay::{Moved, datagrams, tls};
use crate::snapshot::Snapshot;
use crate::state::Shared;

/// Streams (flows) one connection may have open at once: idle long-lived flows must
/// not hold up new ones, so this is as high as the enforcer's own connection limit.
const MAX_STREAMS: u32 = 16_384;

/// The certificate names the PU registered at the address the connection comes from: a
/// valid certificate presented from another workload's address is an impersonation.
pub(crate) fn registered(snap: &Snapshot, from: SocketAddr, peer: &WorkloadIdentity) -> bool {
    snap.registry
        .get(&from.ip())
        .is_some_and(|r| r.name == peer.name && r.namespace == peer.namespace)
}

/// Serves one connection to the tunnel port from `from`.
pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream, from: SocketAddr) {
    let snap = shared.snapshot();
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    let local = tcp
        .local_addr()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .unwrap_or(from);
    let refusal = |snap: Arc<Snapshot>| refusal(&shared, snap, from, local);
    let server = Some(Side::Server);
    let Some(tls) = snap.tls.clone() else {
        return refusal(snap).refuse(FlowReason::NoIdentity, server);
    };
    // Overload refusals are counted, not each recorded (a flood must not flood the
    // flow log): one address gets a bounded share of the connections that have not
    // proven anything yet. A registered PU's address (its enforcer opens a connection
    // per authenticated-only flow) gets a larger share of those than an unknown one,
    // and the same small share of TLS handshakes.
    let registered_source = snap.registry.contains_key(&from.ip());
    let undecided = if registered_source {
        shared.tickets_by_source.try_acquire(from.ip())
    } else {
        shared.handshakes_by_source.try_acquire(from.ip())
    };
    let Some(undecided) = undecided else {
        shared.error(ErrorKind::Overload);
        return;
    };
    let limit = shared.settings.limits.handshake_timeout;
    // A ticket or a TLS handshake: the first byte tells. Peeked as far as a ticket's
    // preface goes, so that the preface is then read with one syscall.
    let mut first = [0u8; BOOK_PREFACE_LEN];
    match tokio::time::timeout(limit, tcp.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 && first[0] == MAGIC[0] => {
            let seen = &first[..n];
            return super::tickets::serve(shared.clone(), tcp, from, local, seen, undecided).await;
        }
        Ok(Ok(n)) if n > 0 => {}
        // Closed before a byte: nothing was asked (an unused early data connection).
        Ok(_) => return,
        Err(_) => return refusal(snap).refuse(FlowReason::HandshakeTimeout, server),
    }
    // A TLS handshake: a registered PU's address too gets only the small share.
    let per_source = if registered_source {
        drop(undecided);
        match shared.handshakes_by_source.try_acquire(from.ip()) {
            Some(p) => p,
            None => {
                shared.error(ErrorKind::Overload);
                return;
            }
        }
    } else {
        undecided
    };
    // Boxed: a ticket connection's task, which lives as long as its flow, does not
    // carry the (much larger) state of a TLS and HTTP/2 connection.
    Box::pin(serve_tls(shared, tcp, from, local, snap, tls, per_source)).await
}

/// The recorder of a tunnel-port connection refused before any stream.
pub(crate) fn refusal(
    shared: &Arc<Shared>,
    snap: Arc<Snapshot>,
    from: SocketAddr,
    local: SocketAddr,
) -> Recorder {
    let mut flow = Flow::new(Direction::Incoming, from, local);
    flow.destination.pu = Some(snap.pu_qualified());
    Recorder::new(shared, snap, flow)
}

/// Names the peer PU `peer` in `rec` (its SPIFFE ID, and the flow's source PU).
pub(crate) fn identify(rec: &mut Recorder, peer: &WorkloadIdentity) {
    rec.peer_identity = Some(peer.spiffe_id().to_string());
    rec.flow.source.pu = Some(format!("{}:{}", peer.namespace, peer.name));
}

/// The recorder of a flow from `holder`'s peer (over its connection, or with one of its
/// tickets) arriving from `from` at `local`, with `snap`.
pub(crate) fn recorder(
    shared: &Arc<Shared>,
    snap: Arc<Snapshot>,
    from: SocketAddr,
    local: SocketAddr,
    holder: &Holder,
) -> Recorder {
    let mut rec = refusal(shared, snap, from, local);
    identify(&mut rec, &holder.peer);
    rec.resumed = Some(holder.resumed);
    rec
}

/// How a rejecting decision is answered: an enforced policy's, or the default's.
pub(crate) fn rejected_as(d: &segmesh_policy::Decision) -> Reason {
    if d.tier.is_some() {
        Reason::Policy
    } else {
        Reason::Default
    }
}

/// Connects to our workload at `to` for an accepted flow (bounded by the connect
/// timeout; a failure is counted).
pub(crate) async fn connect_workload(shared: &Shared, to: SocketAddr) -> Option<TcpStream> {
    let connect = crate::socket::connect(to, None, shared.settings.socket_mark);
    match tokio::time::timeout(shared.settings.limits.connect_timeout, connect).await {
        Ok(Ok(w)) => {
            let _ = w.set_nodelay(true);
            Some(w)
        }
        _ => {
            shared.error(ErrorKind::ConnectFailed);
            None
        }
    }
}

/// TLS, the peer's identity, then HTTP/2 until the connection ends (`per_source`: the
/// source's share of handshakes in flight, held until the peer is identified).
async fn serve_tls(
    shared: Arc<Shared>,
    tcp: TcpStream,
    from: SocketAddr,
    local: SocketAddr,
    snap: Arc<Snapshot>,
    tls: Arc<segmesh_identity::TlsConfigs>,
    per_source: crate::state::SourcePermit,
) {
    let refusal = |snap: Arc<Snapshot>| refusal(&shared, snap, from, local);
    let server = Some(Side::Server);
    let limit = shared.settings.limits.handshake_timeout;
    let Ok(handshake) = shared.handshakes.clone().try_acquire_owned() else {
        shared.error(ErrorKind::Overload);
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let stream = match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let why = rejection_of(&e);
            handshake_result(&shared, Role::Server, why);
            tracing::info!(%from, reason = why, "tunnel handshake refused");
            return refusal(snap).refuse(FlowReason::PeerCertificate(why.into()), server);
        }
        Err(_) => {
            handshake_result(&shared, Role::Server, "timeout");
            return refusal(snap).refuse(FlowReason::HandshakeTimeout, server);
        }
    };
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    handshake_result(
        &shared,
        Role::Server,
        if resumed { "resumed" } else { "ok" },
    );
    let peer = match peer_identity(stream.get_ref().1) {
        Ok(p) => p,
        Err(e) => {
            let why = e.rejection().as_str().into();
            return refusal(snap).refuse(FlowReason::PeerCertificate(why), server);
        }
    };
    let identified = |snap| {
        let mut rec = refusal(snap);
        identify(&mut rec, &peer);
        rec
    };
    if !registered(&snap, from, &peer) {
        return identified(snap).refuse(FlowReason::Impersonation, server);
    }
    if stream.get_ref().1.alpn_protocol() != Some(segmesh_identity::ALPN) {
        return identified(snap).refuse(FlowReason::BadRequest, server);
    }
    drop(handshake);
    drop(per_source);

    let tags = Arc::new(peer_tags(&peer));
    let conn = Arc::new(Connection {
        shared: shared.clone(),
        from,
        local,
        holder: Arc::new(Holder::new(peer.clone(), tags, from.ip(), resumed)),
        flows: AtomicUsize::new(0),
        streamed: AtomicBool::new(false),
    });
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(MAX_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(16 << 10);
    // The client's HTTP/2 preface: anything else is not our protocol.
    let handshake = b.handshake::<_, Bytes>(stream);
    let mut h2c = match tokio::time::timeout(limit, handshake).await {
        Ok(Ok(c)) => c,
        _ => return identified(shared.snapshot()).refuse(FlowReason::BadRequest, server),
    };
    let started = tokio::time::Instant::now();
    let mut closing = false;
    let mut failed = false;
    loop {
        let idle_since = tokio::time::Instant::now();
        tokio::select! {
            next = h2c.accept() => match next {
                Some(Ok((req, respond))) => {
                    let conn = conn.clone();
                    tokio::spawn(async move { conn.stream(req, respond).await });
                }
                Some(Err(e)) => {
                    failed = !e.is_go_away() && !e.is_io();
                    break;
                }
                None => break,
            },
            // No flow for SERVER_IDLE, the connection's age, or shutdown: no new streams,
            // open ones finish.
            _ = idle_for(&conn, idle_since), if !closing => {
                closing = true;
                h2c.graceful_shutdown();
            }
            _ = tokio::time::sleep_until(started + MAX_AGE), if !closing => {
                closing = true;
                h2c.graceful_shutdown();
            }
            _ = shared.stopping(), if !closing => {
                closing = true;
                h2c.graceful_shutdown();
            }
        }
    }
    // Its tickets' authority was this connection.
    conn.holder.end();
    if !conn.streamed.load(Ordering::Relaxed) {
        // A connection that never carried a stream: either it said nothing we could
        // read (garbage, not HTTP/2) or nothing at all.
        let reason = if failed {
            FlowReason::BadRequest
        } else {
            FlowReason::IdleBeforeRequest
        };
        identified(shared.snapshot()).refuse(reason, server);
    }
}

/// Resolves when `conn` has carried no flow for [`SERVER_IDLE`].
async fn idle_for(conn: &Connection, mut since: tokio::time::Instant) {
    loop {
        if conn.flows.load(Ordering::Relaxed) == 0 {
            tokio::select! {
                _ = tokio::time::sleep_until(since + SERVER_IDLE) => {
                    if conn.flows.load(Ordering::Relaxed) == 0 {
                        return;
                    }
                }
                _ = conn.holder.idle.notified() => {}
            }
        } else {
            conn.holder.idle.notified().await;
        }
        since = tokio::time::Instant::now();
    }
}

/// One authenticated connection from a peer enforcer.
struct Connection {
    shared: Arc<Shared>,
    from: SocketAddr,
    local: SocketAddr,
    /// The peer's identity and tags, for every flow over this connection and for the
    /// tickets of the books issued on it (its `idle` is notified when a flow starts or
    /// ends, or a ticket is used).
    holder: Arc<Holder>,
    /// Flows relaying in streams of this connection.
    flows: AtomicUsize,
    /// Whether any stream arrived.
    streamed: AtomicBool,
}

/// A flow relaying in a stream of the connection (for its idle timer).
struct InStream(Arc<Connection>);

impl InStream {
    fn new(c: &Arc<Connection>) -> InStream {
        c.flows.fetch_add(1, Ordering::Relaxed);
        c.holder.idle.notify_waiters();
        InStream(c.clone())
    }
}

impl Drop for InStream {
    fn drop(&mut self) {
        self.0.flows.fetch_sub(1, Ordering::Relaxed);
        self.0.holder.idle.notify_waiters();
    }
}

/// Answers a stream with `r` and ends it.
fn answer(mut respond: h2::server::SendResponse<Bytes>, r: Response) {
    let _ = respond.send_response(r.to_http(), true);
}

impl Connection {
    /// One stream: a flow's request, answered; an accepted flow's bytes then travel in
    /// it (encrypted) or on the connection its ticket opens.
    async fn stream(
        self: Arc<Self>,
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
    ) {
        self.streamed.store(true, Ordering::Relaxed);
        // Any stream is use: the idle timer starts again.
        self.holder.idle.notify_waiters();
        let shared = &self.shared;
        let server = Some(Side::Server);
        // Decided with the snapshot of now, not the one of the handshake.
        let snap = shared.snapshot();
        // A request for a book is no flow (a malformed one is refused as a bad request
        // below: it is not a CONNECT).
        if let Ok(Some(n)) = book_count(&req) {
            return self.book(snap, respond, n);
        }
        let mut rec = recorder(shared, snap.clone(), self.from, self.local, &self.holder);
        let Ok(r) = Request::from_http(&req) else {
            rec.refuse(FlowReason::BadRequest, server);
            return answer(respond, Response::refused(Reason::BadRequest));
        };
        rec.flow.destination.port = r.port;
        if !registered(&snap, self.from, &self.holder.peer) {
            rec.refuse(FlowReason::Impersonation, server);
            return answer(respond, Response::refused(Reason::Policy));
        }
        let port = if r.udp {
            FlowPort::udp(r.port)
        } else {
            FlowPort::tcp(r.port)
        };
        let d = decide(&snap, Direction::Incoming, &self.holder.tags, port, shared);
        let (verdict, reason) = (d.verdict, reason_of(&d));
        let encrypt = r.encrypt || r.udp || d.encrypt;
        let refused = rejected_as(&d);
        rec.decided(d);
        if verdict == Verdict::Reject {
            rec.refuse(reason, server);
            return answer(respond, Response::refused(refused));
        }
        if !rec.admit() {
            rec.refuse(FlowReason::Overload, server);
            return answer(respond, Response::refused(Reason::Overload));
        }
        let workload_addr = SocketAddr::new(self.local.ip(), r.port);
        let accepted = Response::refused(Reason::Accepted);
        if r.udp {
            let sock = match udp_socket(shared, workload_addr).await {
                Ok(s) => s,
                Err(_) => {
                    shared.error(ErrorKind::ConnectFailed);
                    rec.ended_unrelayed(CloseReason::ConnectFailed);
                    return answer(respond, Response::refused(Reason::Unreachable));
                }
            };
            let Ok(send) = respond.send_response(accepted.to_http(), false) else {
                rec.datagrams = Some((0, 0));
                return rec.finish(Moved::nothing(Close::Error, true));
            };
            let _guard = InStream::new(&self);
            let stream = H2Stream::new(send, req.into_body());
            return serve_udp(rec, stream, sock, workload_addr, self.holder.tags.clone()).await;
        }
        let Some(workload) = connect_workload(shared, workload_addr).await else {
            rec.ended_unrelayed(CloseReason::ConnectFailed);
            return answer(respond, Response::refused(Reason::Unreachable));
        };
        if !encrypt && !r.movable {
            let pending = Pending {
                rec,
                workload,
                holder: self.holder.clone(),
                port: r.port,
            };
            let r = match shared.tickets.issue(shared, pending) {
                Some(ticket) => Response {
                    reason: Reason::Accepted,
                    ticket: Some(ticket),
                    moves: None,
                },
                None => Response::refused(Reason::Overload),
            };
            return answer(respond, r);
        }
        // Neither end wants encryption (else `encrypt`): the flow starts in the stream
        // and its client may move it to a connection of its own.
        let (answer, mover) = if encrypt {
            (accepted, None)
        } else {
            let moving = Arc::new(tls::Moving::default());
            let (ticket, guard) = shared.tickets.issue_move(shared, &self.holder, &moving);
            // The client opens the connection (never `after` anything here); it arrives
            // in `moving`.
            let mover = tls::Mover {
                after: u64::MAX,
                moving,
                open: None,
                company: None,
            };
            let moves = Response {
                moves: Some(ticket),
                ..accepted
            };
            (moves, Some((mover, guard)))
        };
        let Ok(send) = respond.send_response(answer.to_http(), false) else {
            return rec.finish(Moved::nothing(Close::Error, true));
        };
        let guard = InStream::new(&self);
        let stream = H2Stream::new(send, req.into_body());
        let stop = rec.relaying(Peer::Pu(self.holder.tags.clone()), r.port);
        let idle = shared.settings.limits.idle_timeout;
        rec.finish_after(async move {
            let _guard = guard;
            // The move ticket is withdrawn when the flow ends.
            let (mover, _ticket) = mover.unzip();
            // Relayed from the workload's side: the flow's source is the peer.
            tls::relay(workload, stream, idle, &stop.notify, mover)
                .await
                .reversed()
        });
    }

    /// A request for a book of `n` tickets: issued while the peer is still registered
    /// at the connection's address (not a flow: recorded only when refused).
    fn book(&self, snap: Arc<Snapshot>, mut respond: h2::server::SendResponse<Bytes>, n: usize) {
        let shared = &self.shared;
        if !registered(&snap, self.from, &self.holder.peer) {
            recorder(shared, snap, self.from, self.local, &self.holder)
                .refuse(FlowReason::Impersonation, Some(Side::Server));
            return answer(respond, Response::refused(Reason::Policy));
        }
        let tickets = shared.tickets.issue_book(shared, &self.holder, n);
        let _ = respond.send_response(book_answer(&tickets), true);
    }
}

async fn udp_socket(shared: &Shared, target: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let s = tokio::net::UdpSocket::bind(SocketAddr::new(target.ip(), 0)).await?;
    let _ = socket2::SockRef::from(&s).set_mark(shared.settings.socket_mark);
    s.connect(target).await?;
    Ok(s)
}

/// A UDP session to our workload at `target`, its datagrams framed in the stream.
async fn serve_udp(
    mut rec: Recorder,
    stream: H2Stream,
    sock: tokio::net::UdpSocket,
    target: SocketAddr,
    peer: Arc<segmesh_policy::TagSet>,
) {
    let shared = rec.shared().clone();
    let limits = shared.settings.limits;
    let stop = rec.relaying(Peer::Pu(peer), FlowPort::udp(target.port()));
    let local = datagrams::Local {
        sock: &sock,
        early: None,
    };
    let ends = datagrams::Ends {
        idle: limits.udp_idle_timeout,
        stop: &stop.notify,
        evict: None,
        touch: &|| {},
    };
    let (c, close) = datagrams::relay(stream, local, ends).await;
    // The flow's source is the peer: what came out of the tunnel went forward.
    rec.datagrams = Some((c.received, c.sent));
    rec.finish(Moved {
        forward: c.received_bytes,
        backward: c.sent_bytes,
        path: crate::relay::splice::DataPath::Datagrams,
        close,
        tls: true,
        in_tls: 0,
    });
}
