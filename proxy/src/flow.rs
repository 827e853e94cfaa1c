//! A flow and its recorder. Every connection gets one [`Recorder`] when it is accepted;
//! it holds what the flow record needs (the flow, the snapshot that decided it, the
//! decision, what the tunnel learned) and what an allowed flow holds while it relays
//! (its connection permit, its place in the open-connections gauge and in the open
//! flows a new snapshot re-decides). It is finished exactly once, with the outcome:
//! [`refuse`](Recorder::refuse), [`ended_unrelayed`](Recorder::ended_unrelayed),
//! [`finish`](Recorder::finish) or [`carried`](Recorder::carried). One nobody finished
//! records itself when dropped (reason `internal`, close reason `error`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use prometheus_client::metrics::gauge::Gauge;
use segmesh_api::{CloseReason, FlowEndpoint, FlowReason, FlowRecord, Side, StagedResult};
use segmesh_policy::{Decision, Direction, FlowPort, Reason, Verdict};
use tokio::sync::OwnedSemaphorePermit;

use crate::metrics::{DirLabels, ErrorKind, VerdictLabel, direction_label};
use crate::open::{Guard, Peer, Stop};
use crate::relay::Moved;
use crate::relay::splice::{Close, DataPath};
use crate::snapshot::Snapshot;
use crate::state::Shared;

/// One connection's endpoints and start, as its record will show them.
pub(crate) struct Flow {
    pub(crate) started: Instant,
    pub(crate) time: String,
    pub(crate) direction: Direction,
    pub(crate) source: FlowEndpoint,
    pub(crate) destination: FlowEndpoint,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// An endpoint of a flow by address (v4-mapped v6 addresses as v4).
pub(crate) fn endpoint(addr: SocketAddr) -> FlowEndpoint {
    FlowEndpoint {
        ip: addr.ip().to_canonical(),
        port: addr.port(),
        pu: None,
        external: Vec::new(),
        domain: None,
        service: None,
    }
}

impl Flow {
    pub(crate) fn new(direction: Direction, source: SocketAddr, destination: SocketAddr) -> Flow {
        Flow {
            started: Instant::now(),
            time: now_rfc3339(),
            direction,
            source: endpoint(source),
            destination: endpoint(destination),
        }
    }

    /// The address of the other end, as our PU sees it.
    pub(crate) fn peer_ip(&self) -> std::net::IpAddr {
        match self.direction {
            Direction::Outgoing => self.destination.ip,
            Direction::Incoming => self.source.ip,
        }
    }
}

/// The reason a decision gives.
pub(crate) fn reason_of(d: &Decision) -> FlowReason {
    match d.reason {
        Reason::Policy => FlowReason::Policy,
        Reason::Default => FlowReason::Default,
        Reason::Discovery => FlowReason::Discovered,
    }
}

/// An allowed flow while it relays.
struct Relaying {
    gauge: Gauge,
    tracked: Guard,
}

impl Drop for Relaying {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The one place a connection's record is made (see the module doc). A handle to its
/// state on the heap: it is passed by value down the connection's path, and every async
/// function along it keeps its argument and a moved copy in its future (rustc lays an
/// argument out twice), so a 504-byte record here cost about 2.5 KiB of every flow's
/// task; boxed, each copy is a pointer.
pub(crate) struct Recorder(Box<RecorderState>);

impl std::ops::Deref for Recorder {
    type Target = RecorderState;
    fn deref(&self) -> &RecorderState {
        &self.0
    }
}

impl std::ops::DerefMut for Recorder {
    fn deref_mut(&mut self) -> &mut RecorderState {
        &mut self.0
    }
}

pub(crate) struct RecorderState {
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    pub(crate) flow: Flow,
    decision: Option<Decision>,
    /// The peer's SPIFFE ID (tunnel flows, once its certificate is verified).
    pub(crate) peer_identity: Option<String>,
    /// Whether the tunnel's TLS session was resumed.
    pub(crate) resumed: Option<bool>,
    /// What the server enforcer answered (client role).
    pub(crate) peer_reason: Option<String>,
    /// A UDP session: datagrams each way (the record says `protocol: udp`).
    pub(crate) datagrams: Option<(u64, u64)>,
    /// The protocol the record names when it is not TCP (`udp` is implied by
    /// `datagrams`).
    pub(crate) protocol: Option<&'static str>,
    permit: Option<OwnedSemaphorePermit>,
    relaying: Option<Relaying>,
    done: bool,
}

impl Recorder {
    pub(crate) fn new(shared: &Arc<Shared>, snap: Arc<Snapshot>, flow: Flow) -> Recorder {
        shared.enter();
        Recorder(Box::new(RecorderState {
            shared: shared.clone(),
            snap,
            flow,
            decision: None,
            peer_identity: None,
            resumed: None,
            peer_reason: None,
            datagrams: None,
            protocol: None,
            permit: None,
            relaying: None,
            done: false,
        }))
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    /// Decisions and the record come from `snap` from now on.
    pub(crate) fn use_snapshot(&mut self, snap: Arc<Snapshot>) {
        self.snap = snap;
    }

    pub(crate) fn decided(&mut self, d: Decision) {
        self.decision = Some(d);
    }

    /// Takes a connection permit; false (counted as overload) at the limit.
    pub(crate) fn admit(&mut self) -> bool {
        match self.shared.permits.clone().try_acquire_owned() {
            Ok(p) => {
                self.permit = Some(p);
                true
            }
            Err(_) => {
                self.shared.error(ErrorKind::Overload);
                false
            }
        }
    }

    /// The flow is allowed and starts moving bytes: counted, in the open-connections
    /// gauge and tracked for re-decision (with the peer and port it was decided on)
    /// until it is finished. The returned stop is notified when a new snapshot rejects
    /// it.
    pub(crate) fn relaying(&mut self, peer: Peer, port: impl Into<FlowPort>) -> Arc<Stop> {
        let port = port.into();
        let dir = self.flow.direction;
        self.shared.count_connection(dir, VerdictLabel::Allow);
        let gauge = self
            .shared
            .metrics
            .open
            .get_or_create(&DirLabels {
                direction: direction_label(dir),
            })
            .clone();
        gauge.inc();
        let tracked = self.shared.open.track(dir, peer.clone(), port);
        let stop = tracked.stop.clone();
        self.relaying = Some(Relaying { gauge, tracked });
        // A snapshot installed between the decision and now re-decided the open flows
        // without this one: decide it again here. (One installed after this check finds
        // it tracked.)
        if self.shared.settings.recheck_open {
            let now = self.shared.snapshot();
            if !Arc::ptr_eq(&now, &self.snap) {
                crate::open::decide_again(&now, dir, &peer, port, &stop);
            }
        }
        stop
    }

    /// Refused at establishment (always recorded). `by`: which enforcer refused, for a
    /// tunnel flow.
    pub(crate) fn refuse(mut self, reason: FlowReason, by: Option<Side>) {
        self.shared
            .count_connection(self.flow.direction, VerdictLabel::Reject);
        tracing::debug!(source = %self.flow.source.ip, destination = %self.flow.destination.ip, port = self.flow.destination.port, %reason, "rejected");
        let mut r = self.build(reason, CloseReason::Rejected);
        r.rejected_by = by;
        self.done(r);
    }

    /// Refuses the application's connection with an RST, and records why.
    pub(crate) fn reset(self, app: tokio::net::TcpStream, reason: FlowReason, by: Option<Side>) {
        crate::socket::reset(app);
        self.refuse(reason, by);
    }

    /// Allowed, but no bytes moved through the enforcer: the destination could not be
    /// reached, or (queued decisions) the kernel carries the flow. Always recorded.
    pub(crate) fn ended_unrelayed(mut self, close: CloseReason) {
        let reason = self.decided_reason();
        let r = self.build(reason, close);
        self.done(r);
    }

    /// Allowed, and the kernel carries the flow (an inbound UDP session): its record so
    /// far, which the caller completes with the kernel's counters and writes
    /// ([`Shared::record`]) when the flow ends.
    pub(crate) fn carried(mut self) -> FlowRecord {
        let reason = self.decided_reason();
        let r = self.build(reason, CloseReason::Closed);
        self.done = true;
        r
    }

    /// Runs an allowed flow's relay as a task of its own, then [`finish`](Self::finish)es
    /// with what it moved; the task that set the flow up ends. A task's allocation is
    /// its future's largest state, kept for the task's whole life: the set-up's states
    /// (the decision, the tunnel's negotiation, each async layer's copy of its
    /// arguments) made every relaying flow's task 3.5 KiB, of which the relay needs 1.5
    /// KiB. (Draining follows flows, not tasks: a flow is open until it finishes.)
    pub(crate) fn finish_after(
        self,
        relay: impl std::future::Future<Output = Moved> + Send + 'static,
    ) {
        // Boxed: awaited inline, the relay would be in the task twice (as the block's
        // captured value and as the value it awaits, rust-lang/rust#62958).
        let relay = Box::pin(relay);
        tokio::spawn(async move { self.finish(relay.await) });
    }

    /// An allowed flow ended: its bytes are counted, its record written when the policy
    /// asks for it, the enforcer logs every flow, or a new snapshot closed it.
    pub(crate) fn finish(mut self, m: Moved) {
        let (closed_by, shutdown) = self.relaying.as_ref().map_or((Vec::new(), false), |r| {
            (
                r.tracked.closed_by(),
                r.tracked
                    .stop
                    .shutdown
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
        });
        // The flow no longer holds a permit or counts as open.
        self.relaying = None;
        self.permit = None;
        let shared = self.shared.clone();
        shared.count_bytes(
            self.flow.direction,
            m.forward + m.backward,
            m.path,
            m.tls,
            m.in_tls,
        );
        let close = match m.close {
            Close::Policy if shutdown => CloseReason::Shutdown,
            c => CloseReason::from(c),
        };
        match close {
            CloseReason::Reset => shared.error(ErrorKind::Reset),
            CloseReason::Idle => shared.error(ErrorKind::Idle),
            CloseReason::Error => shared.error(ErrorKind::Io),
            CloseReason::Policy => {
                shared.metrics.closed_by_policy.inc();
            }
            _ => {}
        }
        let log = self.decision.as_ref().is_some_and(|d| d.log);
        // A connection closed by a policy change or by shutdown is always recorded.
        if !(log
            || shared.settings.log_all_flows
            || matches!(close, CloseReason::Policy | CloseReason::Shutdown))
        {
            self.done = true;
            return;
        }
        let tunnel = self.peer_identity.is_some();
        let reason = self.decided_reason();
        let mut r = self.build(reason, close);
        r.bytes_sent = m.forward;
        r.bytes_received = m.backward;
        r.data_path = Some(
            match (m.tls, m.path) {
                (true, _) => "tls",
                (false, DataPath::Spliced) => "spliced",
                (false, DataPath::Copied) => "copied",
                (false, DataPath::Datagrams) => "datagrams",
                (false, DataPath::Inspected) => "inspected",
                (false, DataPath::Kernel) => "kernel",
                (false, DataPath::Moved) => "moved",
            }
            .into(),
        );
        if tunnel {
            // A tunnel flow: encrypted is what the bytes were, not what was asked.
            r.encrypt = m.tls;
        }
        r.closed_by = closed_by;
        self.done(r);
    }

    fn decided_reason(&self) -> FlowReason {
        self.decision
            .as_ref()
            .map_or(FlowReason::Internal, reason_of)
    }

    fn done(&mut self, r: FlowRecord) {
        self.done = true;
        self.shared.record(r);
    }

    /// The record of this flow with no bytes moved.
    fn build(&mut self, reason: FlowReason, close: CloseReason) -> FlowRecord {
        self.0.build(reason, close)
    }
}

impl RecorderState {
    fn build(&mut self, reason: FlowReason, close: CloseReason) -> FlowRecord {
        let snap = &self.snap;
        let set = snap.engine.set();
        let d = self.decision.as_ref();
        let (verdict, policies, tier, staged, encrypt) = match d {
            Some(d) => (
                // A policy allow refused for another reason (overload) is recorded as a
                // reject.
                if d.verdict == Verdict::Allow && close != CloseReason::Rejected {
                    "allow"
                } else {
                    "reject"
                },
                d.policy_names(set),
                d.tier.map(|t| t.to_string()),
                d.staged(set)
                    .map(|(id, a)| StagedResult {
                        policy: set.policy(id).qualified_name(),
                        action: a.to_string().to_lowercase(),
                    })
                    .collect(),
                d.encrypt,
            ),
            None => ("reject", Vec::new(), None, Vec::new(), false),
        };
        let placeholder = || FlowEndpoint {
            ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
            port: 0,
            pu: None,
            external: Vec::new(),
            domain: None,
            service: None,
        };
        FlowRecord {
            time: std::mem::take(&mut self.flow.time),
            direction: match self.flow.direction {
                Direction::Outgoing => "outgoing",
                Direction::Incoming => "incoming",
            }
            .into(),
            source: std::mem::replace(&mut self.flow.source, placeholder()),
            destination: std::mem::replace(&mut self.flow.destination, placeholder()),
            verdict: verdict.into(),
            reason,
            policies,
            tier,
            staged,
            encrypt,
            data_path: None,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: self.flow.started.elapsed().as_millis() as u64,
            close_reason: close,
            peer_identity: self.peer_identity.take(),
            rejected_by: None,
            peer_reason: self.peer_reason.take(),
            modes: d
                .map(|d| {
                    d.policies
                        .iter()
                        .map(|&id| set.policy(id).mode.to_string())
                        .collect()
                })
                .unwrap_or_default(),
            resumed: self.resumed,
            closed_by: Vec::new(),
            protocol: self
                .protocol
                .or(self.datagrams.map(|_| "udp"))
                .map(str::to_owned),
            datagrams_sent: self.datagrams.map(|d| d.0),
            datagrams_received: self.datagrams.map(|d| d.1),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.done {
            tracing::warn!(source = %self.flow.source.ip, destination = %self.flow.destination.ip, "a flow ended unrecorded (a bug): recording it now");
            let r = self.build(FlowReason::Internal, CloseReason::Error);
            self.done(r);
        }
        // After the record: shutdown flushes the sinks once nothing is being served.
        self.relaying = None;
        self.permit = None;
        self.shared.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::sink::{FlowLog, Sinks};

    fn shared(log: &std::path::Path) -> Arc<Shared> {
        let settings = Settings {
            flow_log: Some(log.display().to_string()),
            ..Settings::default()
        };
        let sinks = Sinks::new(FlowLog::open(settings.flow_log.as_deref()).unwrap(), None);
        Arc::new(Shared::new(settings, Snapshot::fail_closed(), sinks))
    }

    fn flow() -> Flow {
        Flow::new(
            Direction::Outgoing,
            "10.0.0.2:40000".parse().unwrap(),
            "[::ffff:192.0.2.1]:443".parse().unwrap(),
        )
    }

    async fn records(shared: &Shared, log: &std::path::Path) -> Vec<serde_json::Value> {
        shared
            .sinks()
            .flush(std::time::Duration::from_secs(5))
            .await;
        std::fs::read_to_string(log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A recorder nobody finished records itself; one finished records exactly once;
    /// either way it stops counting as served.
    #[tokio::test]
    async fn every_recorder_records_exactly_once() {
        let dir = std::env::temp_dir().join(format!("segmesh-flow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("flows.jsonl");
        let shared = shared(&log);
        let snap = shared.snapshot();

        let lost = Recorder::new(&shared, snap.clone(), flow());
        assert_eq!(shared.active(), 1);
        drop(lost);
        assert_eq!(shared.active(), 0);

        let refused = Recorder::new(&shared, snap.clone(), flow());
        refused.refuse(FlowReason::NoSnapshot, None);
        assert_eq!(shared.active(), 0);

        let r = records(&shared, &log).await;
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0]["reason"], "internal");
        assert_eq!(r[0]["close_reason"], "error");
        assert_eq!(r[1]["reason"], "no-snapshot");
        assert_eq!(r[1]["close_reason"], "rejected");
        // Addresses are recorded in their canonical form.
        assert_eq!(r[1]["destination"]["ip"], "192.0.2.1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn snapshot_allowing(allow: bool) -> Snapshot {
        let text = if allow {
            "kind: NetworkPolicy\nname: web-to-api\nnamespace: /acme\naction: Allow\nmode: Outgoing\nsubject: [[app=web]]\nobject: [[app=api]]\nports: [tcp/8080]\n"
        } else {
            "kind: NetworkPolicy\nname: cut\nnamespace: /acme\naction: Reject\nmode: Outgoing\nsubject: [[app=web]]\nobject: [[app=api]]\nports: [tcp/8080]\n"
        };
        let loaded = segmesh_policy::load(&[segmesh_policy::Source {
            name: "p.yaml",
            text,
        }])
        .unwrap();
        let wire = segmesh_api::Snapshot {
            revision: u64::from(!allow),
            version: 1,
            policies: loaded.set.policies().to_vec(),
            externals: Vec::new(),
            namespaces: Vec::new(),
            registry: Vec::new(),
            services: Vec::new(),
        };
        Snapshot::from_console("web", "/acme", &["app=web".into()], &wire, None, "test").unwrap()
    }

    /// The race: a flow decided under a snapshot that allowed it, whose relay starts
    /// after a rejecting snapshot was installed (and the open flows re-decided without
    /// it), is decided again when it starts: stopped at once, by the rejecting policy.
    #[tokio::test]
    async fn a_flow_decided_before_a_new_snapshot_is_decided_again_when_it_starts() {
        let dir = std::env::temp_dir().join(format!("segmesh-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("flows.jsonl");
        let mut settings = Settings {
            flow_log: Some(log.display().to_string()),
            ..Settings::default()
        };
        // One listen address: no capture of its own (installing a snapshot then leaves
        // this machine's tracked UDP flows alone).
        settings.listeners.address = Some("127.0.0.1".parse().unwrap());
        let sinks = Sinks::new(FlowLog::open(settings.flow_log.as_deref()).unwrap(), None);
        let shared = Arc::new(Shared::new(settings, snapshot_allowing(true), sinks));
        let api = segmesh_policy::Pu::with_automatic_tags(
            "/acme".parse().unwrap(),
            segmesh_policy::TagSet::parse(["app=api"]).unwrap(),
        )
        .tags;
        let api = Arc::new(api);
        // Allowed and kept relaying under the same snapshot: not stopped.
        let mut ok = Recorder::new(&shared, shared.snapshot(), flow());
        let stop = ok.relaying(Peer::Pu(api.clone()), FlowPort::tcp(8080));
        assert!(stop.by.lock().unwrap().is_empty());
        ok.finish(Moved::nothing(Close::Closed, false));
        // Decided, then a rejecting commit, then the relay starts.
        let mut late = Recorder::new(&shared, shared.snapshot(), flow());
        shared.install(snapshot_allowing(false), "test");
        let stop = late.relaying(Peer::Pu(api), FlowPort::tcp(8080));
        assert_eq!(*stop.by.lock().unwrap(), vec!["/acme:cut".to_owned()]);
        late.finish(Moved::nothing(Close::Policy, false));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
