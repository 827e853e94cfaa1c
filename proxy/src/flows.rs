//! Flow records as JSON lines, written by one task from a bounded queue so a slow disk
//! never stalls a connection (records beyond the queue are dropped and counted).

use std::io::Write;

use segmesh_api::FlowRecord;
use tokio::sync::mpsc;

const QUEUE: usize = 8192;

pub struct FlowLog {
    tx: Option<mpsc::Sender<FlowRecord>>,
}

impl FlowLog {
    /// `dest`: a path (appended to), `-` for stdout, or none (records discarded).
    pub fn open(
        dest: Option<&str>,
    ) -> std::io::Result<(FlowLog, Option<tokio::task::JoinHandle<()>>)> {
        let Some(dest) = dest else {
            return Ok((FlowLog { tx: None }, None));
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
        let (tx, mut rx) = mpsc::channel::<FlowRecord>(QUEUE);
        let task = tokio::task::spawn_blocking(move || {
            while let Some(r) = rx.blocking_recv() {
                let mut line = serde_json::to_vec(&r).expect("flow records serialize");
                line.push(b'\n');
                if out.write_all(&line).is_err() {
                    tracing::warn!("cannot write flow records; dropping them");
                }
                if rx.is_empty() {
                    let _ = out.flush();
                }
            }
            let _ = out.flush();
        });
        Ok((FlowLog { tx: Some(tx) }, Some(task)))
    }

    /// Whether records go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a record; false if it had to be dropped.
    pub fn record(&self, r: FlowRecord) -> bool {
        match &self.tx {
            Some(tx) => tx.try_send(r).is_ok(),
            None => true,
        }
    }
}
