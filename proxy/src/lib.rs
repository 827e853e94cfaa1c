//! The segmesh enforcer: a transparent L4 proxy for one workload (or one host).
//!
//! # Layout
//! - [`config`]: the local configuration file.
//! - [`snapshot`]: what is enforced (PU, compiled policies, registry), swapped whole.
//! - [`enforcer`]: listeners, per-connection decisions, reloads.
//! - [`console`]: console mode (registration, renewal, snapshot watch and cache, flow
//!   records to the console).
//! - [`open`]: the open flows, re-decided on every new snapshot.
//! - [`splice`]: the zero-copy data plane (splice through pipes; copy fallback).
//! - [`mesh`]: the mesh tunnel between enforcers (mTLS, decisions at both ends, data modes).
//! - [`pool`]: pre-established tunnel connections to busy peers.
//! - [`tunnel`]: the mesh tunnel's wire format (request, response, reason codes).
//! - [`socket`]: socket options and syscalls (original destination, transparency, RST).
//! - [`flows`]: flow records as JSON lines.
//! - [`metrics`], [`admin`]: Prometheus metrics and the admin endpoints.

pub mod admin;
pub mod config;
pub mod console;
pub mod enforcer;
pub mod flows;
pub mod mesh;
pub mod metrics;
pub mod open;
pub mod pool;
pub mod snapshot;
pub mod socket;
pub mod splice;
pub mod tunnel;
