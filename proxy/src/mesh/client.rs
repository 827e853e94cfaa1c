//! The tunnel's client role: our PU connects to a registered PU. A pooled connection
//! (TCP, TLS and the peer's identity done ahead) or a new one; the peer's certificate
//! must name the PU registered at the address; our decision on its certificate tags;
//! the request and the server's answer; then the bytes, encrypted or spliced.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rustls_pki_types::ServerName;
use segmesh_api::{FlowReason, Side};
use segmesh_identity::WorkloadIdentity;
use segmesh_identity::{TlsConfigs, peer_identity};
use segmesh_policy::{Direction, FlowPort, Protocol, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::wire::{GO, RESPONSE_LEN, Request, Response};
use super::{decide, handshake_result, invalid, peer_tags, read_close_notify, rejection_of};
use crate::flow::{Recorder, reason_of};
use crate::metrics::{ErrorKind, PoolLabels, Role};
use crate::open::Peer;
use crate::pool::Established;
use crate::relay::splice::{self, Progress};
use crate::relay::{Moved, tls};
use crate::snapshot::RegisteredPu;
use crate::state::Shared;

/// Why no tunnel connection could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EstablishError {
    #[error("the peer's tunnel port cannot be reached")]
    Unreachable,
    #[error("the peer's certificate was refused: {0}")]
    PeerCertificate(&'static str),
    #[error("the TLS handshake did not finish in time")]
    HandshakeTimeout,
    #[error("too many tunnel handshakes in flight")]
    Overload,
}

impl EstablishError {
    fn reason(&self) -> FlowReason {
        match self {
            EstablishError::Unreachable => FlowReason::TunnelUnreachable,
            EstablishError::PeerCertificate(why) => FlowReason::PeerCertificate((*why).into()),
            EstablishError::HandshakeTimeout => FlowReason::HandshakeTimeout,
            EstablishError::Overload => FlowReason::Overload,
        }
    }
}

/// TCP, TLS and the peer's identity: a tunnel connection ready for a request.
async fn establish(
    shared: &Shared,
    tls: &Arc<TlsConfigs>,
    ip: IpAddr,
) -> Result<Established, EstablishError> {
    let listeners = &shared.settings.listeners;
    let limits = &shared.settings.limits;
    let peer_addr = SocketAddr::new(ip, listeners.tunnel);
    let mark = shared.settings.socket_mark;
    let connect = crate::socket::connect(peer_addr, listeners.address, mark);
    let tcp = match tokio::time::timeout(limits.connect_timeout, connect).await {
        Ok(Ok(t)) => t,
        Ok(Err(_)) | Err(_) => {
            shared.error(ErrorKind::ConnectFailed);
            return Err(EstablishError::Unreachable);
        }
    };
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
    let handshake = connector.connect(ServerName::IpAddress(ip.into()), tcp);
    let stream = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let why = rejection_of(&e);
            handshake_result(shared, Role::Client, why);
            return Err(EstablishError::PeerCertificate(why));
        }
        Err(_) => {
            handshake_result(shared, Role::Client, "timeout");
            return Err(EstablishError::HandshakeTimeout);
        }
    };
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    handshake_result(shared, Role::Client, if resumed { "resumed" } else { "ok" });
    let peer = peer_identity(stream.get_ref().1)
        .map_err(|e| EstablishError::PeerCertificate(e.rejection().as_str()))?;
    Ok(Established::new(stream, peer, resumed, tls.clone()))
}

/// Brings the peer's pool back to its size, in the background.
fn refill(shared: &Arc<Shared>, tls: &Arc<TlsConfigs>, ip: IpAddr) {
    let addr = SocketAddr::new(ip, shared.settings.listeners.tunnel);
    for _ in 0..shared
        .pool
        .reserve(addr, shared.settings.limits.tunnel_pool)
    {
        let (shared, tls) = (shared.clone(), tls.clone());
        tokio::spawn(async move {
            let Ok(_permit) = shared.handshakes.clone().try_acquire_owned() else {
                return shared.pool.failed(addr);
            };
            match establish(&shared, &tls, ip).await {
                Ok(e) => shared.pool.put(addr, e),
                Err(_) => shared.pool.failed(addr),
            }
        });
    }
}

/// A tunnel connection to `ip`: from the pool, or made now.
async fn obtain(
    shared: &Arc<Shared>,
    tls: &Arc<TlsConfigs>,
    ip: IpAddr,
) -> Result<Established, EstablishError> {
    let addr = SocketAddr::new(ip, shared.settings.listeners.tunnel);
    let pooled = shared.pool.take(addr, tls);
    shared
        .metrics
        .pool
        .get_or_create(&PoolLabels {
            result: if pooled.is_some() { "hit" } else { "miss" },
        })
        .inc();
    let established = match pooled {
        Some(e) => Ok(e),
        None => match shared.handshakes.clone().try_acquire_owned() {
            Ok(_handshake) => establish(shared, tls, ip).await,
            Err(_) => {
                shared.error(ErrorKind::Overload);
                Err(EstablishError::Overload)
            }
        },
    };
    if shared.settings.limits.tunnel_pool > 0 {
        refill(shared, tls, ip);
    }
    established
}

/// A tunnel connection to the PU registered at `target`, its identity checked, our
/// decision on its certificate taken, the request sent and accepted: what the flow's
/// data plane then uses. The error is the refusal and who refused.
pub(crate) struct Negotiated {
    pub stream: TlsStream<TcpStream>,
    pub peer: WorkloadIdentity,
    pub resp: Response,
}

pub(crate) type Refusal = (FlowReason, Option<Side>);

/// Negotiates a flow to `pu` at `target` on `port` (`udp/N`: a UDP session, which stays
/// encrypted inside TLS).
pub(crate) async fn negotiate(
    rec: &mut Recorder,
    target: SocketAddr,
    pu: &RegisteredPu,
    port: FlowPort,
) -> Result<Negotiated, Refusal> {
    let shared = rec.shared().clone();
    let snap = rec.snapshot().clone();
    let Some(tls) = snap.tls.clone() else {
        return Err((FlowReason::NoIdentity, None));
    };
    if !rec.admit() {
        return Err((FlowReason::Overload, None));
    }
    let Established {
        mut stream,
        peer,
        resumed,
        ..
    } = obtain(&shared, &tls, target.ip())
        .await
        .map_err(|e| (e.reason(), None))?;
    rec.peer_identity = Some(peer.spiffe_id().to_string());
    rec.resumed = Some(resumed);
    if peer.name != pu.name || peer.namespace != pu.namespace {
        // Someone else answers at that address with a valid certificate.
        return Err((FlowReason::Impersonation, Some(Side::Client)));
    }
    let d = decide(&snap, Direction::Outgoing, &peer, port, &shared);
    let (verdict, encrypt, reason) = (d.verdict, d.encrypt, reason_of(&d));
    rec.decided(d);
    if verdict == Verdict::Reject {
        return Err((reason, Some(Side::Client)));
    }
    let udp = port.protocol == Protocol::Udp;
    let limit = shared.settings.limits.handshake_timeout;
    let exchange = async {
        let request = Request {
            port: target.port(),
            encrypt: encrypt || udp,
            udp,
        };
        stream.write_all(&request.encode()).await?;
        stream.flush().await?;
        let mut b = [0u8; RESPONSE_LEN];
        stream.read_exact(&mut b).await?;
        Response::decode(&b).map_err(invalid)
    };
    let resp = match tokio::time::timeout(limit, exchange).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => return Err((FlowReason::TunnelProtocol, Some(Side::Server))),
    };
    if !resp.accept {
        rec.peer_reason = Some(resp.reason.as_str().into());
        return Err((reason, Some(Side::Server)));
    }
    // Our decision asked for encryption: a server that answers without it (an honest
    // one never does: it encrypts when either end asks) would get the flow in plaintext.
    if (encrypt || udp) && !resp.encrypt {
        rec.peer_reason = Some("dropped-encryption".into());
        return Err((FlowReason::TunnelProtocol, Some(Side::Server)));
    }
    Ok(Negotiated { stream, peer, resp })
}

/// Our PU connects to the registered PU `pu` at `target`.
pub(crate) async fn connect(
    mut rec: Recorder,
    app: TcpStream,
    target: SocketAddr,
    pu: RegisteredPu,
) {
    match negotiate(&mut rec, target, &pu, FlowPort::tcp(target.port())).await {
        Ok(n) => carry(rec, app, target.port(), n).await,
        Err((reason, by)) => rec.reset(app, reason, by),
    }
}

/// Moves the bytes of a negotiated flow to `port` of the peer's workload until it ends.
pub(crate) async fn carry(mut rec: Recorder, app: TcpStream, port: u16, n: Negotiated) {
    let shared = rec.shared().clone();
    let Negotiated {
        mut stream,
        peer,
        resp,
    } = n;
    let limit = shared.settings.limits.handshake_timeout;
    let stop = rec.relaying(Peer::Pu(peer_tags(&peer)), port);
    let moved = if resp.encrypt {
        tls::relay(
            app,
            &mut stream,
            shared.settings.limits.idle_timeout,
            &stop.notify,
        )
        .await
    } else {
        // Leave TLS: the server's close_notify, ours, then the raw GO byte.
        let left = async {
            read_close_notify(&mut stream).await?;
            stream.get_mut().1.send_close_notify();
            stream.flush().await?;
            let (mut tcp, _) = stream.into_inner();
            let mut go = [0u8; 1];
            tcp.read_exact(&mut go).await?;
            if go[0] != GO {
                return Err(invalid("no GO byte"));
            }
            Ok(tcp)
        };
        match tokio::time::timeout(limit, left).await {
            Ok(Ok(tcp)) => {
                let p = Progress::default();
                let idle = shared.settings.limits.idle_timeout;
                Moved::plain(splice::relay_until(app, tcp, idle, false, &p, &stop.notify).await)
            }
            _ => {
                rec.abandon_relay();
                return rec.reset(app, FlowReason::TunnelProtocol, Some(Side::Server));
            }
        }
    };
    rec.peer_reason = Some(resp.reason.as_str().into());
    rec.finish(moved);
}
