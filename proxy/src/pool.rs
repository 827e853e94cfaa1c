//! Pre-established tunnel connections to busy peers: TCP, TLS 1.3 and the peer's
//! identity already checked, waiting for a flow. A flow takes one (no handshake on its
//! connect path) and each carries exactly one flow, so splicing keeps one TCP connection
//! per flow. After every use the peer's pool is refilled in the background; pools of
//! peers nobody uses age out.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use segmesh_identity::{TlsConfigs, WorkloadIdentity};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Pooled connections older than this are dropped (the server waits [`SERVER_IDLE`]).
pub const MAX_AGE: Duration = Duration::from_secs(20);
/// How long a server waits for the first request byte on an authenticated connection.
pub const SERVER_IDLE: Duration = Duration::from_secs(30);

pub struct Established {
    pub stream: TlsStream<TcpStream>,
    pub peer: WorkloadIdentity,
    pub resumed: bool,
    created: Instant,
    /// The configuration it was made with: a rotated certificate retires it.
    tls: Arc<TlsConfigs>,
}

impl Established {
    pub fn new(
        stream: TlsStream<TcpStream>,
        peer: WorkloadIdentity,
        resumed: bool,
        tls: Arc<TlsConfigs>,
    ) -> Self {
        Established {
            stream,
            peer,
            resumed,
            created: Instant::now(),
            tls,
        }
    }

    /// Still usable: young enough, made with the current certificate, and not closed
    /// by the peer (a non-consuming peek: pending TLS records stay for rustls).
    fn usable(&self, tls: &Arc<TlsConfigs>) -> bool {
        if self.created.elapsed() > MAX_AGE || !Arc::ptr_eq(&self.tls, tls) {
            return false;
        }
        // Only the count matters, so the byte is never read.
        let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        match socket2::SockRef::from(self.stream.get_ref().0).peek(&mut b) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        }
    }
}

#[derive(Default)]
struct PeerPool {
    ready: VecDeque<Established>,
    filling: usize,
}

#[derive(Default)]
pub struct Pool {
    peers: Mutex<HashMap<SocketAddr, PeerPool>>,
}

impl Pool {
    /// A usable pooled connection to `peer`, if any (stale ones are dropped).
    pub fn take(&self, peer: SocketAddr, tls: &Arc<TlsConfigs>) -> Option<Established> {
        let mut peers = self.peers.lock().expect("lock poisoned");
        let p = peers.get_mut(&peer)?;
        while let Some(e) = p.ready.pop_front() {
            if e.usable(tls) {
                return Some(e);
            }
        }
        None
    }

    /// How many more connections to `peer` should be made to reach `size`; the caller
    /// makes them and hands them to [`put`](Self::put) or [`failed`](Self::failed).
    pub fn reserve(&self, peer: SocketAddr, size: usize) -> usize {
        let mut peers = self.peers.lock().expect("lock poisoned");
        let p = peers.entry(peer).or_default();
        let n = size.saturating_sub(p.ready.len() + p.filling);
        p.filling += n;
        n
    }

    pub fn put(&self, peer: SocketAddr, e: Established) {
        let mut peers = self.peers.lock().expect("lock poisoned");
        let p = peers.entry(peer).or_default();
        p.filling = p.filling.saturating_sub(1);
        p.ready.push_back(e);
    }

    pub fn failed(&self, peer: SocketAddr) {
        let mut peers = self.peers.lock().expect("lock poisoned");
        if let Some(p) = peers.get_mut(&peer) {
            p.filling = p.filling.saturating_sub(1);
        }
    }
}
