//! Encrypted flows: bytes between the application's socket and the tunnel's TLS stream,
//! encrypted and decrypted by rustls in user space. Kernel TLS would carry them without
//! user-space copies; this build only detects it ([`ktls_available`], logged at start).

use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Moved;
use super::splice::{Close, DataPath, Progress};

/// Whether the kernel offers the `tls` upper-layer protocol (kernel TLS).
pub fn ktls_available() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|s| s.split_whitespace().any(|u| u == "tls"))
}

/// Copy buffer of one direction while bytes flow. 64 KiB: 16 KiB (one TLS record) cut
/// encrypted bulk throughput by about half on the load-test machine.
const TLS_BUF: usize = 64 * 1024;

/// Polls `f` once: its output if ready now, None if it would wait (the future is then
/// dropped, so it must be cancel-safe).
async fn now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| match f.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// Copies `r` to `w` until `r` ends, then shuts `w` down; `moved` counts the bytes. An
/// idle direction waits with one byte of room: the copy buffer is taken when bytes
/// arrive and given back as soon as none are waiting, so an idle flow holds none.
async fn copy_lazily<R, W>(mut r: R, mut w: W, moved: &AtomicU64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut first = [0u8; 1];
        if r.read(&mut first).await? == 0 {
            return w.shutdown().await;
        }
        let mut buf = Vec::with_capacity(TLS_BUF);
        buf.push(first[0]);
        let mut ended = false;
        loop {
            // Whatever else is already there, without waiting.
            while buf.len() < TLS_BUF {
                match now(r.read_buf(&mut buf)).await {
                    Some(Ok(0)) => {
                        ended = true;
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => break,
                }
            }
            if buf.is_empty() {
                break;
            }
            w.write_all(&buf).await?;
            moved.fetch_add(buf.len() as u64, Ordering::Relaxed);
            buf.clear();
            if ended {
                break;
            }
        }
        w.flush().await?;
        if ended {
            return w.shutdown().await;
        }
    }
}

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
        r = async {
            let (app_r, app_w) = app.split();
            let (tls_r, tls_w) = tokio::io::split(&mut *tls);
            tokio::try_join!(
                copy_lazily(app_r, tls_w, &progress.forward),
                copy_lazily(tls_r, app_w, &progress.backward),
            )
        } => End::Copied(r.map(|_| moved())),
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

    /// A lazy copy moves every byte in order, bursts and trickles alike, counts them,
    /// and passes the end on as a shutdown.
    #[tokio::test]
    async fn lazy_copies_are_exact_and_pass_the_end_on() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut src, r) = tokio::io::duplex(4096);
        let (w, mut dst) = tokio::io::duplex(4096);
        let moved = std::sync::Arc::new(AtomicU64::new(0));
        let m = moved.clone();
        let copy = tokio::spawn(async move { copy_lazily(r, w, &m).await });
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            // A trickle of single bytes, then bulk.
            for b in &sent[..100] {
                src.write_all(&[*b]).await.unwrap();
                tokio::task::yield_now().await;
            }
            src.write_all(&sent[100..]).await.unwrap();
            src.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        dst.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        copy.await.unwrap().unwrap();
        assert_eq!(got, data);
        assert_eq!(moved.load(Ordering::Relaxed), data.len() as u64);
    }
}
