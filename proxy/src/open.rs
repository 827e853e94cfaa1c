//! The enforcer's open flows, kept so that a new snapshot can re-decide them: each
//! relayed flow registers what it was decided on (direction, peer, port) and a stop
//! signal; [`OpenFlows::recheck`] decides them again under the new snapshot and stops
//! the ones it now rejects (their records say close reason `policy`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use segmesh_policy::{Direction, FlowPort, PreparedPeer, TagSet, Verdict};
use tokio::sync::Notify;

use crate::snapshot::Snapshot;

/// Who the flow is with, as the decision saw it.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A PU: the tags its certificate proves (shared by the flows of one tunnel
    /// connection: a copy per flow was about 600 bytes of each idle flow).
    Pu(Arc<TagSet>),
    /// An address outside the mesh (matched against external networks), with the names
    /// our PU had resolved to it when the flow was decided.
    Address(IpAddr, Vec<String>),
}

/// Tells a relay to stop, and why.
#[derive(Debug, Default)]
pub struct Stop {
    pub notify: Notify,
    /// The policies that reject the flow now (`default` when none matched).
    pub by: Mutex<Vec<String>>,
    /// Stopped because the enforcer shuts down (not by a policy).
    pub shutdown: std::sync::atomic::AtomicBool,
}

struct Tracked {
    direction: Direction,
    peer: Peer,
    port: FlowPort,
    stop: Arc<Stop>,
}

#[derive(Default)]
struct Table {
    next: AtomicU64,
    flows: Mutex<HashMap<u64, Tracked>>,
}

#[derive(Default)]
pub struct OpenFlows {
    table: Arc<Table>,
}

/// A registered open flow; dropping it forgets the flow.
pub struct Guard {
    table: Arc<Table>,
    id: u64,
    pub stop: Arc<Stop>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.table
            .flows
            .lock()
            .expect("lock poisoned")
            .remove(&self.id);
    }
}

impl Guard {
    /// The policies that closed the flow, if the recheck did.
    pub fn closed_by(&self) -> Vec<String> {
        self.stop.by.lock().expect("lock poisoned").clone()
    }
}

impl OpenFlows {
    pub fn track(&self, direction: Direction, peer: Peer, port: FlowPort) -> Guard {
        let id = self.table.next.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(Stop::default());
        self.table.flows.lock().expect("lock poisoned").insert(
            id,
            Tracked {
                direction,
                peer,
                port,
                stop: stop.clone(),
            },
        );
        Guard {
            table: self.table.clone(),
            id,
            stop,
        }
    }

    /// Stops every open flow (shutdown): their records say close reason `shutdown`.
    pub fn stop_all(&self) -> usize {
        let flows = self.table.flows.lock().expect("lock poisoned");
        for t in flows.values() {
            t.stop.shutdown.store(true, Ordering::Relaxed);
            t.stop.notify.notify_one();
        }
        flows.len()
    }

    /// Decides every open flow again under `snap`; stops those now rejected. Returns how
    /// many were stopped.
    pub fn recheck(&self, snap: &Snapshot) -> usize {
        // Decide outside the lock: copy what the decisions need first.
        let open: Vec<(Direction, Peer, FlowPort, Arc<Stop>)> = self
            .table
            .flows
            .lock()
            .expect("lock poisoned")
            .values()
            .map(|t| (t.direction, t.peer.clone(), t.port, t.stop.clone()))
            .collect();
        open.into_iter()
            .filter(|(dir, peer, port, stop)| !decide_again(snap, *dir, peer, *port, stop))
            .count()
    }
}

/// Decides one open flow again under `snap`; when `snap` rejects it, tells its relay
/// to stop (with the rejecting policies) and returns false.
pub fn decide_again(
    snap: &Snapshot,
    dir: Direction,
    peer: &Peer,
    port: FlowPort,
    stop: &Stop,
) -> bool {
    let prepared = match peer {
        Peer::Pu(tags) => PreparedPeer::Pu(snap.engine.id_set(tags)),
        Peer::Address(ip, names) => PreparedPeer::Networks(snap.resolve(*ip, names, port).0),
    };
    let d = if snap.is_fail_closed() {
        None
    } else {
        Some(snap.engine.decide(dir, &snap.prepared, &prepared, port))
    };
    if d.as_ref().is_some_and(|d| d.verdict == Verdict::Allow) {
        return true;
    }
    let names = d
        .map(|d| d.policy_names(snap.engine.set()))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| vec!["default".into()]);
    *stop.by.lock().expect("lock poisoned") = names;
    // A stored permit: the relay stops even if it is not waiting right now.
    stop.notify.notify_one();
    false
}
