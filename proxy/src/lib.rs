//! The segmesh enforcer: a transparent L4 proxy for one workload (or one host).
//!
//! # Layout
//! Along the path of a connection, each module depending only on those below it:
//! - [`enforcer`]: start-up (configuration source, first snapshot, binding every
//!   listener) and the accept loops; graceful shutdown.
//! - `outbound`, `inbound`: a captured connection of our PU (original destination from
//!   `SO_ORIGINAL_DST`) or to it (TPROXY: the local address).
//! - `plan`: what to do with it, without I/O: refuse and why, the mesh tunnel to a PU,
//!   or a plain flow decided against external networks (table-tested).
//! - `dispatch`: carries a plan out.
//! - `mesh`: the tunnel between enforcers: `mesh::client` (our PU connects),
//!   `mesh::server` (a peer's PU connects to ours), `mesh::conns` (one multiplexed
//!   connection per peer enforcer), `mesh::tickets` (authenticated-only flows'
//!   single-use tickets), `mesh::wire` (requests, answers, tickets, reason codes).
//! - `plain`: flows to and from external networks: connect and splice.
//! - `udp`: UDP sessions our PU opens (TPROXY, one session per 5-tuple, bounded).
//! - `queued`: packets the capture rules queue to the enforcer (NFQUEUE): ICMP echo
//!   requests and the first datagram of inbound UDP sessions, each decided on policy.
//! - `dns`: the names our PU resolved (learned from its own DNS answers), for
//!   domain-name external networks.
//! - `relay`: the byte movers: `relay::splice` (zero-copy, copy fallback) and
//!   `relay::tls` (encrypted tunnel flows).
//! - `flow`: a flow and its recorder, the one place a flow record is made.
//! - `source`: where snapshots come from (`source::console` or a local file),
//!   feeding [`state::Shared::install`].
//! - [`state`]: the settings the enforcer started with, apart from its runtime handles.
//! - [`snapshot`]: what is enforced (PU, compiled policies, registry), swapped whole.
//! - `open`: the open flows, re-decided on every new snapshot.
//! - `sink`: where flow records go (JSON lines, the console).
//! - [`config`], [`metrics`], `admin`, `socket`: the configuration, Prometheus
//!   metrics and the admin endpoints, socket options and syscalls.

mod admin;
pub mod alloc;
mod child;
pub mod config;
mod dispatch;
mod dns;
pub mod enforcer;
mod flow;
mod inbound;
pub mod local;
mod mesh;
pub mod metrics;
mod open;
mod outbound;
mod plain;
mod plan;
mod queued;
mod relay;
mod service;
mod sink;
pub mod snapshot;
mod socket;
mod source;
pub mod state;
mod udp;
