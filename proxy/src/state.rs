//! What every task of the enforcer shares: the settings it started with (never changed
//! at run time) apart from the runtime handles (the snapshot being enforced, metrics,
//! record sinks, limits' semaphores, the tunnel pool, the open flows). Every snapshot
//! source hands its snapshots to [`Shared::install`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use segmesh_api::FlowRecord;
use segmesh_policy::Direction;
use tokio::sync::{Notify, Semaphore, watch};

use crate::config::Settings;
use crate::metrics::{
    ConnLabels, DirLabels, ErrorKind, ErrorLabels, Metrics, ReloadLabels, VerdictLabel,
    direction_label,
};
use crate::open::OpenFlows;
use crate::relay::splice::DataPath;
use crate::sink::Sinks;
use crate::snapshot::Snapshot;

/// State shared by every task of the enforcer.
pub struct Shared {
    /// What it was started with.
    pub settings: Settings,
    snapshot: RwLock<Arc<Snapshot>>,
    pub metrics: Metrics,
    sinks: Sinks,
    /// Connections being relayed, at most `limits.max_connections`.
    pub(crate) permits: Arc<Semaphore>,
    /// Tunnel handshakes in flight (both roles), at most `limits.max_handshakes`.
    pub(crate) handshakes: Arc<Semaphore>,
    /// Server-side handshakes in flight per source address.
    pub(crate) handshakes_by_source: Arc<PerSource>,
    /// Tunnel-port connections from registered PUs' addresses that have not yet said
    /// whether they are TLS or a ticket, per source: every authenticated-only flow opens
    /// one, so a peer enforcer gets a larger share than an unknown address.
    pub(crate) tickets_by_source: Arc<PerSource>,
    /// Multiplexed tunnel connections to peer enforcers (client role).
    pub(crate) conns: crate::mesh::conns::Conns,
    /// Tickets issued to peers for authenticated-only flows (server role).
    pub(crate) tickets: crate::mesh::tickets::Tickets,
    pub(crate) open: OpenFlows,
    /// UDP sessions by 5-tuple.
    pub(crate) udp: crate::udp::Sessions,
    /// The names our PU resolved, by address.
    pub(crate) names: crate::dns::Names,
    bound: AtomicBool,
    /// Connections being served (one flow recorder each), and a
    /// notification when the last one ends (shutdown waits for it).
    active: AtomicUsize,
    idle: Notify,
    /// The kernel relay (BPF sockmap), when loaded.
    kernel: std::sync::OnceLock<Arc<crate::relay::sockmap::Sockmap>>,
    /// Set when the enforcer starts shutting down.
    draining: watch::Sender<bool>,
    /// This namespace's own addresses; made at the first inbound connection, on the
    /// enforcer's runtime (in the namespace it enforces).
    local: std::sync::OnceLock<crate::local::LocalAddrs>,
    /// Why the newest snapshot offered could not be built (the previous one is
    /// enforced meanwhile); None once a snapshot is installed.
    rejected: std::sync::Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn new(settings: Settings, initial: Snapshot, sinks: Sinks) -> Shared {
        Shared {
            snapshot: RwLock::new(Arc::new(initial)),
            metrics: Metrics::default(),
            sinks,
            permits: Arc::new(Semaphore::new(settings.limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(settings.limits.max_handshakes)),
            handshakes_by_source: Arc::new(PerSource::new(
                settings.limits.max_handshakes_per_source,
            )),
            tickets_by_source: Arc::new(PerSource::new(
                settings.limits.max_handshakes_per_source.saturating_mul(64),
            )),
            conns: Default::default(),
            tickets: Default::default(),
            open: OpenFlows::default(),
            udp: Default::default(),
            names: Default::default(),
            bound: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            draining: watch::channel(false).0,
            rejected: std::sync::Mutex::new(None),
            kernel: std::sync::OnceLock::new(),
            local: std::sync::OnceLock::new(),
            settings,
        }
    }

    /// Whether `ip` is one of this namespace's own addresses (`local.rs`).
    pub(crate) fn is_local(&self, ip: std::net::IpAddr) -> bool {
        self.local
            .get_or_init(crate::local::LocalAddrs::new)
            .contains(ip)
    }

    /// The kernel relay spliced flows are handed to, if it was loaded.
    pub(crate) fn kernel(&self) -> Option<&crate::relay::sockmap::Sockmap> {
        self.kernel.get().map(|k| &**k)
    }

    pub(crate) fn set_kernel(&self, k: Arc<crate::relay::sockmap::Sockmap>) {
        let _ = self.kernel.set(k);
    }

    /// Whether allowed plaintext flows go to the kernel relay.
    pub fn kernel_relay(&self) -> bool {
        self.kernel.get().is_some()
    }

    /// The newest snapshot offered was unusable (`why`): the previous one stays in force.
    pub fn rejected(&self, why: String) {
        tracing::warn!(error = %why, "snapshot unusable; still enforcing the previous one");
        self.reloaded("error");
        self.metrics.snapshot_rejected.set(1);
        *self.rejected.lock().expect("lock poisoned") = Some(why);
    }

    /// Why the newest snapshot offered is not enforced, if it is not.
    pub fn rejection(&self) -> Option<String> {
        self.rejected.lock().expect("lock poisoned").clone()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("lock poisoned").clone()
    }

    pub(crate) fn set_bound(&self) {
        self.bound.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.bound.load(Ordering::Relaxed)
            && !self.is_draining()
            && !self.snapshot().is_fail_closed()
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Stops accepting (every listener's loop ends) and tells waiting tunnel
    /// connections to close.
    pub(crate) fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Completes once the enforcer starts shutting down.
    pub(crate) fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.draining.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// A connection starts being served.
    pub(crate) fn enter(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
    }

    /// A connection's service ended.
    pub(crate) fn leave(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Connections being served.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Waits until no connection is being served, or until `deadline`; true if none is.
    pub(crate) async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let idle = self.idle.notified();
            if self.active() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.active() == 0;
            }
        }
    }

    pub(crate) fn sinks(&self) -> &Sinks {
        &self.sinks
    }

    pub(crate) fn record(&self, r: FlowRecord) {
        self.sinks.record(r, &self.metrics);
    }

    /// Enforces `s` from now on; with `recheck_open`, re-decides the open connections
    /// and closes those `s` rejects.
    pub fn install(&self, s: Snapshot, why: &str) {
        tracing::info!(version = %s.version, source = s.source, policies = s.policy_count, registry = s.registry.len(), reason = why, "snapshot installed");
        if !s.registry_conflicts.is_empty() {
            tracing::warn!(conflicts = ?s.registry_conflicts, "addresses several PUs claim are skipped (no PU is reachable there)");
        }
        self.metrics
            .registry_conflicts
            .set(s.registry_conflicts.len() as i64);
        let s = Arc::new(s);
        *self.snapshot.write().expect("lock poisoned") = s.clone();
        *self.rejected.lock().expect("lock poisoned") = None;
        self.metrics.snapshot_rejected.set(0);
        self.reloaded("ok");
        if self.settings.recheck_open {
            // Inbound UDP sessions are the kernel's tracked flows (see `queued`).
            if self.settings.listeners.address.is_none() {
                crate::queued::redecide_inbound_udp();
            }
            let closed = self.open.recheck(&s);
            if closed > 0 {
                tracing::info!(
                    closed,
                    "open connections closed: the new snapshot rejects them"
                );
            }
        }
    }

    /// Counts a snapshot taken (`ok`) or refused (`error`).
    pub(crate) fn reloaded(&self, result: &'static str) {
        self.metrics
            .reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    pub(crate) fn count_connection(&self, direction: Direction, verdict: VerdictLabel) {
        self.metrics
            .connections
            .get_or_create(&ConnLabels {
                direction: direction_label(direction),
                verdict,
            })
            .inc();
    }

    /// Counts a finished flow's bytes by how they moved: through TLS (`tls`), spliced,
    /// or copied (a copy fallback); a moved flow's `in_tls` first ones through TLS, the
    /// rest spliced.
    pub(crate) fn count_bytes(
        &self,
        direction: Direction,
        total: u64,
        path: DataPath,
        tls: bool,
        in_tls: u64,
    ) {
        let m = &self.metrics;
        m.bytes
            .get_or_create(&DirLabels {
                direction: direction_label(direction),
            })
            .inc_by(total);
        if tls {
            m.tls_bytes.inc_by(total);
        } else if path == DataPath::Moved {
            let in_tls = in_tls.min(total);
            m.tls_bytes.inc_by(in_tls);
            m.spliced_bytes.inc_by(total - in_tls);
        } else if path == DataPath::Spliced {
            m.spliced_bytes.inc_by(total);
        } else if path == DataPath::Kernel {
            m.kernel_bytes.inc_by(total);
        } else if path == DataPath::Datagrams {
            m.udp_bytes.inc_by(total);
        } else if path == DataPath::Inspected {
            m.copied_bytes.inc_by(total);
        } else {
            m.copied_bytes.inc_by(total);
            m.copy_fallbacks.inc();
        }
    }

    pub(crate) fn error(&self, kind: ErrorKind) {
        self.metrics
            .errors
            .get_or_create(&ErrorLabels { kind })
            .inc();
    }
}

/// Counts per source address, each at most `max`.
pub(crate) struct PerSource {
    counts: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    max: usize,
}

/// One counted slot of a source; given back when dropped.
pub(crate) struct SourcePermit {
    owner: Arc<PerSource>,
    ip: std::net::IpAddr,
}

impl PerSource {
    pub(crate) fn new(max: usize) -> PerSource {
        PerSource {
            counts: Default::default(),
            max,
        }
    }

    /// A slot for `ip`, if it has fewer than `max`.
    pub(crate) fn try_acquire(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<SourcePermit> {
        let mut c = self.counts.lock().expect("lock poisoned");
        let n = c.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourcePermit {
            owner: self.clone(),
            ip,
        })
    }
}

impl Drop for SourcePermit {
    fn drop(&mut self) {
        let mut c = self.owner.counts.lock().expect("lock poisoned");
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod per_source_tests {
    use super::*;

    #[test]
    fn slots_per_source_come_back() {
        let p = Arc::new(PerSource::new(2));
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let b: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let (x, y) = (p.try_acquire(a).unwrap(), p.try_acquire(a).unwrap());
        assert!(p.try_acquire(a).is_none(), "a is at its limit");
        assert!(p.try_acquire(b).is_some(), "b is not");
        drop(x);
        assert!(p.try_acquire(a).is_some());
        drop(y);
        assert!(p.counts.lock().unwrap().is_empty(), "every slot given back");
    }
}
