//! UDP sessions through the mesh tunnel: datagrams between a UDP socket on our side (the
//! workload's) and frames inside the tunnel's TLS stream (see
//! [`wire`](crate::mesh::wire)), until the session is idle, stopped by a new snapshot,
//! evicted, or ended by either side.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::splice::Close;
use crate::mesh::wire::{frame, frame_len};

/// What a session moved: datagrams and bytes from our side into the tunnel (`sent`)
/// and back.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counts {
    pub sent: u64,
    pub sent_bytes: u64,
    pub received: u64,
    pub received_bytes: u64,
}

/// Our side of a session: the socket the workload's datagrams come from and answers go
/// to, and (client role) datagrams that reached the enforcer another way (the capture
/// socket, before the session's own socket existed).
pub(crate) struct Local<'a> {
    pub sock: &'a UdpSocket,
    pub early: Option<&'a mut mpsc::Receiver<Vec<u8>>>,
}

/// Why the loop ends, besides the data.
pub(crate) struct Ends<'a> {
    pub idle: Duration,
    pub stop: &'a Notify,
    pub evict: Option<&'a Notify>,
    /// Called on every datagram either way (the session table's recency).
    pub touch: &'a (dyn Fn() + Sync),
}

/// Relays until the session ends; returns what moved and how it ended.
pub(crate) async fn relay<S>(stream: S, local: Local<'_>, ends: Ends<'_>) -> (Counts, Close)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Frames from the tunnel, read by a task of their own (a frame read is not
    // cancel-safe inside a select).
    let (tx, mut from_tunnel) = mpsc::channel::<Vec<u8>>(256);
    let reader = tokio::spawn(async move {
        loop {
            let mut h = [0u8; 2];
            if rd.read_exact(&mut h).await.is_err() {
                return;
            }
            let Ok(n) = frame_len(h) else { return };
            let mut d = vec![0u8; n];
            if rd.read_exact(&mut d).await.is_err() || tx.send(d).await.is_err() {
                return;
            }
        }
    });
    let mut counts = Counts::default();
    let mut last = Instant::now();
    let Local { sock, mut early } = local;
    let close = loop {
        let early_next = async {
            match early.as_mut() {
                Some(r) => r.recv().await,
                None => std::future::pending().await,
            }
        };
        let evicted = async {
            match ends.evict {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        // What goes into the tunnel this round, if anything.
        let out: Option<Vec<u8>> = tokio::select! {
            d = from_tunnel.recv() => match d {
                Some(d) => {
                    last = Instant::now();
                    (ends.touch)();
                    counts.received += 1;
                    counts.received_bytes += d.len() as u64;
                    let _ = sock.try_send(&d);
                    None
                }
                // The other end closed the session.
                None => break Close::Closed,
            },
            // Copied out of the thread's scratch buffer: the session keeps none.
            r = crate::udp::recv_with(sock, |d| d.to_vec()) => match r {
                Ok(d) => Some(d),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break Close::Reset,
                Err(_) => break Close::Error,
            },
            Some(d) = early_next => Some(d),
            _ = tokio::time::sleep_until(last + ends.idle) => {
                if last + ends.idle <= Instant::now() {
                    break Close::Idle;
                }
                None
            }
            _ = ends.stop.notified() => break Close::Policy,
            _ = evicted => break Close::Evicted,
        };
        if let Some(d) = out {
            last = Instant::now();
            (ends.touch)();
            counts.sent += 1;
            counts.sent_bytes += d.len() as u64;
            let written = async {
                wr.write_all(&frame(&d)).await?;
                wr.flush().await
            };
            if written.await.is_err() {
                break Close::Error;
            }
        }
    };
    reader.abort();
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    (counts, close)
}
