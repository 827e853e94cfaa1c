//! File mode: the local configuration file and what it names (policies, identity files),
//! loaded at start and again on SIGHUP or when any of them changes (atomically; a broken
//! configuration keeps the previous one).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::{LocalConfig, expand};
use crate::snapshot::Snapshot;
use crate::state::Shared;

/// The snapshot to start with: the file's, or fail closed when it is broken.
pub(crate) fn initial(path: &std::path::Path) -> Snapshot {
    match Snapshot::load(path, None) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "no valid configuration: rejecting every connection until one loads");
            Snapshot::fail_closed()
        }
    }
}

/// Loads the configuration file again; keeps the current one if the new one is broken.
pub(crate) fn reload(shared: &Shared, path: &std::path::Path, why: &str) -> bool {
    match Snapshot::load(path, Some(&shared.snapshot())) {
        Ok(s) => {
            if let Some(cfg) = &s.config {
                let settings = &shared.settings;
                if cfg.listeners != settings.listeners || cfg.limits != settings.limits {
                    tracing::warn!("listener ports and limits change only on restart");
                }
                if cfg.console.is_some() {
                    tracing::warn!("a console section takes effect only on restart");
                }
            }
            shared.install(s, why);
            true
        }
        Err(e) => {
            shared.rejected(format!("the configuration ({why}): {e}"));
            false
        }
    }
}

/// What a file looked like: its modification time and length.
type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn fingerprint(roots: &[PathBuf]) -> Fingerprint {
    expand(roots)
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
}

/// Watches for SIGHUP and for changes of the configuration and policy files, until the
/// task is aborted.
pub(crate) async fn watch(shared: Arc<Shared>, path: PathBuf) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    // The files the configuration names, even when the last load failed on one of
    // them (fixing that file must trigger a reload). Parsed only at start, on SIGHUP and
    // after a change; each tick only lists folders and reads file metadata.
    let roots_of = || {
        LocalConfig::load(&path)
            .map(|c| c.watch_roots(&path))
            .unwrap_or_else(|_| vec![path.clone()])
    };
    let mut roots = roots_of();
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
        roots = roots_of();
        last = fingerprint(&roots);
        let (s, p) = (shared.clone(), path.clone());
        let _ = tokio::task::spawn_blocking(move || reload(&s, &p, why)).await;
    }
}
