//! UDP our PU sends, captured with TPROXY (marked in `mangle OUTPUT`, routed back
//! through `lo`) onto a transparent socket on the outbound port; each datagram's
//! original destination comes with it (`IP_RECVORIGDSTADDR`, ip(7)).
//!
//! A session's later datagrams arrive on its reply socket (TPROXY's lookup prefers
//! the connected socket matching the 4-tuple), the first one on the capture socket.
//!
//! One session per 5-tuple, decided at its first datagram (the [plan](crate::plan)'s
//! `outbound_udp`: external networks on `udp/N`; PU peers through the mesh tunnel,
//! decided at both ends, see `tunnel`). An allowed external session has an upstream
//! socket connected to the
//! destination and a reply socket bound to the destination's address (`IP_TRANSPARENT`)
//! and connected to the workload, so answers come from where the workload sent to. A
//! refused session stays in the table (dropping its datagrams, recorded once) until it
//! is idle. The table is bounded: a new session evicts the least recently used one
//! (counted; its record says `evicted`). Every session is one flow record with its
//! datagrams and bytes each way.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use segmesh_policy::Direction;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::flow::{Flow, Recorder};
use crate::open::Peer;
use crate::plan::{self, Plan};
use crate::relay::Moved;
use crate::relay::splice::{Close, DataPath};
use crate::state::Shared;

/// The largest datagram relayed (the largest a UDP/IPv6 packet carries without jumbo
/// frames is 65,527 bytes).
const MAX_DATAGRAM: usize = 65_535;

type Key = (SocketAddr, SocketAddr);

/// One session's shared state.
struct Session {
    /// Refused: its datagrams are dropped until it is idle.
    refused: std::sync::atomic::AtomicBool,
    last: Mutex<Instant>,
    /// Where the workload's datagrams go (allowed sessions).
    upstream: Option<Upstream>,
    sent: AtomicU64,
    sent_bytes: AtomicU64,
    /// Notified when the table evicts the session.
    evict: Notify,
}

/// An allowed session's way out.
enum Upstream {
    /// A socket connected to the external destination.
    Socket(Arc<UdpSocket>),
    /// The mesh tunnel to a PU (datagrams queued for the session's tunnel task).
    Tunnel(tokio::sync::mpsc::Sender<Vec<u8>>),
}

impl Session {
    fn touch(&self) {
        *self.last.lock().expect("lock poisoned") = Instant::now();
    }

    fn last(&self) -> Instant {
        *self.last.lock().expect("lock poisoned")
    }
}

/// The session table of one enforcer.
#[derive(Default)]
pub(crate) struct Sessions {
    table: Mutex<HashMap<Key, Arc<Session>>>,
    /// Local ports of the upstream sockets, by family (`true`: IPv6). An upstream socket
    /// may be handed the port a workload socket just gave back; an answer the enforcer
    /// sends to that port would then land in its own upstream socket (same 4-tuple), so
    /// answers to such a port end their session instead.
    upstream_ports: Mutex<std::collections::HashSet<(bool, u16)>>,
}

impl Sessions {
    fn own_port(&self, a: SocketAddr) -> bool {
        self.upstream_ports
            .lock()
            .expect("lock poisoned")
            .contains(&(a.is_ipv6(), a.port()))
    }

    fn claim_port(&self, a: SocketAddr) {
        self.upstream_ports
            .lock()
            .expect("lock poisoned")
            .insert((a.is_ipv6(), a.port()));
    }

    fn release_port(&self, a: SocketAddr) {
        self.upstream_ports
            .lock()
            .expect("lock poisoned")
            .remove(&(a.is_ipv6(), a.port()));
    }

    fn get(&self, key: &Key) -> Option<Arc<Session>> {
        self.table.lock().expect("lock poisoned").get(key).cloned()
    }

    /// Inserts a session, evicting the least recently used one when the table holds
    /// `max` already.
    fn insert(&self, key: Key, s: Arc<Session>, max: usize, shared: &Shared) {
        let mut t = self.table.lock().expect("lock poisoned");
        while t.len() >= max.max(1) {
            let Some(oldest) = t.iter().min_by_key(|(_, s)| s.last()).map(|(k, _)| *k) else {
                break;
            };
            if let Some(old) = t.remove(&oldest) {
                old.evict.notify_one();
                shared.metrics.udp_evictions.inc();
            }
        }
        t.insert(key, s);
        shared.metrics.udp_sessions.set(t.len() as i64);
    }

    /// Removes `key` if it still holds `s` (an evicted session's key may hold a newer
    /// one).
    fn remove(&self, key: &Key, s: &Arc<Session>, shared: &Shared) {
        let mut t = self.table.lock().expect("lock poisoned");
        if t.get(key).is_some_and(|cur| Arc::ptr_eq(cur, s)) {
            t.remove(key);
        }
        shared.metrics.udp_sessions.set(t.len() as i64);
    }
}

/// A UDP socket for TPROXY: transparent, reporting each datagram's original
/// destination.
pub(crate) fn listener(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    match addr {
        SocketAddr::V4(_) => {
            sock.set_ip_transparent_v4(true)?;
            setsockopt(&sock, sockopt::Ipv4OrigDstAddr, &true)?;
        }
        SocketAddr::V6(_) => {
            sock.set_only_v6(true)?;
            crate::socket::set_ipv6_transparent(&sock)?;
            setsockopt(&sock, sockopt::Ipv6OrigDstAddr, &true)?;
        }
    }
    // Room for bursts of new sessions (each costs the enforcer two sockets): 4 MiB,
    // beyond net.core.rmem_max where CAP_NET_ADMIN allows (SO_RCVBUFFORCE, socket(7)).
    if setsockopt(&sock, sockopt::RcvBufForce, &RECV_BUFFER).is_err() {
        let _ = sock.set_recv_buffer_size(RECV_BUFFER);
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// Receive buffer of the capture socket.
const RECV_BUFFER: usize = 4 << 20;

/// One datagram with its source and original destination.
fn recv_with_destination(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, SocketAddr)> {
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )?;
    let n = msg.bytes;
    let from = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| SocketAddr::from((s.ip(), s.port())))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|s| SocketAddr::from((s.ip(), s.port())))
                })
        })
        .ok_or_else(|| std::io::Error::other("a datagram without a source"))?;
    let mut to = None;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                to = Some(SocketAddr::from((ip, u16::from_be(a.sin_port))));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                to = Some(SocketAddr::from((ip, u16::from_be(a.sin6_port))));
            }
            _ => {}
        }
    }
    let to = to.ok_or_else(|| {
        std::io::Error::other("a datagram without its original destination (not TPROXYed?)")
    })?;
    Ok((n, from, to))
}

/// The socket answers go out of: bound to the original destination (transparent) and
/// connected to the workload.
fn reply_socket(from: SocketAddr, to: SocketAddr, mark: u32) -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(to), Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    match to {
        SocketAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => {
            sock.set_only_v6(true)?;
            crate::socket::set_ipv6_transparent(&sock)?;
        }
    }
    sock.set_mark(mark)?;
    sock.set_nonblocking(true)?;
    sock.bind(&to.into())?;
    sock.connect(&from.into())?;
    UdpSocket::from_std(sock.into())
}

async fn upstream_socket(to: SocketAddr, mark: u32) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = match to {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(any).await?;
    let _ = socket2::SockRef::from(&sock).set_mark(mark);
    sock.connect(to).await?;
    Ok(sock)
}

thread_local! {
    /// Where sessions receive their datagrams (one per runtime thread): a session holds
    /// no receive buffer of its own while it waits.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// Receives one datagram on `sock` and returns what `f` makes of it, `f` seeing it in
/// this thread's scratch buffer. Cancel-safe as `UdpSocket::recv` (the receive itself
/// does not wait). Before, each session kept two 64 KiB buffers for as long as it lived:
/// a workload sending one datagram to each of many addresses made its enforcer hold
/// 128 KiB per session (512 MiB at the default session bound).
pub(crate) async fn recv_with<R>(
    sock: &UdpSocket,
    f: impl FnOnce(&[u8]) -> R,
) -> std::io::Result<R> {
    let n = loop {
        sock.readable().await?;
        match SCRATCH.with_borrow_mut(|buf| sock.try_recv(buf)) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    // No await since the receive: the datagram is still in this thread's buffer.
    Ok(SCRATCH.with_borrow(|buf| f(&buf[..n])))
}

/// Receives captured datagrams until the task is aborted.
pub(crate) async fn serve(shared: Arc<Shared>, sock: UdpSocket) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        if sock.readable().await.is_err() {
            continue;
        }
        let got = sock.try_io(Interest::READABLE, || {
            recv_with_destination(&sock, &mut buf)
        });
        match got {
            Ok((n, from, to)) => datagram(&shared, from, to, &buf[..n]).await,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::debug!(error = %e, "udp receive"),
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// One captured datagram from `from` (our workload) to `to`.
async fn datagram(shared: &Arc<Shared>, from: SocketAddr, to: SocketAddr, data: &[u8]) {
    let key = (canonical(from), canonical(to));
    if let Some(s) = shared.udp.get(&key) {
        s.touch();
        let passed = match &s.upstream {
            _ if s.refused.load(Ordering::Relaxed) => false,
            Some(Upstream::Socket(up)) => {
                s.sent.fetch_add(1, Ordering::Relaxed);
                s.sent_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                up.try_send(data).is_ok()
            }
            Some(Upstream::Tunnel(tx)) => tx.try_send(data.to_vec()).is_ok(),
            None => false,
        };
        if !passed {
            shared.metrics.udp_dropped.inc();
        }
        return;
    }
    open(shared, key, data).await;
}

/// Where a new session goes.
enum Route {
    Refuse(segmesh_api::FlowReason, Option<segmesh_policy::Decision>),
    /// Allowed outside the mesh, to this address.
    Forward(segmesh_policy::Decision, SocketAddr),
    /// Through the tunnel to the first of these PUs whose tunnel opens.
    Tunnel(Vec<(SocketAddr, crate::snapshot::RegisteredPu)>),
}

/// A session to a Service's address and port (see `service`): its endpoints in
/// round-robin turn; an endpoint outside the mesh decided as an external flow, PU
/// endpoints through the tunnel (the first whose tunnel opens). The record's
/// destination becomes the endpoint (a tunnel's once it is chosen).
fn service_route(
    snap: &crate::snapshot::Snapshot,
    flow: &mut Flow,
    svc: &crate::snapshot::ServiceTarget,
) -> Route {
    let order = svc.order();
    let target = svc.target;
    match order.first() {
        None => Route::Refuse(segmesh_api::FlowReason::NoEndpoint, None),
        Some(e) if e.pu.is_none() => {
            let to = SocketAddr::new(e.ip, target);
            flow.destination.ip = e.ip;
            flow.destination.port = target;
            let p = plan::external(
                snap,
                Direction::Outgoing,
                e.ip,
                segmesh_policy::FlowPort::udp(target),
                &[],
            );
            flow.destination.external = p.networks;
            match p.plan {
                Plan::Forward(d) => Route::Forward(d, to),
                Plan::Refuse { reason, decision } => Route::Refuse(reason, decision),
                Plan::Tunnel(_) | Plan::Service(_) => {
                    Route::Refuse(segmesh_api::FlowReason::Internal, None)
                }
            }
        }
        Some(_) => Route::Tunnel(
            order
                .iter()
                .filter_map(|e| Some((SocketAddr::new(e.ip, target), e.pu.clone()?)))
                .collect(),
        ),
    }
}

/// Decides a new session at its first datagram and starts it.
async fn open(shared: &Arc<Shared>, key: Key, first: &[u8]) {
    let (from, to) = key;
    let snap = shared.snapshot();
    let mut flow = Flow::new(Direction::Outgoing, from, to);
    flow.source.pu = Some(snap.pu_qualified());
    let since = std::time::Instant::now();
    let names = shared.names.names(to.ip(), std::time::Instant::now());
    let planned = plan::outbound_udp(&snap, to, &names);
    if planned.decided() {
        shared
            .metrics
            .decision_seconds
            .observe(since.elapsed().as_secs_f64());
    }
    flow.destination.pu = planned.peer_pu;
    flow.destination.external = planned.networks;
    flow.destination.domain = planned.domain;
    flow.destination.service = planned.service;
    let names = planned.names;
    let route = match planned.plan {
        Plan::Refuse { reason, decision } => Route::Refuse(reason, decision),
        Plan::Forward(d) => Route::Forward(d, to),
        Plan::Tunnel(pu) => Route::Tunnel(vec![(to, pu)]),
        Plan::Service(svc) => service_route(&snap, &mut flow, &svc.0),
    };
    let mut rec = Recorder::new(shared, snap, flow);
    rec.datagrams = Some((1, 0));
    let limits = shared.settings.limits;
    // A refused session stays (its datagrams dropped, recorded once) until idle.
    let refused = |shared: &Arc<Shared>| {
        let s = Arc::new(Session {
            refused: true.into(),
            last: Mutex::new(Instant::now()),
            upstream: None,
            sent: AtomicU64::new(1),
            sent_bytes: AtomicU64::new(0),
            evict: Notify::new(),
        });
        shared
            .udp
            .insert(key, s.clone(), limits.max_udp_sessions, shared);
        shared.metrics.udp_dropped.inc();
        tokio::spawn(expire_refused(shared.clone(), key, s));
    };
    let (d, upstream_to) = match route {
        Route::Refuse(reason, decision) => {
            if let Some(d) = decision {
                rec.decided(d);
            }
            refused(shared);
            return rec.refuse(reason, None);
        }
        Route::Forward(d, upstream_to) => (d, upstream_to),
        Route::Tunnel(candidates) => {
            // To a PU: through the mesh tunnel, decided at both ends on certificates.
            let (tx, rx) = tokio::sync::mpsc::channel(256);
            let _ = tx.try_send(first.to_vec());
            let s = Arc::new(Session {
                refused: false.into(),
                last: Mutex::new(Instant::now()),
                upstream: Some(Upstream::Tunnel(tx)),
                sent: AtomicU64::new(0),
                sent_bytes: AtomicU64::new(0),
                evict: Notify::new(),
            });
            shared
                .udp
                .insert(key, s.clone(), limits.max_udp_sessions, shared);
            tokio::spawn(tunnel(shared.clone(), key, s, rx, rec, candidates));
            return;
        }
    };
    rec.decided(d);
    let mark = shared.settings.socket_mark;
    let sockets = async {
        // Never the workload's own port (its socket may be closed already and the port
        // free): answers to it would come back to this socket.
        let mut up = upstream_socket(upstream_to, mark).await?;
        for _ in 0..4 {
            if up.local_addr()?.port() != from.port() {
                break;
            }
            up = upstream_socket(upstream_to, mark).await?;
        }
        let reply = reply_socket(from, to, mark)?;
        up.send(first).await?;
        Ok::<_, std::io::Error>((up, reply))
    };
    let (up, reply) = match sockets.await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, %to, "udp session");
            refused(shared);
            return rec.ended_unrelayed(segmesh_api::CloseReason::ConnectFailed);
        }
    };
    let up_addr = up.local_addr().ok();
    if let Some(a) = up_addr {
        shared.udp.claim_port(a);
    }
    let up = Arc::new(up);
    let s = Arc::new(Session {
        refused: false.into(),
        last: Mutex::new(Instant::now()),
        upstream: Some(Upstream::Socket(up.clone())),
        sent: AtomicU64::new(1),
        sent_bytes: AtomicU64::new(first.len() as u64),
        evict: Notify::new(),
    });
    shared
        .udp
        .insert(key, s.clone(), limits.max_udp_sessions, shared);
    tokio::spawn(relay(shared.clone(), key, s, up, reply, rec, names));
}

/// A session to a PU: the tunnel is negotiated (identity, both decisions), then the
/// datagrams travel framed inside it. A refusal keeps the session in the table as
/// refused until idle.
async fn tunnel(
    shared: Arc<Shared>,
    key: Key,
    s: Arc<Session>,
    mut early: tokio::sync::mpsc::Receiver<Vec<u8>>,
    mut rec: Recorder,
    candidates: Vec<(SocketAddr, crate::snapshot::RegisteredPu)>,
) {
    let (from, to) = key;
    let refuse = |rec: Recorder, reason, by| {
        s.refused.store(true, Ordering::Relaxed);
        tokio::spawn(expire_refused(shared.clone(), key, s.clone()));
        rec.refuse(reason, by);
    };
    let service = rec.flow.destination.service.is_some();
    let mut negotiated = None;
    for (dest, pu) in &candidates {
        if service {
            rec.flow.destination.ip = dest.ip();
            rec.flow.destination.port = dest.port();
            rec.flow.destination.pu = Some(pu.qualified());
        }
        let port = segmesh_policy::FlowPort::udp(dest.port());
        // Boxed: the negotiation's state (about 4.8 KiB) is freed when it ends instead of
        // staying part of the session's task for as long as the session lives.
        match Box::pin(crate::mesh::client::negotiate(
            &mut rec, *dest, pu, port, None,
        ))
        .await
        {
            Ok(n) => {
                negotiated = Some((n, port));
                break;
            }
            // A Service's next endpoint when this one's tunnel fails.
            Err((reason, _)) if service && crate::service::skippable(&reason) => {
                rec.peer_identity = None;
                rec.resumed = None;
            }
            Err((reason, by)) => return refuse(rec, reason, by),
        }
    }
    let Some((n, port)) = negotiated else {
        // Every endpoint's tunnel failed.
        return refuse(rec, segmesh_api::FlowReason::NoEndpoint, None);
    };
    let crate::mesh::client::Data::Stream(stream, in_stream) = n.data else {
        // A UDP request is always encrypted: negotiate refuses a ticket for it.
        return refuse(rec, segmesh_api::FlowReason::Internal, None);
    };
    // Company for moving TCP flows counts TCP flows only (`relay/tls.rs`, `Mv::count`).
    drop(in_stream);
    let reply = match reply_socket(from, to, shared.settings.socket_mark) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, %to, "udp session");
            return refuse(rec, segmesh_api::FlowReason::Internal, None);
        }
    };
    rec.peer_reason = Some(n.reason.as_str().into());
    let stop = rec.relaying(Peer::Pu(n.tags.clone()), port);
    let local = crate::relay::datagrams::Local {
        sock: &reply,
        early: Some(&mut early),
    };
    let touch = || s.touch();
    let ends = crate::relay::datagrams::Ends {
        idle: shared.settings.limits.udp_idle_timeout,
        stop: &stop.notify,
        evict: Some(&s.evict),
        touch: &touch,
    };
    let (c, close) = crate::relay::datagrams::relay(stream, local, ends).await;
    shared.udp.remove(&key, &s, &shared);
    rec.datagrams = Some((c.sent, c.received));
    rec.finish(Moved {
        forward: c.sent_bytes,
        backward: c.received_bytes,
        path: DataPath::Datagrams,
        close,
        tls: true,
        in_tls: 0,
    });
}

/// How a receive error ends a session: an ICMP port unreachable as a reset ends a TCP
/// flow; any other error too (it is not activity that keeps the session alive).
fn ended(e: &std::io::Error) -> Close {
    if e.kind() == std::io::ErrorKind::ConnectionRefused {
        Close::Reset
    } else {
        tracing::debug!(error = %e, "udp session");
        Close::Error
    }
}

/// A refused session leaves the table when idle.
async fn expire_refused(shared: Arc<Shared>, key: Key, s: Arc<Session>) {
    let idle = shared.settings.limits.udp_idle_timeout;
    loop {
        let until = s.last() + idle;
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {
                if s.last() + idle <= Instant::now() {
                    break;
                }
            }
            _ = s.evict.notified() => break,
        }
    }
    shared.udp.remove(&key, &s, &shared);
}

/// Answers back to the workload until the session is idle, evicted, or rejected by a
/// new snapshot; then records it.
async fn relay(
    shared: Arc<Shared>,
    key: Key,
    s: Arc<Session>,
    up: Arc<UdpSocket>,
    reply: UdpSocket,
    mut rec: Recorder,
    names: Vec<String>,
) {
    let port = segmesh_policy::FlowPort::udp(key.1.port());
    let stop = rec.relaying(Peer::Address(key.1.ip(), names), port);
    // Answers of our PU's own DNS queries teach the names of addresses.
    let dns = key.1.port() == 53;
    let idle = shared.settings.limits.udp_idle_timeout;
    let (mut back, mut back_bytes) = (0u64, 0u64);
    let close = loop {
        let until = s.last() + idle;
        tokio::select! {
            // The workload's later datagrams: TPROXY's socket lookup finds the reply
            // socket first (it is connected to exactly this 4-tuple), so they arrive
            // here rather than on the capture socket.
            r = recv_with(&reply, |d| (d.len(), up.try_send(d).is_ok())) => match r {
                Ok((n, passed)) => {
                    s.touch();
                    s.sent.fetch_add(1, Ordering::Relaxed);
                    s.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if !passed {
                        shared.metrics.udp_dropped.inc();
                    }
                }
                // The workload's socket is gone (ICMP port unreachable for an answer).
                Err(e) => break ended(&e),
            },
            r = recv_with(&up, |d| {
                if dns {
                    shared.names.learn(d, std::time::Instant::now());
                }
                // The workload's port now belongs to one of our upstream sockets:
                // its socket is gone, and an answer would loop back to us.
                let passed = (!shared.udp.own_port(key.0)).then(|| reply.try_send(d).is_ok());
                (d.len(), passed)
            }) => match r {
                Ok((n, passed)) => {
                    s.touch();
                    back += 1;
                    back_bytes += n as u64;
                    match passed {
                        None => break Close::Reset,
                        Some(false) => {
                            shared.metrics.udp_dropped.inc();
                        }
                        Some(true) => {}
                    }
                }
                Err(e) => break ended(&e),
            },
            _ = tokio::time::sleep_until(until) => {
                if s.last() + idle <= Instant::now() {
                    break Close::Idle;
                }
            }
            _ = s.evict.notified() => break Close::Evicted,
            _ = stop.notify.notified() => break Close::Policy,
        }
    };
    shared.udp.remove(&key, &s, &shared);
    if let Ok(a) = up.local_addr() {
        shared.udp.release_port(a);
    }
    let sent = s.sent.load(Ordering::Relaxed);
    rec.datagrams = Some((sent, back));
    rec.finish(Moved {
        forward: s.sent_bytes.load(Ordering::Relaxed),
        backward: back_bytes,
        path: DataPath::Datagrams,
        close,
        tls: false,
        in_tls: 0,
    });
}

/// The addresses of the UDP capture listener (loopback, as TPROXY's `--on-ip`).
pub(crate) fn addresses(port: u16, v6: bool) -> Vec<SocketAddr> {
    let mut out = vec![SocketAddr::new(
        IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
        port,
    )];
    if v6 {
        out.push(SocketAddr::new(
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            port,
        ));
    }
    out
}
