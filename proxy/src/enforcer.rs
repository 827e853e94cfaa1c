//! The enforcer: binds the capture and admin listeners, decides each captured connection
//! with the current snapshot, relays allowed ones, refuses the rest with an RST, and
//! reloads its configuration on SIGHUP or when a file changes (atomically; a broken
//! configuration keeps the previous one). With no valid configuration it rejects
//! everything (fail closed).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use segmesh_api::{FlowEndpoint, FlowRecord, StagedResult};
use segmesh_policy::{Address, Decision, Direction, PreparedPeer, Reason, Verdict};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::config::{Limits, Listeners};
use crate::flows::FlowLog;
use crate::metrics::{
    ConnLabels, Dir, DirLabels, ErrorKind, ErrorLabels, Metrics, ReloadLabels, VerdictLabel,
};
use crate::snapshot::Snapshot;
use crate::socket;
use crate::splice::{self, Close, DataPath, Progress};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("cannot open the flow log: {0}")]
    FlowLog(#[source] std::io::Error),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
}

/// Where the enforcer's configuration comes from.
pub enum ConfigSource {
    /// A local configuration file, reloaded on change and on SIGHUP. With a `console:`
    /// section, the file gives only the PU, listeners and limits (read once) and the
    /// rest comes from the console.
    File(PathBuf),
    /// A configuration built from flags (console mode).
    Console(Box<crate::config::LocalConfig>),
}

/// State shared by every task of the enforcer.
pub struct Shared {
    snapshot: RwLock<Arc<Snapshot>>,
    pub metrics: Metrics,
    flows: FlowLog,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) handshakes: Arc<Semaphore>,
    pub(crate) limits: Limits,
    pub(crate) listeners: Listeners,
    pub(crate) pool: crate::pool::Pool,
    /// File mode: the file to reload.
    config_path: Option<PathBuf>,
    bound: AtomicBool,
    pub(crate) open: crate::open::OpenFlows,
    recheck_open: bool,
    pub(crate) log_all: bool,
    /// Console mode: records queued for the console.
    console_flows: Option<tokio::sync::mpsc::Sender<FlowRecord>>,
}

impl Shared {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("lock poisoned").clone()
    }

    pub fn is_ready(&self) -> bool {
        self.bound.load(Ordering::Relaxed) && !self.snapshot().is_fail_closed()
    }

    /// Sends a record to the console (console mode) and to the flow log (if any); a copy
    /// only when both take it.
    pub(crate) fn record(&self, r: FlowRecord) {
        let to_console = |r: FlowRecord, tx: &tokio::sync::mpsc::Sender<FlowRecord>| {
            if tx.try_send(r).is_err() {
                self.metrics.console_flows_dropped.inc();
            }
        };
        match &self.console_flows {
            Some(tx) if !self.flows.is_enabled() => return to_console(r, tx),
            Some(tx) => to_console(r.clone(), tx),
            None => {}
        }
        if !self.flows.record(r) {
            self.metrics.flow_records_dropped.inc();
        }
    }

    /// Enforces `s` from now on; with `recheck_open`, re-decides the open connections
    /// and closes those `s` rejects.
    pub fn install(&self, s: Snapshot, why: &str) {
        tracing::info!(version = %s.version, source = s.source, policies = s.policy_count, registry = s.registry.len(), reason = why, "snapshot installed");
        let s = Arc::new(s);
        *self.snapshot.write().expect("lock poisoned") = s.clone();
        self.metrics
            .reloads
            .get_or_create(&ReloadLabels { result: "ok" })
            .inc();
        if self.recheck_open {
            let closed = self.open.recheck(&s);
            if closed > 0 {
                tracing::info!(
                    closed,
                    "open connections closed: the new snapshot rejects them"
                );
            }
        }
    }

    pub(crate) fn count_connection(&self, direction: Dir, verdict: VerdictLabel) {
        self.metrics
            .connections
            .get_or_create(&ConnLabels { direction, verdict })
            .inc();
    }

    /// Counts a finished flow's bytes by how they moved: through TLS (`tls`), spliced,
    /// or copied (a copy fallback).
    pub(crate) fn count_bytes(&self, direction: Dir, total: u64, path: DataPath, tls: bool) {
        let m = &self.metrics;
        m.bytes
            .get_or_create(&DirLabels { direction })
            .inc_by(total);
        if tls {
            m.tls_bytes.inc_by(total);
        } else if path == DataPath::Spliced {
            m.spliced_bytes.inc_by(total);
        } else {
            m.copied_bytes.inc_by(total);
            m.copy_fallbacks.inc();
        }
    }

    /// An allowed flow starts moving bytes: counted, in the open-connections gauge and
    /// tracked for re-decision until the returned value is dropped.
    pub(crate) fn relaying(&self, dir: Dir, peer: crate::open::Peer, port: u16) -> Relaying<'_> {
        self.count_connection(dir, VerdictLabel::Allow);
        let gauge = self
            .metrics
            .open
            .get_or_create(&DirLabels { direction: dir })
            .clone();
        gauge.inc();
        let direction = match dir {
            Dir::Outbound => Direction::Outgoing,
            Dir::Inbound => Direction::Incoming,
        };
        Relaying {
            gauge,
            tracked: self.open.track(direction, peer, port),
        }
    }

    pub(crate) fn error(&self, kind: ErrorKind) {
        self.metrics
            .errors
            .get_or_create(&ErrorLabels { kind })
            .inc();
    }

    /// Loads the configuration file again; keeps the current one if the new one is
    /// broken.
    pub fn reload(&self, why: &str) -> bool {
        let Some(path) = &self.config_path else {
            return false;
        };
        match Snapshot::load(path, Some(&self.snapshot())) {
            Ok(s) => {
                if let Some(cfg) = &s.config {
                    if cfg.listeners != self.listeners || cfg.limits != self.limits {
                        tracing::warn!("listener ports and limits change only on restart");
                    }
                    if cfg.console.is_some() {
                        tracing::warn!("a console section takes effect only on restart");
                    }
                }
                self.install(s, why);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, reason = why, "configuration rejected; still enforcing the previous one");
                self.metrics
                    .reloads
                    .get_or_create(&ReloadLabels { result: "error" })
                    .inc();
                false
            }
        }
    }
}

/// A flow being relayed (see [`Shared::relaying`]).
pub(crate) struct Relaying<'a> {
    gauge: prometheus_client::metrics::gauge::Gauge,
    tracked: crate::open::Guard<'a>,
}

impl Relaying<'_> {
    /// Notified when a new snapshot rejects the flow.
    pub(crate) fn stop(&self) -> &tokio::sync::Notify {
        &self.tracked.stop.notify
    }

    /// The policies that closed the flow, if a new snapshot did.
    pub(crate) fn closed_by(&self) -> Vec<String> {
        self.tracked.closed_by()
    }
}

impl Drop for Relaying<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A running enforcer. Dropping it stops every listener (open connections finish on
/// their own).
pub struct Enforcer {
    pub shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    pub admin_addr: SocketAddr,
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn ipv6_available() -> bool {
    Path::new("/proc/net/if_inet6").exists()
}

impl Enforcer {
    /// Loads the configuration (failing closed if it is broken) and binds every listener.
    /// In console mode: starts from the snapshot cached on disk (or fails closed) and
    /// starts registering and watching.
    pub async fn start(source: ConfigSource) -> Result<Enforcer, Error> {
        let (config_path, console_cfg) = match source {
            ConfigSource::File(path) => match crate::config::LocalConfig::load(&path) {
                Ok(cfg) if cfg.console.is_some() => (None, Some(cfg)),
                _ => (Some(path), None),
            },
            ConfigSource::Console(cfg) => {
                cfg.check()?;
                (None, Some(*cfg))
            }
        };
        let mut console = None;
        let initial = match (&config_path, &console_cfg) {
            (Some(path), _) => match Snapshot::load(path, None) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "no valid configuration: rejecting every connection until one loads");
                    Snapshot::fail_closed()
                }
            },
            (None, Some(cfg)) => {
                let c = cfg
                    .console
                    .as_ref()
                    .expect("console mode has a console section");
                let client = crate::console::client(c)?;
                let state = crate::console::State::load(&cfg.pu, c);
                let initial = match state.build("cache") {
                    Some(Ok(s)) => s,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "the cached snapshot is unusable; rejecting everything until the console answers");
                        Snapshot::fail_closed()
                    }
                    None => {
                        tracing::info!(
                            "no cached snapshot: rejecting everything until the console answers"
                        );
                        Snapshot::fail_closed()
                    }
                };
                console = Some((client, state));
                initial
            }
            (None, None) => unreachable!("a configuration source"),
        };
        let local = initial.config.as_ref().or(console_cfg.as_ref());
        let mode = local.map(|c| c.mode).unwrap_or_default();
        let (listeners, limits, flow_log, recheck_open, log_all) = match local {
            Some(c) => (
                c.listeners,
                c.limits,
                c.flow_log.clone(),
                c.recheck_open,
                c.log_all_flows,
            ),
            None => (Listeners::default(), Limits::default(), None, true, false),
        };
        let (flows, _writer) = FlowLog::open(flow_log.as_deref()).map_err(Error::FlowLog)?;
        let (console_tx, console_rx) = match console {
            Some(_) => {
                let (tx, rx) = tokio::sync::mpsc::channel(crate::console::FLOW_QUEUE);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let shared = Arc::new(Shared {
            snapshot: RwLock::new(Arc::new(initial)),
            metrics: Metrics::default(),
            flows,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
            limits,
            listeners,
            pool: crate::pool::Pool::default(),
            config_path: config_path.clone(),
            bound: AtomicBool::new(false),
            open: crate::open::OpenFlows::default(),
            recheck_open,
            log_all,
            console_flows: console_tx,
        });

        if crate::mesh::ktls_available() {
            tracing::info!(
                "the kernel offers kernel TLS, but this build encrypts tunnels with rustls in user space"
            );
        } else {
            tracing::info!(
                "no kernel TLS (tls ULP) here: tunnels are encrypted with rustls in user space"
            );
        }
        let v6 = ipv6_available();
        let bind = |addr: SocketAddr, transparent: bool| {
            socket::listener(addr, transparent, 1024).map_err(|e| Error::Bind(addr, e))
        };
        let mut tasks = Vec::new();
        let (any4, any6) = (
            IpAddr::from(Ipv4Addr::UNSPECIFIED),
            IpAddr::from(Ipv6Addr::UNSPECIFIED),
        );
        let (lo4, lo6) = (
            IpAddr::from(Ipv4Addr::LOCALHOST),
            IpAddr::from(Ipv6Addr::LOCALHOST),
        );
        // Per address family (IPv6 only where it exists): the loopback outbound listener,
        // the transparent inbound one, the tunnel.
        let mut families = vec![(lo4, any4)];
        if v6 {
            families.push((lo6, any6));
        }
        let wanted = families.into_iter().flat_map(|(lo, any)| {
            [
                (
                    SocketAddr::new(lo, listeners.outbound),
                    false,
                    Listener::Outbound,
                ),
                (
                    SocketAddr::new(any, listeners.inbound),
                    true,
                    Listener::Inbound,
                ),
                (
                    SocketAddr::new(any, listeners.tunnel),
                    false,
                    Listener::Tunnel,
                ),
            ]
        });
        // Bind everything before serving anything: a port in use fails the start whole.
        let bound = wanted
            .into_iter()
            .map(|(addr, transparent, kind)| Ok((bind(addr, transparent)?, kind)))
            .collect::<Result<Vec<_>, Error>>()?;
        for (l, kind) in bound {
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), listener = ?kind, "listener established");
            tasks.push(tokio::spawn(accept_loop(l, kind, shared.clone())));
        }
        let admin_ip = match mode {
            crate::config::Mode::Sidecar => Ipv4Addr::UNSPECIFIED,
            crate::config::Mode::Host => Ipv4Addr::LOCALHOST,
        };
        let admin_addr = SocketAddr::new(admin_ip.into(), listeners.admin);
        let admin = bind(admin_addr, false)?;
        let admin_addr = admin.local_addr().map_err(|e| Error::Bind(admin_addr, e))?;
        tasks.push(tokio::spawn(crate::admin::serve(admin, shared.clone())));
        match (console, console_rx) {
            (Some((client, state)), Some(rx)) => {
                tasks.extend(crate::console::spawn(shared.clone(), client, state, rx));
            }
            _ => tasks.push(tokio::spawn(watch(shared.clone()))),
        }
        shared.bound.store(true, Ordering::Relaxed);
        Ok(Enforcer {
            shared,
            tasks,
            admin_addr,
        })
    }
}

/// Accepts until the task is aborted; an accept error backs off and never stops it.
async fn accept_loop(listener: TcpListener, kind: Listener, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    match kind {
                        Listener::Outbound => outbound(shared, stream, peer).await,
                        Listener::Inbound => inbound(shared, stream, peer).await,
                        Listener::Tunnel => crate::mesh::serve(shared, stream, peer).await,
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, listener = ?kind, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// What a listener accepts.
#[derive(Debug, Clone, Copy)]
enum Listener {
    /// REDIRECTed connections of our PU.
    Outbound,
    /// TPROXYed connections to our PU.
    Inbound,
    /// Mesh tunnel connections from peer enforcers.
    Tunnel,
}

/// Watches for SIGHUP and for changes of the configuration and policy files.
async fn watch(shared: Arc<Shared>) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    // The files the configuration names, even when the last load failed on one of
    // them (fixing that file must trigger a reload). Parsed only at start, on SIGHUP and
    // after a change; each tick only lists folders and reads file metadata.
    let Some(path) = shared.config_path.clone() else {
        return;
    };
    let roots_of = |_: &Shared| {
        crate::config::LocalConfig::load(&path)
            .map(|c| c.watch_roots(&path))
            .unwrap_or_else(|_| vec![path.clone()])
    };
    let fingerprint = |roots: &[PathBuf]| -> Vec<(PathBuf, Option<SystemTime>, u64)> {
        crate::config::expand(roots)
            .into_iter()
            .map(|f| {
                let m = std::fs::metadata(&f).ok();
                let (t, n) = (
                    m.as_ref().and_then(|m| m.modified().ok()),
                    m.map_or(0, |m| m.len()),
                );
                (f, t, n)
            })
            .collect()
    };
    let mut roots = roots_of(&shared);
    let mut last = fingerprint(&roots);
    loop {
        let signalled = async {
            match hup.as_mut() {
                Some(h) => h.recv().await.is_some(),
                None => std::future::pending().await,
            }
        };
        // The fingerprint is taken before loading: a write that lands during the load (a
        // torn read) changes it again and triggers another reload.
        let why = tokio::select! {
            true = signalled => "SIGHUP",
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if fingerprint(&roots) == last {
                    continue;
                }
                "file changed"
            }
        };
        roots = roots_of(&shared);
        last = fingerprint(&roots);
        let s = shared.clone();
        let _ = tokio::task::spawn_blocking(move || s.reload(why)).await;
    }
}

/// What one connection looked like, for its flow record.
pub(crate) struct Flow {
    pub(crate) started: Instant,
    pub(crate) time: String,
    pub(crate) dir: Dir,
    pub(crate) source: FlowEndpoint,
    pub(crate) destination: FlowEndpoint,
}

pub(crate) fn endpoint(addr: SocketAddr) -> FlowEndpoint {
    FlowEndpoint {
        ip: addr.ip().to_canonical(),
        port: addr.port(),
        pu: None,
        external: Vec::new(),
    }
}

pub(crate) fn flow_record(
    snap: &Snapshot,
    flow: Flow,
    d: Option<&Decision>,
    reason: &str,
    relayed: Option<(u64, u64, DataPath)>,
    close: &str,
) -> FlowRecord {
    let set = snap.engine.set();
    let (verdict, policies, tier, staged, encrypt) = match d {
        Some(d) => (
            // A policy allow refused for another reason (overload) is recorded as a reject.
            if d.verdict == Verdict::Allow && close != "rejected" {
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
    let (sent, received, path) = relayed.map_or((0, 0, None), |(f, b, p)| (f, b, Some(p)));
    FlowRecord {
        time: flow.time,
        direction: match flow.dir {
            Dir::Outbound => "outgoing",
            Dir::Inbound => "incoming",
        }
        .into(),
        source: flow.source,
        destination: flow.destination,
        verdict: verdict.into(),
        reason: reason.into(),
        policies,
        tier,
        staged,
        encrypt,
        data_path: path.map(|p| match p {
            DataPath::Spliced => "spliced".into(),
            DataPath::Copied => "copied".into(),
        }),
        bytes_sent: sent,
        bytes_received: received,
        duration_ms: flow.started.elapsed().as_millis() as u64,
        close_reason: close.into(),
        peer_identity: None,
        rejected_by: None,
        peer_reason: None,
        modes: d
            .map(|d| {
                d.policies
                    .iter()
                    .map(|&id| set.policy(id).mode.to_string())
                    .collect()
            })
            .unwrap_or_default(),
        resumed: None,
        closed_by: Vec::new(),
    }
}

fn record(
    shared: &Shared,
    snap: &Snapshot,
    flow: Flow,
    d: Option<&Decision>,
    reason: &str,
    relayed: Option<(u64, u64, DataPath)>,
    close: &str,
) {
    shared.record(flow_record(snap, flow, d, reason, relayed, close));
}

pub(crate) fn reason_str(d: &Decision) -> &'static str {
    match d.reason {
        Reason::Policy => "policy",
        Reason::Default => "default",
        Reason::Discovery => "discovered",
    }
}

/// Refuses a connection at once (RST) and records why.
pub(crate) fn refuse(
    shared: &Shared,
    snap: &Snapshot,
    stream: TcpStream,
    flow: Flow,
    d: Option<&Decision>,
    reason: &str,
) {
    socket::reset(stream);
    shared.count_connection(flow.dir, VerdictLabel::Reject);
    tracing::debug!(source = %flow.source.ip, destination = %flow.destination.ip, port = flow.destination.port, reason, "rejected");
    record(shared, snap, flow, d, reason, None, "rejected");
}

/// Decides against the external networks the peer address falls in.
fn decide_external(
    snap: &Snapshot,
    dir: Direction,
    ip: IpAddr,
    port: u16,
    metrics: &Metrics,
) -> (Decision, Vec<String>) {
    let t = Instant::now();
    let ids = snap.engine.resolve_address(
        &snap.prepared,
        &Address {
            ip: Some(ip),
            domain: None,
        },
        port,
    );
    let d = snap.engine.decide(
        dir,
        &snap.prepared,
        &PreparedPeer::Networks(ids.clone()),
        port,
    );
    metrics.decision_seconds.observe(t.elapsed().as_secs_f64());
    let names = ids
        .iter()
        .map(|&i| {
            let e = &snap.engine.set().externals()[i as usize];
            format!("{}:{}", e.namespace, e.name)
        })
        .collect();
    (d, names)
}

/// Connects to the destination and relays; records and counts.
pub(crate) async fn forward(
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    stream: TcpStream,
    target: SocketAddr,
    flow: Flow,
    d: Decision,
) {
    let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
        shared.error(ErrorKind::Overload);
        return refuse(&shared, &snap, stream, flow, Some(&d), "overload");
    };
    let upstream =
        match tokio::time::timeout(shared.limits.connect_timeout, TcpStream::connect(target)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, %target, "connect failed");
                shared.error(ErrorKind::ConnectFailed);
                socket::reset(stream);
                return record(
                    &shared,
                    &snap,
                    flow,
                    Some(&d),
                    reason_str(&d),
                    None,
                    "connect-failed",
                );
            }
            Err(_) => {
                shared.error(ErrorKind::ConnectTimeout);
                socket::reset(stream);
                return record(
                    &shared,
                    &snap,
                    flow,
                    Some(&d),
                    reason_str(&d),
                    None,
                    "connect-timeout",
                );
            }
        };
    let _ = upstream.set_nodelay(true);
    let peer = match flow.dir {
        Dir::Outbound => flow.destination.ip,
        Dir::Inbound => flow.source.ip,
    };
    let relaying = shared.relaying(
        flow.dir,
        crate::open::Peer::Address(peer),
        flow.destination.port,
    );
    let progress = Progress::default();
    let out = splice::relay_until(
        stream,
        upstream,
        shared.limits.idle_timeout,
        false,
        &progress,
        relaying.stop(),
    )
    .await;
    let closed_by = relaying.closed_by();
    drop(relaying);
    drop(permit);
    shared.count_bytes(flow.dir, out.forward + out.backward, out.path, false);
    match out.close {
        Close::Reset => shared.error(ErrorKind::Reset),
        Close::Idle => shared.error(ErrorKind::Idle),
        Close::Error => shared.error(ErrorKind::Io),
        Close::Policy => {
            shared.metrics.closed_by_policy.inc();
        }
        Close::Closed => {}
    }
    // A connection closed by a policy change is always recorded.
    if d.log || shared.log_all || out.close == Close::Policy {
        let mut r = flow_record(
            &snap,
            flow,
            Some(&d),
            reason_str(&d),
            Some((out.forward, out.backward, out.path)),
            out.close.as_str(),
        );
        r.closed_by = closed_by;
        shared.record(r);
    }
}

/// A connection our PU opened, REDIRECTed to us.
async fn outbound(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let snap = shared.snapshot();
    let started = Instant::now();
    let target = match socket::original_dst(&stream) {
        Ok(t) => SocketAddr::new(t.ip().to_canonical(), t.port()),
        Err(e) => {
            tracing::debug!(error = %e, "no original destination (connected to the capture port directly?)");
            shared.error(ErrorKind::OriginalDst);
            return socket::reset(stream);
        }
    };
    let mut source = endpoint(peer);
    source.pu = Some(snap.pu_qualified());
    let mut flow = Flow {
        started,
        time: now_rfc3339(),
        dir: Dir::Outbound,
        source,
        destination: endpoint(target),
    };
    if snap.is_fail_closed() {
        return refuse(&shared, &snap, stream, flow, None, "no-snapshot");
    }
    if target.ip().is_loopback() && target.port() == shared.listeners.outbound {
        return refuse(&shared, &snap, stream, flow, None, "loop");
    }
    if let Some(r) = snap.registry.get(&target.ip()).cloned() {
        // PU to PU: through the mesh tunnel, decided on the peer's certificate.
        flow.destination.pu = Some(r.qualified());
        return crate::mesh::connect(shared, snap, stream, target, r, flow).await;
    }
    let (d, networks) = decide_external(
        &snap,
        Direction::Outgoing,
        target.ip(),
        target.port(),
        &shared.metrics,
    );
    flow.destination.external = networks;
    if d.verdict == Verdict::Reject {
        return refuse(&shared, &snap, stream, flow, Some(&d), reason_str(&d));
    }
    forward(shared.clone(), snap, stream, target, flow, d).await;
}

/// A connection to our PU from outside, TPROXYed to us: the local address is the
/// original destination.
async fn inbound(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let snap = shared.snapshot();
    let started = Instant::now();
    let target = match stream.local_addr() {
        Ok(t) => SocketAddr::new(t.ip().to_canonical(), t.port()),
        Err(_) => {
            shared.error(ErrorKind::OriginalDst);
            return socket::reset(stream);
        }
    };
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let mut destination = endpoint(target);
    destination.pu = Some(snap.pu_qualified());
    let mut flow = Flow {
        started,
        time: now_rfc3339(),
        dir: Dir::Inbound,
        source: endpoint(peer),
        destination,
    };
    if snap.is_fail_closed() {
        return refuse(&shared, &snap, stream, flow, None, "no-snapshot");
    }
    if target.port() == shared.listeners.inbound {
        return refuse(&shared, &snap, stream, flow, None, "loop");
    }
    if let Some(r) = snap.registry.get(&peer.ip()) {
        // A registered PU must come through the tunnel with its certificate.
        flow.source.pu = Some(r.qualified());
        return refuse(&shared, &snap, stream, flow, None, "registered-pu");
    }
    let (d, networks) = decide_external(
        &snap,
        Direction::Incoming,
        peer.ip(),
        target.port(),
        &shared.metrics,
    );
    flow.source.external = networks;
    if d.verdict == Verdict::Reject {
        return refuse(&shared, &snap, stream, flow, Some(&d), reason_str(&d));
    }
    forward(shared.clone(), snap, stream, target, flow, d).await;
}
