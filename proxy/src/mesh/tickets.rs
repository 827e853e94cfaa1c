//! The server role's tickets for authenticated-only flows. When a stream's flow is
//! accepted without encryption, the server connects to its workload, keeps that
//! connection with the flow's recorder under a fresh random ticket, and answers with the
//! ticket. The client presents it on a plain TCP connection to the tunnel port; the
//! ticket is good once, for [`TTL`], and only from the address the multiplexed
//! connection that asked for it came from (the address registered for the client's
//! certificate): a replayed ticket is unknown, a stolen one comes from the wrong address.
//!
//! Books: a client may also ask, on its multiplexed connection, for tickets that stand
//! for the connection's identity instead of for one flow ([`Tickets::issue_book`]).
//! One such ticket opens one flow without a request on the connection: presented with
//! the flow's port on a plain TCP connection ([`serve`]), it is redeemed (single use,
//! from its holder's address, within [`BOOK_TTL`], while the connection it was issued on
//! lives) and the flow is decided there, on the tags of that connection's certificate,
//! with the snapshot of the moment. A connection holds at most [`BOOK_PER_CONNECTION`]
//! unused tickets and the enforcer [`MAX_BOOKED`].
//!
//! Moves: an authenticated-only flow relaying in its stream has a ticket that moves it
//! to the plain connection it is presented on ([`Tickets::issue_move`]): once, from the
//! address of the connection the stream is on, while the flow relays.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use segmesh_api::{CloseReason, FlowReason, Side};
use segmesh_identity::WorkloadIdentity;
use segmesh_policy::{Direction, FlowPort, Verdict};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::decide;
use super::server::registered;
use super::wire::{BOOK_PREFACE_LEN, MAGIC, MAGIC_BOOK, MAGIC_MOVE, PREFACE_LEN, Reason, Ticket};
use crate::flow::{Recorder, reason_of};
use crate::metrics::ErrorKind;
use crate::open::Peer;
use crate::relay::Moved;
use crate::relay::splice::{self, Progress};
use crate::relay::tls::Moving;
use crate::state::Shared;

/// How long a ticket waits for its connection (expired ones are swept every
/// [`SWEEP`]).
pub const TTL: Duration = Duration::from_secs(10);
const SWEEP: Duration = Duration::from_secs(1);
/// Tickets waiting at most (each also holds a connection permit).
pub const MAX_PENDING: usize = 8192;
/// How long a ticket from a book is good for. A client uses its tickets for
/// [`BOOK_USE`] only, so that one in flight does not expire on the way.
pub const BOOK_TTL: Duration = Duration::from_secs(60);
pub const BOOK_USE: Duration = Duration::from_secs(50);
/// Unused tickets from books, per connection and in all.
pub const BOOK_PER_CONNECTION: usize = 256;
pub const MAX_BOOKED: usize = 65_536;

/// What a book's tickets stand for: the identity of the multiplexed connection they
/// were issued on, checked by its handshake.
pub(crate) struct Holder {
    pub peer: WorkloadIdentity,
    pub tags: Arc<segmesh_policy::TagSet>,
    /// The address the connection came from (the tickets are good from it only).
    pub from: IpAddr,
    pub resumed: bool,
    /// False once the connection has ended: its tickets are void.
    alive: AtomicBool,
    /// Its tickets issued and not yet used, expired or swept.
    outstanding: AtomicUsize,
    /// Notified when the connection is used (a flow starts or ends on it, or one of its
    /// tickets opens a flow): its idle timer starts again.
    pub idle: tokio::sync::Notify,
}

impl Holder {
    pub(crate) fn new(
        peer: WorkloadIdentity,
        tags: Arc<segmesh_policy::TagSet>,
        from: IpAddr,
        resumed: bool,
    ) -> Holder {
        Holder {
            peer,
            tags,
            from,
            resumed,
            alive: AtomicBool::new(true),
            outstanding: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
        }
    }

    /// The connection ended: its unused tickets are good no more.
    pub(crate) fn end(&self) {
        self.alive.store(false, Ordering::Relaxed);
    }
}

/// An accepted flow waiting for its data connection.
pub(crate) struct Pending {
    pub rec: Recorder,
    pub workload: TcpStream,
    /// The connection that asked: its peer, tags and address (the ticket is good from
    /// that address only).
    pub holder: Arc<Holder>,
    pub port: u16,
}

/// A flow relaying in a stream whose client may move it to a connection of its own.
struct Movable {
    /// The connection the stream is on (the move is good from its address only).
    holder: Arc<Holder>,
    /// Where the flow takes its connection (gone once the flow has ended).
    to: Weak<Moving>,
}

#[derive(Default)]
pub(crate) struct Tickets {
    pending: Mutex<HashMap<Ticket, (Pending, Instant)>>,
    booked: Mutex<HashMap<Ticket, (Arc<Holder>, Instant)>>,
    /// One per movable flow, for as long as it relays in its stream (bounded by the
    /// flows admitted).
    moving: Mutex<HashMap<Ticket, Movable>>,
    sweeping: AtomicBool,
}

/// A movable flow's ticket: withdrawn when dropped (the flow has ended).
pub(crate) struct MoveTicket {
    shared: Arc<Shared>,
    ticket: Ticket,
}

impl Drop for MoveTicket {
    fn drop(&mut self) {
        let mut moving = self.shared.tickets.moving.lock().expect("lock poisoned");
        moving.remove(&self.ticket);
    }
}

fn count(shared: &Shared, result: &'static str) {
    count_n(shared, result, 1);
}

pub(crate) fn count_n(shared: &Shared, result: &'static str, n: u64) {
    crate::metrics::count(&shared.metrics.tickets, result, n);
}

impl Tickets {
    /// Keeps `p` under a new ticket; none when the table is full (the flow is then
    /// refused as an overload, and recorded).
    pub(crate) fn issue(&self, shared: &Arc<Shared>, p: Pending) -> Option<Ticket> {
        let t = Ticket::random();
        {
            let mut pending = self.pending.lock().expect("lock poisoned");
            if pending.len() >= MAX_PENDING {
                drop(pending);
                count(shared, "full");
                shared.error(ErrorKind::Overload);
                p.rec.refuse(FlowReason::Overload, Some(Side::Server));
                return None;
            }
            pending.insert(t, (p, Instant::now() + TTL));
        }
        count(shared, "issued");
        self.sweep_from(shared);
        Some(t)
    }

    fn sweep_from(&self, shared: &Arc<Shared>) {
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(shared)));
        }
    }

    /// Up to `n` new tickets for `holder`'s connection: fewer, or none, at its bound or
    /// the enforcer's.
    pub(crate) fn issue_book(
        &self,
        shared: &Arc<Shared>,
        holder: &Arc<Holder>,
        n: usize,
    ) -> Vec<Ticket> {
        let mut out = Vec::new();
        {
            let mut booked = self.booked.lock().expect("lock poisoned");
            let held = holder.outstanding.load(Ordering::Relaxed);
            let room = BOOK_PER_CONNECTION
                .saturating_sub(held)
                .min(MAX_BOOKED.saturating_sub(booked.len()))
                .min(n);
            let expires = Instant::now() + BOOK_TTL;
            // 256 random bits each: a collision is not going to happen, and would only
            // leave one out.
            for t in Ticket::random_n(room) {
                if let Entry::Vacant(v) = booked.entry(t) {
                    v.insert((holder.clone(), expires));
                    out.push(t);
                }
            }
            holder.outstanding.fetch_add(out.len(), Ordering::Relaxed);
        }
        if out.len() < n {
            count(shared, "book-full");
        }
        count_n(shared, "book-issued", out.len() as u64);
        self.sweep_from(shared);
        out
    }

    /// Takes the ticket `t` from a book when presented from `from`: what it stands for.
    fn redeem_book(&self, t: &Ticket, from: IpAddr) -> Result<Arc<Holder>, Refused> {
        let mut booked = self.booked.lock().expect("lock poisoned");
        let now = Instant::now();
        // Expired, or its connection gone, but not swept yet: as good as gone.
        let good = |(h, expires): &(Arc<Holder>, Instant)| {
            *expires > now && h.alive.load(Ordering::Relaxed)
        };
        let (h, _) = take(&mut booked, t, from, |(h, _)| h, good)?;
        h.outstanding.fetch_sub(1, Ordering::Relaxed);
        // The connection is in use (its idle timer starts again).
        h.idle.notify_waiters();
        Ok(h)
    }

    /// A ticket that moves a flow relaying in a stream of `holder`'s connection to the
    /// connection it is presented on, which goes to `to`: the ticket and its guard (the
    /// flow keeps it while it relays).
    pub(crate) fn issue_move(
        &self,
        shared: &Arc<Shared>,
        holder: &Arc<Holder>,
        to: &Arc<Moving>,
    ) -> (Ticket, MoveTicket) {
        let ticket = Ticket::random();
        let m = Movable {
            holder: holder.clone(),
            to: Arc::downgrade(to),
        };
        self.moving.lock().expect("lock poisoned").insert(ticket, m);
        count(shared, "move-issued");
        let guard = MoveTicket {
            shared: shared.clone(),
            ticket,
        };
        (ticket, guard)
    }

    /// Takes the movable flow of `t` when presented from `from`.
    fn redeem_move(&self, t: &Ticket, from: IpAddr) -> Result<Arc<Moving>, Refused> {
        let mut moving = self.moving.lock().expect("lock poisoned");
        let m = take(&mut moving, t, from, |m| &m.holder, |_| true)?;
        // Its flow has ended (its guard is being dropped): as good as gone.
        m.to.upgrade().ok_or(Refused::Unknown)
    }

    /// Takes the flow of `t` when presented from `from`.
    fn redeem(&self, t: &Ticket, from: IpAddr) -> Result<Pending, Refused> {
        let mut pending = self.pending.lock().expect("lock poisoned");
        let now = Instant::now();
        // Expired but not swept yet: as good as gone.
        let good = |(_, expires): &(Pending, Instant)| *expires > now;
        Ok(take(&mut pending, t, from, |(p, _)| &p.holder, good)?.0)
    }
}

/// Takes ticket `t` out of `table` when presented from `from`: unknown when absent or
/// no longer `good`; refused, and left in place, when its `holder` is at another
/// address (the rightful holder can still use it: a thief cannot burn it).
fn take<V>(
    table: &mut HashMap<Ticket, V>,
    t: &Ticket,
    from: IpAddr,
    holder: impl Fn(&V) -> &Holder,
    good: impl Fn(&V) -> bool,
) -> Result<V, Refused> {
    let v = table.get(t).filter(|v| good(v)).ok_or(Refused::Unknown)?;
    let h = holder(v);
    if h.from != from {
        return Err(Refused::Address(h.peer.spiffe_id().to_string()));
    }
    Ok(table.remove(t).expect("present"))
}

/// A refused ticket counted as `names`' unknown or address result: the reason to
/// record, and the SPIFFE ID of the ticket's holder where it was someone else's.
fn refused(shared: &Shared, r: Refused, names: [&'static str; 2]) -> (FlowReason, Option<String>) {
    match r {
        Refused::Unknown => {
            count(shared, names[0]);
            (FlowReason::TicketUnknown, None)
        }
        Refused::Address(holder) => {
            count(shared, names[1]);
            (FlowReason::TicketAddress, Some(holder))
        }
    }
}

/// Ends the flows of expired tickets, every [`SWEEP`], for as long as the enforcer
/// lives (one task, not one per ticket).
async fn sweep(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(SWEEP).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        let expired: Vec<Pending> = {
            let mut pending = shared.tickets.pending.lock().expect("lock poisoned");
            let gone: Vec<Ticket> = pending
                .iter()
                .filter(|(_, (_, e))| *e <= now)
                .map(|(t, _)| *t)
                .collect();
            gone.iter()
                .filter_map(|t| pending.remove(t))
                .map(|(p, _)| p)
                .collect()
        };
        for p in expired {
            count(&shared, "expired");
            // Allowed, but no byte ever came: recorded like a flow that idled out.
            p.rec.ended_unrelayed(CloseReason::Idle);
        }
        let void = {
            let mut booked = shared.tickets.booked.lock().expect("lock poisoned");
            let before = booked.len();
            booked.retain(|_, (h, e)| {
                let keep = *e > now && h.alive.load(Ordering::Relaxed);
                if !keep {
                    h.outstanding.fetch_sub(1, Ordering::Relaxed);
                }
                keep
            });
            before - booked.len()
        };
        if void > 0 {
            count_n(&shared, "book-void", void as u64);
        }
    }
}

enum Refused {
    Unknown,
    /// The SPIFFE ID of the ticket's holder.
    Address(String),
}

/// A plain connection to the tunnel port that starts with a ticket preface (the caller
/// peeked its first byte and holds the handshake permits until this returns or starts
/// relaying).
pub(crate) async fn serve(
    shared: Arc<Shared>,
    mut tcp: TcpStream,
    from: SocketAddr,
    local: SocketAddr,
    seen: &[u8],
    permits: impl Send,
) {
    let mut p = [0u8; BOOK_PREFACE_LEN];
    let read = tokio::time::timeout(shared.settings.limits.handshake_timeout, async {
        // The magic tells the preface's length: when the peek saw it, the whole
        // preface is read at once; otherwise the magic first.
        let at = match seen.first_chunk::<{ MAGIC.len() }>() {
            Some(magic) => {
                p[..MAGIC.len()].copy_from_slice(magic);
                0
            }
            None => {
                tcp.read_exact(&mut p[..MAGIC.len()]).await?;
                MAGIC.len()
            }
        };
        let len = if p[..MAGIC_BOOK.len()] == MAGIC_BOOK {
            BOOK_PREFACE_LEN
        } else {
            PREFACE_LEN
        };
        tcp.read_exact(&mut p[at..len]).await?;
        Ok::<_, std::io::Error>(len)
    })
    .await;
    let refuse = |reason: FlowReason, holder: Option<String>| {
        let mut rec = super::server::refusal(&shared, shared.snapshot(), from, local);
        rec.peer_identity = holder;
        rec.refuse(reason, Some(Side::Server));
    };
    let len = match read {
        Ok(Ok(len)) => len,
        Ok(Err(_)) => return refuse(FlowReason::BadRequest, None),
        Err(_) => return refuse(FlowReason::HandshakeTimeout, None),
    };
    if len == BOOK_PREFACE_LEN {
        let Ok((ticket, port)) = Ticket::from_book_preface(&p) else {
            return refuse(FlowReason::BadRequest, None);
        };
        drop(permits);
        return serve_book(shared, tcp, from, local, ticket, port).await;
    }
    if p[..MAGIC_MOVE.len()] == MAGIC_MOVE {
        let Some(Ok(ticket)) = p
            .first_chunk::<PREFACE_LEN>()
            .map(Ticket::from_move_preface)
        else {
            return refuse(FlowReason::BadRequest, None);
        };
        return match shared.tickets.redeem_move(&ticket, from.ip()) {
            Ok(to) => {
                let _ = tcp.set_nodelay(true);
                answer(&tcp, Reason::Accepted);
                count(&shared, "move-redeemed");
                // The flow's relay takes it from here.
                let _ = to.conn.set(tcp);
            }
            Err(r) => {
                answer(&tcp, Reason::Ticket);
                let (why, holder) = refused(&shared, r, ["move-unknown", "move-address"]);
                refuse(why, holder)
            }
        };
    }
    let ticket = match p.first_chunk::<PREFACE_LEN>().map(Ticket::from_preface) {
        Some(Ok(t)) => t,
        _ => return refuse(FlowReason::BadRequest, None),
    };
    drop(permits);
    let Pending {
        mut rec,
        workload,
        holder,
        port,
    } = match shared.tickets.redeem(&ticket, from.ip()) {
        Ok(p) => p,
        Err(r) => {
            let (why, holder) = refused(&shared, r, ["unknown", "address"]);
            return refuse(why, holder);
        }
    };
    count(&shared, "redeemed");
    // The flow's source is the data connection.
    rec.flow.source = crate::flow::endpoint(from);
    super::server::identify(&mut rec, &holder.peer);
    // Registrations may have changed since the ticket was issued.
    let snap = shared.snapshot();
    if !registered(&snap, from, &holder.peer) {
        rec.use_snapshot(snap);
        shared.error(ErrorKind::Reset);
        crate::socket::reset(workload);
        return rec.refuse(FlowReason::Impersonation, Some(Side::Server));
    }
    // Decided again here if a snapshot came since the ticket's decision.
    relay(rec, tcp, workload, holder.tags.clone(), port);
}

/// Splices an accepted flow between its ticket's connection and our workload, in a task
/// of its own (re-decided from here on, on the peer's `tags`, when snapshots come).
fn relay(
    mut rec: Recorder,
    tcp: TcpStream,
    workload: TcpStream,
    tags: Arc<segmesh_policy::TagSet>,
    port: u16,
) {
    let stop = rec.relaying(Peer::Pu(tags), port);
    let shared = rec.shared().clone();
    rec.finish_after(async move {
        let progress = Progress::default();
        let idle = shared.settings.limits.idle_timeout;
        let k = shared.kernel();
        let o = splice::relay_until(tcp, workload, idle, false, &progress, &stop.notify, k).await;
        Moved::plain(o)
    });
}

/// Answers a book ticket's connection with `r` (one byte into an empty send buffer:
/// never blocks, so never awaited).
fn answer(tcp: &TcpStream, r: Reason) {
    let _ = tcp.try_write(&[r.code()]);
}

/// A flow opened with a ticket from a book, for our workload's `port`: the ticket
/// redeemed, the flow decided on the tags of the connection it was issued on, our
/// workload connected, then relayed.
async fn serve_book(
    shared: Arc<Shared>,
    tcp: TcpStream,
    from: SocketAddr,
    local: SocketAddr,
    ticket: Ticket,
    port: u16,
) {
    let server = Some(Side::Server);
    let snap = shared.snapshot();
    let recorder = |holder: Option<&Holder>| {
        let mut rec = match holder {
            Some(h) => super::server::recorder(&shared, snap.clone(), from, local, h),
            None => super::server::refusal(&shared, snap.clone(), from, local),
        };
        rec.flow.destination.port = port;
        rec
    };
    let holder = match shared.tickets.redeem_book(&ticket, from.ip()) {
        Ok(h) => h,
        Err(r) => {
            answer(&tcp, Reason::Ticket);
            let (why, holder) = refused(&shared, r, ["book-unknown", "book-address"]);
            let mut rec = recorder(None);
            rec.peer_identity = holder;
            return rec.refuse(why, server);
        }
    };
    count(&shared, "book-redeemed");
    // Registrations may have changed since the ticket was issued.
    if !registered(&snap, from, &holder.peer) {
        answer(&tcp, Reason::Policy);
        return recorder(Some(&holder)).refuse(FlowReason::Impersonation, server);
    }
    let d = decide(
        &snap,
        Direction::Incoming,
        &holder.tags,
        FlowPort::tcp(port),
        &shared,
    );
    if d.verdict == Verdict::Allow && d.encrypt {
        // Not a refusal: the client asks again on a stream, encrypted, and that flow is
        // decided and recorded. This connection carried none.
        answer(&tcp, Reason::Encrypt);
        return;
    }
    let mut rec = recorder(Some(&holder));
    let tags = holder.tags.clone();
    drop(holder);
    let reason = reason_of(&d);
    let refused = super::server::rejected_as(&d);
    let verdict = d.verdict;
    rec.decided(d);
    if verdict == Verdict::Reject {
        answer(&tcp, refused);
        return rec.refuse(reason, server);
    }
    if !rec.admit() {
        answer(&tcp, Reason::Overload);
        return rec.refuse(FlowReason::Overload, server);
    }
    let to = SocketAddr::new(local.ip(), port);
    let Some(workload) = super::server::connect_workload(&shared, to).await else {
        answer(&tcp, Reason::Unreachable);
        return rec.ended_unrelayed(CloseReason::ConnectFailed);
    };
    answer(&tcp, Reason::Accepted);
    relay(rec, tcp, workload, tags, port);
}
