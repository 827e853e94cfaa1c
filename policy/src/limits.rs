//! Bounds on everything a policy author writes that the engine's size depends on.
//! Validation (YAML and [`PolicySet::new`](crate::PolicySet::new), which every enforcer
//! runs on what the console sends) refuses anything beyond them with a precise error,
//! so no input can make compilation panic or exhaust an enforcer's memory.

/// Clauses (OR) in one selector.
pub const MAX_CLAUSES: usize = 256;
/// Tag patterns (AND) in one clause.
pub const MAX_CLAUSE_TAGS: usize = 64;
/// Port ranges in one list.
pub const MAX_PORTS: usize = 1024;
/// Tags of one external network.
pub const MAX_TAGS: usize = 256;
/// Entries (CIDRs, addresses, domains) of one external network.
pub const MAX_ENTRIES: usize = 4096;
/// Policies in a set (rule sets count one per rule), and external networks.
pub const MAX_POLICIES: usize = 100_000;
/// Documents in one load.
pub const MAX_DOCUMENTS: usize = 100_000;

// The engine indexes clauses with u16.
const _: () = assert!(MAX_CLAUSES <= u16::MAX as usize);
