//! The server role's tickets for authenticated-only flows. When a stream's flow is
//! accepted without encryption, the server connects to its workload, keeps that
//! connection with the flow's recorder under a fresh random ticket, and answers with the
//! ticket. The client presents it on a plain TCP connection to the tunnel port; the
//! ticket is good once, for [`TTL`], and only from the address the multiplexed
//! connection that asked for it came from (the address registered for the client's
//! certificate): a replayed ticket is unknown, a stolen one comes from the wrong address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use segmesh_api::{CloseReason, FlowReason, Side};
use segmesh_identity::WorkloadIdentity;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::server::registered;
use super::wire::{PREFACE_LEN, Ticket};
use crate::flow::Recorder;
use crate::metrics::{ErrorKind, PoolLabels};
use crate::open::Peer;
use crate::relay::Moved;
use crate::relay::splice::{self, Progress};
use crate::state::Shared;

/// How long a ticket waits for its connection (expired ones are swept every
/// [`SWEEP`]).
pub const TTL: Duration = Duration::from_secs(10);
const SWEEP: Duration = Duration::from_secs(1);
/// Tickets waiting at most (each also holds a connection permit).
pub const MAX_PENDING: usize = 8192;

/// An accepted flow waiting for its data connection.
pub(crate) struct Pending {
    pub rec: Recorder,
    pub workload: TcpStream,
    /// The address the ticket is good from.
    pub holder: IpAddr,
    pub peer: WorkloadIdentity,
    pub tags: Arc<segmesh_policy::TagSet>,
    pub port: u16,
}

#[derive(Default)]
pub(crate) struct Tickets {
    pending: Mutex<HashMap<Ticket, (Pending, Instant)>>,
    sweeping: AtomicBool,
}

fn count(shared: &Shared, result: &'static str) {
    shared
        .metrics
        .tickets
        .get_or_create(&PoolLabels { result })
        .inc();
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
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(shared)));
        }
        Some(t)
    }

    /// Takes the flow of `t` when presented from `from`.
    fn redeem(&self, t: &Ticket, from: IpAddr) -> Result<Pending, Refused> {
        let mut pending = self.pending.lock().expect("lock poisoned");
        match pending.get(t) {
            // Expired but not swept yet: as good as gone.
            None => Err(Refused::Unknown),
            Some((_, expires)) if *expires <= Instant::now() => Err(Refused::Unknown),
            // The rightful holder can still use it: a thief cannot burn it.
            Some((p, _)) if p.holder != from => {
                Err(Refused::Address(p.peer.spiffe_id().to_string()))
            }
            Some(_) => Ok(pending.remove(t).expect("present").0),
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
    permits: impl Send,
) {
    let mut p = [0u8; PREFACE_LEN];
    let read = tokio::time::timeout(
        shared.settings.limits.handshake_timeout,
        tcp.read_exact(&mut p),
    )
    .await;
    let refuse = |reason: FlowReason, holder: Option<String>| {
        let mut rec = super::server::refusal(&shared, shared.snapshot(), from, local);
        rec.peer_identity = holder;
        rec.refuse(reason, Some(Side::Server));
    };
    let ticket = match read.map(|r| r.map(|_| Ticket::from_preface(&p))) {
        Ok(Ok(Ok(t))) => t,
        Ok(Ok(Err(_))) | Ok(Err(_)) => return refuse(FlowReason::BadRequest, None),
        Err(_) => return refuse(FlowReason::HandshakeTimeout, None),
    };
    drop(permits);
    let Pending {
        mut rec,
        workload,
        peer,
        tags,
        port,
        ..
    } = match shared.tickets.redeem(&ticket, from.ip()) {
        Ok(p) => p,
        Err(Refused::Unknown) => {
            count(&shared, "unknown");
            return refuse(FlowReason::TicketUnknown, None);
        }
        Err(Refused::Address(holder)) => {
            count(&shared, "address");
            return refuse(FlowReason::TicketAddress, Some(holder));
        }
    };
    count(&shared, "redeemed");
    // The flow's source is the data connection.
    rec.flow.source = crate::flow::endpoint(from);
    rec.flow.source.pu = Some(format!("{}:{}", peer.namespace, peer.name));
    // Registrations may have changed since the ticket was issued.
    let snap = shared.snapshot();
    if !registered(&snap, from, &peer) {
        rec.use_snapshot(snap);
        shared.error(ErrorKind::Reset);
        crate::socket::reset(workload);
        return rec.refuse(FlowReason::Impersonation, Some(Side::Server));
    }
    // Decided again here if a snapshot came since the ticket's decision.
    let stop = rec.relaying(Peer::Pu(tags), port);
    rec.finish_after(async move {
        let progress = Progress::default();
        let idle = shared.settings.limits.idle_timeout;
        let k = shared.kernel();
        let o = splice::relay_until(tcp, workload, idle, false, &progress, &stop.notify, k).await;
        Moved::plain(o)
    });
}
