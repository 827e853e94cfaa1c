//! Encrypted flows: bytes between the application's socket and the tunnel's TLS stream,
//! encrypted and decrypted by rustls in user space. Kernel TLS would carry them without
//! user-space copies; this build only detects it ([`ktls_available`], logged at start).

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::Moved;
use super::splice::{Close, DataPath, Progress};

/// Whether the kernel offers the `tls` upper-layer protocol (kernel TLS).
pub fn ktls_available() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|s| s.split_whitespace().any(|u| u == "tls"))
}

/// A stream that counts what is read from it (`forward`) and written to it
/// (`backward`), so a relay stopped midway still knows what it moved.
struct Counted<'a, S> {
    inner: &'a mut S,
    progress: &'a Progress,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        this.progress.forward.fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.progress
                .backward
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Copy buffer per direction of an encrypted flow. 64 KiB: 16 KiB (one TLS record) cut
/// encrypted bulk throughput by about half on the load-test machine; the price is memory
/// on every open encrypted flow, idle or not (see the load-test report).
const TLS_BUF: usize = 64 * 1024;

/// Relays through TLS until both sides end, `stop` is notified, or no byte moved either
/// way for `idle` (as spliced flows do); what moved is counted from `app`'s side (app →
/// peer is forward). A flow stopped by a policy resets the application's connection.
pub(crate) async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    mut app: TcpStream,
    tls: &mut S,
    idle: std::time::Duration,
    stop: &tokio::sync::Notify,
) -> Moved {
    let progress = Progress::default();
    let mut counted = Counted {
        inner: &mut app,
        progress: &progress,
    };
    let moved = || {
        (
            progress.forward.load(Ordering::Relaxed),
            progress.backward.load(Ordering::Relaxed),
        )
    };
    let idled = async {
        let tick = (idle / 4).max(std::time::Duration::from_millis(10));
        let (mut last, mut since) = (moved(), tokio::time::Instant::now());
        loop {
            tokio::time::sleep(tick).await;
            let now = moved();
            if now != last {
                (last, since) = (now, tokio::time::Instant::now());
            } else if since.elapsed() >= idle {
                return;
            }
        }
    };
    enum End {
        Copied(std::io::Result<(u64, u64)>),
        Stopped,
        Idle,
    }
    let end = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut counted, tls, TLS_BUF, TLS_BUF) => End::Copied(r),
        _ = stop.notified() => End::Stopped,
        _ = idled => End::Idle,
    };
    let (f, b) = moved();
    let copied = match end {
        End::Copied(r) => Some(r),
        End::Stopped => None,
        End::Idle => {
            return Moved {
                forward: f,
                backward: b,
                path: DataPath::Copied,
                close: Close::Idle,
                tls: true,
            };
        }
    };
    let (forward, backward, close) = match copied {
        Some(Ok((a, b))) => (a, b, Close::Closed),
        None => (f, b, Close::Policy),
        Some(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            (f, b, Close::Reset)
        }
        Some(Err(_)) => (f, b, Close::Error),
    };
    if close == Close::Policy {
        crate::socket::reset(app);
    }
    Moved {
        forward,
        backward,
        path: DataPath::Copied,
        close,
        tls: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An encrypted flow with no bytes either way ends after the idle timeout (it held
    /// a connection and 128 KiB of buffers forever before).
    #[tokio::test]
    async fn an_idle_encrypted_flow_ends() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (app, _) = l.accept().await.unwrap();
        let (mut peer, _other_end) = tokio::io::duplex(1024);
        let stop = tokio::sync::Notify::new();
        let started = std::time::Instant::now();
        let m = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            relay(app, &mut peer, std::time::Duration::from_millis(200), &stop),
        )
        .await
        .expect("ended by itself");
        assert_eq!(m.close, Close::Idle);
        assert!(started.elapsed() >= std::time::Duration::from_millis(200));
        drop(client);
    }
}
