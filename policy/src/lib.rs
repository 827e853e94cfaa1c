//! segmesh's policy model and decision engine. Pure: no I/O, no async.
//!
//! # Layout
//! - [`tag`]: tags (`key=value`), patterns (`key=*`) and tag sets.
//! - [`selector`]: selectors, OR of ANDs of patterns.
//! - [`ports`]: `tcp/N`, `tcp/N-M`, `any`.
//! - [`service`]: Services, virtual addresses in front of endpoints.
//! - [`namespace`]: the namespace tree and its settings (discovery, default tier).
//! - [`network`]: external networks (CIDRs, IPs, domain names).
//! - [`policy`]: network policies (action, mode, tier, staged, encrypt, log).
//! - [`set`]: a validated, deterministically ordered set of all of the above.
//! - [`limits`]: bounds on every size the engine depends on.
//! - [`load`]: YAML documents to a set, with file:line:col diagnostics.
//! - [`decision`]: the inputs and the result of one enforcer's decision.
//! - [`engine`]: the compiled, indexed evaluator enforcers use.
//! - [`naive`]: the reference evaluator that checks the engine.
//! - [`testcase`]: `PolicyTest` cases evaluated at both ends.
//! - [`explain`]: decisions rendered for people.

pub mod decision;
pub mod engine;
pub mod explain;
pub mod limits;
pub mod load;
pub mod naive;
pub mod namespace;
pub mod network;
pub mod policy;
pub mod ports;
pub mod selector;
pub mod service;
pub mod set;
pub mod tag;
pub mod testcase;
mod yaml;

pub use decision::{Decision, Direction, Peer, Pu, Reason, Verdict};
pub use engine::{Engine, PreparedPeer, PreparedPu};
pub use load::{Diagnostic, LoadError, Loaded, Source, load};
pub use namespace::{Namespace, NamespacePath};
pub use network::{Address, Entry, ExternalNetwork};
pub use policy::{Action, Location, Mode, NetworkPolicy, PolicyId, Tier};
pub use ports::{FlowPort, PortRange, Ports, Protocol};
pub use selector::Selector;
pub use service::{Endpoints, Service, ServicePort};
pub use set::PolicySet;
pub use tag::{Tag, TagPattern, TagSet};
pub use testcase::{CaseEnd, CaseOutcome, EndResult, TestCase, evaluate};
