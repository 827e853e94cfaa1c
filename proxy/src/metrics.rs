//! Prometheus metrics of the enforcer (text exposition on the admin port's `/metrics`).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use segmesh_policy::Direction;

/// The `direction` label of a flow: `Outbound` (our PU connects) or `Inbound` (our PU
/// accepts).
pub fn direction_label(d: Direction) -> &'static str {
    match d {
        Direction::Outgoing => "Outbound",
        Direction::Incoming => "Inbound",
    }
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum VerdictLabel {
    Allow,
    Reject,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ErrorKind {
    ConnectFailed,
    ConnectTimeout,
    Reset,
    Idle,
    Overload,
    OriginalDst,
    Io,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: &'static str,
    pub verdict: VerdictLabel,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    pub direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: ErrorKind,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Role {
    Client,
    Server,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub role: Role,
    /// `ok`, `resumed`, or why the peer was refused (`unknown_issuer`, `expired`, ...).
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// What happened (each family's help lists its results).
    pub result: &'static str,
}

/// Adds `n` to `family`'s count of `result`.
pub fn count(family: &Family<PoolLabels, Counter>, result: &'static str, n: u64) {
    family.get_or_create(&PoolLabels { result }).inc_by(n);
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub connections: Family<ConnLabels, Counter>,
    pub open: Family<DirLabels, Gauge>,
    pub bytes: Family<DirLabels, Counter>,
    pub spliced_bytes: Counter,
    pub kernel_bytes: Counter,
    pub kernel_flows: Gauge,
    pub copied_bytes: Counter,
    pub copy_fallbacks: Counter,
    pub decision_seconds: Histogram,
    pub errors: Family<ErrorLabels, Counter>,
    pub flow_records_dropped: Counter,
    pub reloads: Family<ReloadLabels, Counter>,
    pub handshakes: Family<HandshakeLabels, Counter>,
    pub tls_bytes: Counter,
    pub first_bytes: Counter,
    pub pool: Family<PoolLabels, Counter>,
    pub tickets: Family<PoolLabels, Counter>,
    pub data_connections: Family<PoolLabels, Counter>,
    pub console_flows_dropped: Counter,
    pub console_flows_sent: Counter,
    pub console_requests: Family<ReloadLabels, Counter>,
    pub closed_by_policy: Counter,
    pub udp_sessions: Gauge,
    pub udp_evictions: Counter,
    pub udp_bytes: Counter,
    pub udp_dropped: Counter,
    pub registry_conflicts: Gauge,
    pub snapshot_rejected: Gauge,
    /// Bytes the allocator has handed out and not had back (read when scraped).
    pub heap_in_use: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("segmesh");
        let m = Metrics {
            connections: Family::default(),
            open: Family::default(),
            bytes: Family::default(),
            spliced_bytes: Counter::default(),
            kernel_bytes: Counter::default(),
            kernel_flows: Gauge::default(),
            copied_bytes: Counter::default(),
            copy_fallbacks: Counter::default(),
            // 100 ns .. ~3.3 ms.
            decision_seconds: Histogram::new(exponential_buckets(1e-7, 2.0, 16)),
            errors: Family::default(),
            flow_records_dropped: Counter::default(),
            reloads: Family::default(),
            handshakes: Family::default(),
            tls_bytes: Counter::default(),
            first_bytes: Counter::default(),
            pool: Family::default(),
            tickets: Family::default(),
            data_connections: Family::default(),
            console_flows_dropped: Counter::default(),
            console_flows_sent: Counter::default(),
            console_requests: Family::default(),
            closed_by_policy: Counter::default(),
            udp_sessions: Gauge::default(),
            udp_evictions: Counter::default(),
            udp_bytes: Counter::default(),
            udp_dropped: Counter::default(),
            registry_conflicts: Gauge::default(),
            snapshot_rejected: Gauge::default(),
            heap_in_use: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Connections decided, by direction and verdict",
            m.connections.clone(),
        );
        registry.register(
            "open_connections",
            "Connections being relayed now",
            m.open.clone(),
        );
        registry.register(
            "bytes",
            "Bytes relayed (both ways), by direction",
            m.bytes.clone(),
        );
        registry.register(
            "spliced_bytes",
            "Bytes moved with splice(2), never copied to user space",
            m.spliced_bytes.clone(),
        );
        registry.register(
            "kernel_bytes",
            "Bytes the kernel redirected between a flow's sockets (BPF sockmap)",
            m.kernel_bytes.clone(),
        );
        registry.register(
            "kernel_flows",
            "Flows the kernel relay (BPF sockmap) is moving now",
            m.kernel_flows.clone(),
        );
        registry.register(
            "copied_bytes",
            "Bytes moved through a user-space buffer",
            m.copied_bytes.clone(),
        );
        registry.register(
            "copy_fallbacks",
            "Connections that could not be spliced and were copied",
            m.copy_fallbacks.clone(),
        );
        registry.register(
            "decision_seconds",
            "Time to decide one flow",
            m.decision_seconds.clone(),
        );
        registry.register(
            "connection_errors",
            "Connections that ended in an error, by kind",
            m.errors.clone(),
        );
        registry.register(
            "flow_records_dropped",
            "Flow records dropped because the writer fell behind",
            m.flow_records_dropped.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads, by result",
            m.reloads.clone(),
        );
        registry.register(
            "tunnel_handshakes",
            "Mesh tunnel TLS handshakes by role and result (resumed ones counted as `resumed`)",
            m.handshakes.clone(),
        );
        registry.register(
            "tls_bytes",
            "Bytes moved encrypted through the mesh tunnel (rustls in user space)",
            m.tls_bytes.clone(),
        );
        registry.register(
            "tunnel_first_bytes",
            "Bytes applications had sent when their flow's request went out on a tunnel stream, sent right behind it (the client's first request waits for no answer); the server holds them until both ends decided",
            m.first_bytes.clone(),
        );
        registry.register(
            "tunnel_connections",
            "Outbound tunnel flows by whether they took an established multiplexed connection (`reused`) or needed a new one (`new`)",
            m.pool.clone(),
        );
        registry.register(
            "tunnel_tickets",
            "Authenticated-only tunnel tickets: `issued`, `redeemed`, `expired`, `unknown` (never issued, used or expired), `address` (presented from another address), `full` (none issued: the table is full); from books: `book-issued`, `book-redeemed`, `book-unknown` (never issued, used, expired or its connection ended), `book-address`, `book-void` (swept unused), `book-full` (fewer issued than asked); on the client: `book-received` (tickets its books got); moving flows: `move-issued`, `move-redeemed`, `move-unknown` (never issued, used, or its flow ended), `move-address` (presented from another address), and on the client `move-accepted`, `move-refused`",
            m.tickets.clone(),
        );
        registry.register(
            "tunnel_data_connections",
            "Authenticated-only flows opened with book tickets, by how their data connection came: a `spare` opened ahead of the flow, or `opened` on the flow's path; and spares closed unused (`spare-expired`) or found closed by the peer when taken or used (`spare-closed`)",
            m.data_connections.clone(),
        );
        registry.register(
            "console_flow_records_dropped",
            "Flow records dropped because the queue to the console was full (console away)",
            m.console_flows_dropped.clone(),
        );
        registry.register(
            "console_flow_records_sent",
            "Flow records the console acknowledged",
            m.console_flows_sent.clone(),
        );
        registry.register(
            "console_requests",
            "Requests to the console (registration, snapshot, flows) by result",
            m.console_requests.clone(),
        );
        registry.register(
            "closed_by_policy",
            "Open connections closed because a new snapshot rejects them",
            m.closed_by_policy.clone(),
        );
        registry.register(
            "udp_sessions",
            "UDP sessions in the table (allowed and refused, until they expire)",
            m.udp_sessions.clone(),
        );
        registry.register(
            "udp_evictions",
            "UDP sessions pushed out of the full table by newer ones",
            m.udp_evictions.clone(),
        );
        registry.register(
            "udp_bytes",
            "Bytes of UDP datagrams relayed",
            m.udp_bytes.clone(),
        );
        registry.register(
            "udp_dropped",
            "UDP datagrams dropped (refused sessions, full socket buffers)",
            m.udp_dropped.clone(),
        );
        registry.register(
            "registry_conflicts",
            "Addresses the enforced snapshot's registry gives to more than one PU (skipped: no PU is reachable there)",
            m.registry_conflicts.clone(),
        );
        registry.register(
            "snapshot_rejected",
            "1 while the newest snapshot offered cannot be built (the previous one is enforced; /ready says why)",
            m.snapshot_rejected.clone(),
        );
        registry.register(
            "heap_in_use_bytes",
            "Heap bytes in use (glibc's count, mallinfo2: allocated and not freed; 0 where the C library is not glibc). RSS also holds freed memory kept for reuse; this is what the enforcer's state takes",
            m.heap_in_use.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        if let Some(b) = crate::alloc::heap_in_use() {
            self.heap_in_use.set(b as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
