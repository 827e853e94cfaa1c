//! What the enforcer's and the console's servers share: one accept loop with one error
//! policy, and one backoff for everything that retries.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Exponential backoff: `min`, doubled after each failure, capped at `max`; back to `min`
/// after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
            failures: 0,
        }
    }

    /// The wait after one more failure.
    pub fn fail(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn succeed(&mut self) {
        self.next = self.min;
        self.failures = 0;
    }
}

/// Whether an `accept(2)` error says the process or the machine is out of a resource
/// (descriptors, buffers, memory): retrying at once would spin, so the loop backs off.
/// Every other accept error concerns one connection (ECONNABORTED, EPERM from a
/// firewall, ...) and the loop goes on at once.
pub fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts connections until `stop` completes and hands each to `handle` (which spawns
/// what serves it). Out of descriptors or memory, it backs off (5 ms doubling to 1 s);
/// any other accept error is one connection's and is skipped. A connection's error never
/// stops the listener.
pub async fn accept_loop<F>(
    listener: TcpListener,
    name: &'static str,
    stop: impl Future<Output = ()>,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr),
{
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.succeed();
                handle(stream, peer);
            }
            Err(e) if is_resource_exhaustion(&e) => {
                let wait = backoff.fail();
                tracing::warn!(error = %e, listener = name, retry_in = ?wait, "accept: out of resources");
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => tracing::debug!(error = %e, listener = name, "accept failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(1));
        let waits: Vec<_> = (0..4).map(|_| b.fail()).collect();
        assert_eq!(
            waits,
            [250, 500, 1000, 1000].map(Duration::from_millis).to_vec()
        );
        assert_eq!(b.failures(), 4);
        b.succeed();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.fail(), Duration::from_millis(250));
    }

    #[test]
    fn only_resource_errors_back_off() {
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_resource_exhaustion(&std::io::Error::from_raw_os_error(
                code
            )));
        }
        // ECONNABORTED: one connection's problem.
        assert!(!is_resource_exhaustion(&std::io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }

    /// A listener keeps serving after connections that fail, and stops when told.
    #[tokio::test]
    async fn accept_loop_serves_until_stopped() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(accept_loop(
            l,
            "test",
            async {
                let _ = stop_rx.await;
            },
            move |s, _| {
                let _ = tx.send(s);
            },
        ));
        for _ in 0..3 {
            let c = TcpStream::connect(addr).await.unwrap();
            // The client resets at once: the server side's error is that connection's.
            socket2::SockRef::from(&c)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(c);
            assert!(rx.recv().await.is_some());
        }
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop stops")
            .unwrap();
    }
}
