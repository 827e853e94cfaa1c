//! Where snapshots come from: a local configuration file ([`file`]: reloaded on change
//! and on SIGHUP) or the console ([`console`]: registration, renewal, a long-poll watch
//! and an on-disk cache). Both build a [`Snapshot`](crate::snapshot::Snapshot) and hand
//! it to [`Shared::install`](crate::state::Shared::install); a snapshot that cannot be
//! built leaves the previous one in force.

pub mod console;
pub(crate) mod file;
