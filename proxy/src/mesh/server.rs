//! The tunnel's server role: a peer enforcer connects to our tunnel port. Its
//! certificate must chain to our bundle and name the PU registered at the address it
//! comes from; the request is bounded in size and time; we decide as incoming on its
//! certificate's tags (with the snapshot of the request's moment), answer, connect to
//! our workload and relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use segmesh_api::{CloseReason, FlowReason, Side};
use segmesh_identity::{WorkloadIdentity, peer_identity};
use segmesh_policy::{Direction, FlowPort, Verdict};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::wire::{GO, MAX_EXT, REQUEST_LEN, Reason, Request, Response};
use super::{decide, handshake_result, invalid, peer_tags, read_close_notify, rejection_of};
use crate::flow::{Flow, Recorder, reason_of};
use crate::metrics::{ErrorKind, Role};
use crate::open::Peer;
use crate::pool::SERVER_IDLE;
use crate::relay::splice::{self, Close, DataPath, Progress};
use crate::relay::{Moved, datagrams, tls};
use crate::snapshot::Snapshot;
use crate::state::Shared;

/// Sends an answer; a peer that went away meanwhile changes nothing.
async fn answer<S: AsyncWrite + Unpin>(stream: &mut S, reason: Reason, encrypt: bool) {
    let r = Response {
        accept: reason == Reason::Accepted,
        reason,
        encrypt,
    };
    let _ = stream.write_all(&r.encode()).await;
    let _ = stream.flush().await;
}

/// The certificate names the PU registered at the address the connection comes from: a
/// valid certificate presented from another workload's address is an impersonation.
fn registered(snap: &Snapshot, from: SocketAddr, peer: &WorkloadIdentity) -> bool {
    snap.registry
        .get(&from.ip())
        .is_some_and(|r| r.name == peer.name && r.namespace == peer.namespace)
}

/// Serves one tunnel connection from `from`.
pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream, from: SocketAddr) {
    let snap = shared.snapshot();
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    let local = tcp
        .local_addr()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .unwrap_or(from);
    let mut flow = Flow::new(Direction::Incoming, from, local);
    flow.destination.pu = Some(snap.pu_qualified());
    let mut rec = Recorder::new(&shared, snap.clone(), flow);
    let server = Some(Side::Server);
    let Some(tls) = snap.tls.clone() else {
        return rec.refuse(FlowReason::NoIdentity, server);
    };
    // Overload refusals are counted, not each recorded (a flood must not flood the
    // flow log): one address gets a bounded share of the handshakes in flight.
    let Some(per_source) = shared.handshakes_by_source.try_acquire(from.ip()) else {
        shared.error(ErrorKind::Overload);
        return rec.forget();
    };
    let Ok(handshake) = shared.handshakes.clone().try_acquire_owned() else {
        shared.error(ErrorKind::Overload);
        return rec.forget();
    };
    let limit = shared.settings.limits.handshake_timeout;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let mut stream = match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let why = rejection_of(&e);
            handshake_result(&shared, Role::Server, why);
            tracing::info!(%from, reason = why, "tunnel handshake refused");
            return rec.refuse(FlowReason::PeerCertificate(why.into()), server);
        }
        Err(_) => {
            handshake_result(&shared, Role::Server, "timeout");
            return rec.refuse(FlowReason::HandshakeTimeout, server);
        }
    };
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    handshake_result(
        &shared,
        Role::Server,
        if resumed { "resumed" } else { "ok" },
    );
    let peer = match peer_identity(stream.get_ref().1) {
        Ok(p) => p,
        Err(e) => {
            let why = e.rejection().as_str().into();
            return rec.refuse(FlowReason::PeerCertificate(why), server);
        }
    };
    rec.peer_identity = Some(peer.spiffe_id().to_string());
    rec.flow.source.pu = Some(format!("{}:{}", peer.namespace, peer.name));
    if !registered(&snap, from, &peer) {
        return rec.refuse(FlowReason::Impersonation, server);
    }

    // The request: bounded in size and time. A pooled connection waits for its flow:
    // the first byte may take up to SERVER_IDLE (the peer is authenticated); the rest
    // of the request is bounded by the handshake timeout.
    drop(handshake);
    drop(per_source);
    let mut b = [0u8; REQUEST_LEN];
    let first = tokio::time::timeout(SERVER_IDLE, stream.read_exact(&mut b[..1]));
    let first = tokio::select! {
        r = first => r,
        // Shutting down: a connection waiting for its flow just closes.
        _ = shared.stopping() => return rec.forget(),
    };
    match first {
        Ok(Ok(_)) => {}
        // The client closed a pooled connection it never used: no flow.
        Ok(Err(_)) => return rec.forget(),
        Err(_) => return rec.refuse(FlowReason::IdleBeforeRequest, server),
    }
    let read_request = async {
        stream.read_exact(&mut b[1..]).await?;
        let (req, ext) = Request::decode(&b).map_err(invalid)?;
        let mut skip = [0u8; MAX_EXT];
        stream.read_exact(&mut skip[..ext]).await?;
        Ok::<_, std::io::Error>(req)
    };
    let req = match tokio::time::timeout(limit, read_request).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => {
            answer(&mut stream, Reason::BadRequest, true).await;
            return rec.refuse(FlowReason::BadRequest, server);
        }
    };
    rec.flow.destination.port = req.port;
    // A pooled connection's flow starts with its request, not with its handshake.
    rec.flow.restart();
    // A pooled connection may have waited for its request across a snapshot change:
    // decide with the snapshot of now, not the one of the handshake.
    let snap = shared.snapshot();
    rec.use_snapshot(snap.clone());
    if !registered(&snap, from, &peer) {
        return rec.refuse(FlowReason::Impersonation, server);
    }
    let port = if req.udp {
        FlowPort::udp(req.port)
    } else {
        FlowPort::tcp(req.port)
    };
    let d = decide(&snap, Direction::Incoming, &peer, port, &shared);
    let (verdict, reason, encrypt) = (d.verdict, reason_of(&d), req.encrypt || d.encrypt);
    let wire_reason = if d.tier.is_some() {
        Reason::Policy
    } else {
        Reason::Default
    };
    rec.decided(d);
    if verdict == Verdict::Reject {
        answer(&mut stream, wire_reason, true).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
        return rec.refuse(reason, server);
    }
    if !rec.admit() {
        answer(&mut stream, Reason::Overload, true).await;
        return rec.refuse(FlowReason::Overload, server);
    }
    if req.udp {
        rec.resumed = Some(resumed);
        let peer = peer_tags(&peer);
        return serve_udp(rec, stream, SocketAddr::new(local.ip(), req.port), peer).await;
    }
    let workload_addr = SocketAddr::new(local.ip(), req.port);
    let connect = crate::socket::connect(workload_addr, None, shared.settings.socket_mark);
    let workload = match tokio::time::timeout(shared.settings.limits.connect_timeout, connect).await
    {
        Ok(Ok(w)) => w,
        _ => {
            shared.error(ErrorKind::ConnectFailed);
            answer(&mut stream, Reason::Unreachable, true).await;
            return rec.ended_unrelayed(CloseReason::ConnectFailed);
        }
    };
    let _ = workload.set_nodelay(true);
    let stop = rec.relaying(Peer::Pu(peer_tags(&peer)), req.port);
    let sent = async {
        let accepted = Response {
            accept: true,
            reason: Reason::Accepted,
            encrypt,
        };
        stream.write_all(&accepted.encode()).await?;
        if !encrypt {
            stream.get_mut().1.send_close_notify();
        }
        stream.flush().await
    };
    let ok = tokio::time::timeout(limit, sent)
        .await
        .is_ok_and(|r| r.is_ok());
    let moved = if !ok {
        Moved::nothing(Close::Error, encrypt)
    } else if encrypt {
        // Relayed from the workload's side: the flow's source is the peer.
        tls::relay(
            workload,
            &mut stream,
            shared.settings.limits.idle_timeout,
            &stop.notify,
        )
        .await
        .reversed()
    } else {
        let left = async {
            read_close_notify(&mut stream).await?;
            let (mut tcp, _) = stream.into_inner();
            tcp.write_all(&[GO]).await?;
            Ok::<_, std::io::Error>(tcp)
        };
        match tokio::time::timeout(limit, left).await {
            Ok(Ok(tcp)) => {
                let p = Progress::default();
                let idle = shared.settings.limits.idle_timeout;
                let o = splice::relay_until(tcp, workload, idle, false, &p, &stop.notify).await;
                Moved::plain(o)
            }
            _ => Moved::nothing(Close::Error, false),
        }
    };
    rec.resumed = Some(resumed);
    rec.finish(moved);
}

/// A UDP session to our workload at `target`, its datagrams framed inside the tunnel.
async fn serve_udp(
    mut rec: Recorder,
    mut stream: tokio_rustls::server::TlsStream<TcpStream>,
    target: SocketAddr,
    peer: segmesh_policy::TagSet,
) {
    let shared = rec.shared().clone();
    let limits = shared.settings.limits;
    let workload = async {
        let s = tokio::net::UdpSocket::bind(SocketAddr::new(target.ip(), 0)).await?;
        let _ = socket2::SockRef::from(&s).set_mark(shared.settings.socket_mark);
        s.connect(target).await?;
        Ok::<_, std::io::Error>(s)
    };
    let sock = match workload.await {
        Ok(s) => s,
        Err(_) => {
            shared.error(ErrorKind::ConnectFailed);
            answer(&mut stream, Reason::Unreachable, true).await;
            return rec.ended_unrelayed(CloseReason::ConnectFailed);
        }
    };
    let stop = rec.relaying(Peer::Pu(peer), FlowPort::udp(target.port()));
    let accepted = async {
        let ok = Response {
            accept: true,
            reason: Reason::Accepted,
            encrypt: true,
        };
        stream.write_all(&ok.encode()).await?;
        stream.flush().await
    };
    if !matches!(
        tokio::time::timeout(limits.handshake_timeout, accepted).await,
        Ok(Ok(()))
    ) {
        rec.datagrams = Some((0, 0));
        return rec.finish(Moved::nothing(Close::Error, true));
    }
    let local = datagrams::Local {
        sock: &sock,
        early: None,
    };
    let ends = datagrams::Ends {
        idle: limits.udp_idle_timeout,
        stop: &stop.notify,
        evict: None,
        touch: &|| {},
    };
    let (c, close) = datagrams::relay(stream, local, ends).await;
    // The flow's source is the peer: what came out of the tunnel went forward.
    rec.datagrams = Some((c.received, c.sent));
    rec.finish(Moved {
        forward: c.received_bytes,
        backward: c.sent_bytes,
        path: DataPath::Datagrams,
        close,
        tls: true,
    });
}
