//! segmesh capture rules: every TCP connection of a workload goes through its enforcer,
//! in both address families. Depends on no other segmesh crate.
//!
//! # Layout
//! - [`rules`]: the rules as `iptables-restore` lines, generated without I/O.
//! - [`apply`]: apply atomically, check, and clean up on the live system.

pub mod apply;
pub mod rules;
