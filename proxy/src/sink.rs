//! Where flow records go: a JSON-lines log written by one task from a bounded queue (so
//! a slow disk never stalls a connection; records beyond the queue are dropped and
//! counted), and the queue of records for the console (console mode). Both can be
//! flushed at shutdown.

use std::io::Write;
use std::time::Duration;

use segmesh_api::FlowRecord;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

const QUEUE: usize = 8192;
/// Records queued for the console at most; more are dropped and counted.
pub const CONSOLE_QUEUE: usize = 10_000;

/// A record, or a request to write out everything queued before it.
// Records are nearly every entry: boxing them to shrink the rare flush would cost an
// allocation per record.
#[allow(clippy::large_enum_variant)]
pub enum Entry {
    Record(FlowRecord),
    Flush(oneshot::Sender<()>),
}

/// The JSON-lines flow log.
pub struct FlowLog {
    tx: Option<mpsc::Sender<Entry>>,
}

impl FlowLog {
    /// `dest`: a path (appended to), `-` for stdout, or none (records discarded).
    pub fn open(dest: Option<&str>) -> std::io::Result<FlowLog> {
        let Some(dest) = dest else {
            return Ok(FlowLog { tx: None });
        };
        let mut out: Box<dyn Write + Send> = if dest == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dest)?,
            )
        };
        let (tx, mut rx) = mpsc::channel::<Entry>(QUEUE);
        tokio::task::spawn_blocking(move || {
            while let Some(e) = rx.blocking_recv() {
                match e {
                    Entry::Record(r) => {
                        let mut line = serde_json::to_vec(&r).expect("flow records serialize");
                        line.push(b'\n');
                        if out.write_all(&line).is_err() {
                            tracing::warn!("cannot write flow records; dropping them");
                        }
                        if rx.is_empty() {
                            let _ = out.flush();
                        }
                    }
                    Entry::Flush(done) => {
                        let _ = out.flush();
                        let _ = done.send(());
                    }
                }
            }
            let _ = out.flush();
        });
        Ok(FlowLog { tx: Some(tx) })
    }

    fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }
}

/// Every destination of this enforcer's flow records.
pub struct Sinks {
    log: FlowLog,
    console: Option<mpsc::Sender<Entry>>,
}

impl Sinks {
    pub fn new(log: FlowLog, console: Option<mpsc::Sender<Entry>>) -> Sinks {
        Sinks { log, console }
    }

    /// Sends a record to the console (console mode) and to the flow log (if any); a copy
    /// only when both take it. What a full queue drops is counted.
    pub fn record(&self, r: FlowRecord, metrics: &Metrics) {
        let to_console = |r: FlowRecord, tx: &mpsc::Sender<Entry>| {
            if tx.try_send(Entry::Record(r)).is_err() {
                metrics.console_flows_dropped.inc();
            }
        };
        match &self.console {
            Some(tx) if !self.log.is_enabled() => return to_console(r, tx),
            Some(tx) => to_console(r.clone(), tx),
            None => {}
        }
        if let Some(tx) = &self.log.tx {
            if tx.try_send(Entry::Record(r)).is_err() {
                metrics.flow_records_dropped.inc();
            }
        }
    }

    /// Writes out (and sends to the console) what is queued, waiting at most `limit`.
    pub async fn flush(&self, limit: Duration) {
        let flush = |tx: mpsc::Sender<Entry>| async move {
            let (done, wait) = oneshot::channel();
            if tx.send(Entry::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        };
        let both = async {
            tokio::join!(
                async {
                    if let Some(tx) = self.log.tx.clone() {
                        flush(tx).await
                    }
                },
                async {
                    if let Some(tx) = self.console.clone() {
                        flush(tx).await
                    }
                }
            )
        };
        if tokio::time::timeout(limit, both).await.is_err() {
            tracing::warn!(
                ?limit,
                "flow records still queued at exit (the console or the disk is slow)"
            );
        }
    }
}
