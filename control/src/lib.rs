//! segmesh's console (control plane) and the `segmeshctl` command line.
//!
//! # Layout
//! - [`ca_cli`]: `segmeshctl ca init|issue|inspect`, an offline CA.
//! - [`store`]: the console's storage trait, embedded (redb) and on etcd (replicas).
//! - [`shared`]: what replicas share through etcd, sealed under a key-encryption key.
//! - [`console`]: apply/diff/commit/rollback, tokens and roles, on a store.
//! - [`server`]: the console's HTTPS API; [`client`]: segmeshctl's side of it.
//! - [`inject`]: Kubernetes sidecar injection (CLI and admission webhook).
//! - [`files`]: reading policy files and folders for offline commands.
//! - [`offline`]: `segmeshctl test` and `segmeshctl explain` on files.
//! - [`suggest`]: least-privilege policies from discovered flows.
//! - [`style`]: terminal colors, off unless stdout is a terminal and `NO_COLOR` is unset.

pub mod ca_cli;
pub mod client;
pub mod cluster;
pub mod console;
pub mod files;
pub mod inject;
pub mod offline;
pub mod server;
pub mod shared;
pub mod store;
pub mod style;
pub mod suggest;
