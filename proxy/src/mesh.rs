//! The mesh tunnel between enforcers, for flows from one PU to another.
//!
//! Client (the enforcer of the PU that connects): TCP to `<peer ip>:15008`, TLS 1.3 with
//! our workload certificate; the server's certificate must name the PU registered at
//! that IP (else: impersonation); we decide as outgoing on the *certificate's* tags, then
//! send the request (target port, our encrypt wish) and read the server's answer.
//! Server: decides as incoming on the client's certificate tags and answers with a
//! reason code. A reject at either end becomes an RST to the connecting application.
//!
//! Data after an accept: encrypted through TLS when either decision asks for it;
//! otherwise both ends leave TLS and splice plaintext. Leaving TLS loses and duplicates
//! nothing because neither side can read the other's plaintext into its TLS buffer:
//! the server sends its answer and `close_notify`, then nothing until it has read the
//! client's `close_notify`; the client reads the server's `close_notify`, sends its own,
//! and sends no plaintext until it has read the raw [`GO`](crate::tunnel::GO) byte the
//! server sends after that. Kernel TLS would carry the encrypted case without user-space
//! copies; this build only detects it ([`ktls_available`], logged at start) and always
//! encrypts with rustls in user space.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use segmesh_api::FlowRecord;
use segmesh_identity::{IdentityError, TlsConfigs, WorkloadIdentity, peer_identity};
use segmesh_policy::{Decision, Direction, PreparedPeer, Tag, TagSet, Verdict};
use std::sync::atomic::Ordering;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::enforcer::{Flow, Shared, endpoint, flow_record, now_rfc3339, reason_str, refuse};
use crate::metrics::{Dir, ErrorKind, HandshakeLabels, PoolLabels, Role, VerdictLabel};
use crate::pool::{Established, SERVER_IDLE};
use crate::snapshot::{Registered, Snapshot};
use crate::socket;
use crate::splice::{self, Close, DataPath, Progress};
use crate::tunnel::{GO, MAX_EXT, REQUEST_LEN, RESPONSE_LEN, Reason, Request, Response};

/// Whether the kernel offers the `tls` upper-layer protocol (kernel TLS).
pub fn ktls_available() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|s| s.split_whitespace().any(|u| u == "tls"))
}

/// The policy tags of a peer: its certificate's tags plus the automatic ones its SPIFFE
/// ID proves. Nothing the peer says in the tunnel header is used.
fn peer_tags(id: &WorkloadIdentity) -> TagSet {
    let mut tags: TagSet = id
        .tags
        .iter()
        .filter_map(|t| t.parse::<Tag>().ok())
        .collect();
    for (k, v) in [
        ("$identity", "processingunit"),
        ("$namespace", id.namespace.as_str()),
        ("$name", id.name.as_str()),
    ] {
        if let Ok(t) = Tag::new(k, v) {
            tags.insert(t);
        }
    }
    tags
}

fn decide(
    snap: &Snapshot,
    dir: Direction,
    id: &WorkloadIdentity,
    port: u16,
    shared: &Shared,
) -> Decision {
    let t = std::time::Instant::now();
    let peer = PreparedPeer::Pu(snap.engine.id_set(&peer_tags(id)));
    let d = snap.engine.decide(dir, &snap.prepared, &peer, port);
    shared
        .metrics
        .decision_seconds
        .observe(t.elapsed().as_secs_f64());
    d
}

fn handshake_result(shared: &Shared, role: Role, result: &'static str) {
    shared
        .metrics
        .handshakes
        .get_or_create(&HandshakeLabels { role, result })
        .inc();
}

fn rejection_of(e: &std::io::Error) -> &'static str {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .and_then(IdentityError::from_rustls)
        .map_or("tls_error", |r| r.as_str())
}

/// Reads until the peer's `close_notify` (EOF of the TLS stream); any data is a
/// protocol violation.
async fn read_close_notify<S: AsyncRead + Unpin>(tls: &mut S) -> std::io::Result<()> {
    let mut b = [0u8; 1];
    match tls.read(&mut b).await? {
        0 => Ok(()),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "data after the tunnel answer",
        )),
    }
}

/// A stream that counts what is read from it (`forward`) and written to it
/// (`backward`), so a relay stopped midway still knows what it moved.
struct Counted<'a, S> {
    inner: &'a mut S,
    progress: &'a Progress,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        this.progress.forward.fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            this.progress
                .backward
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Copy buffer per direction of an encrypted flow. 64 KiB: 16 KiB (one TLS record) cut
/// encrypted bulk throughput by about half on the load-test machine; the price is memory
/// on every open encrypted flow, idle or not (see the load-test report).
const TLS_BUF: usize = 64 * 1024;

/// Relays through TLS (encrypted mode) until both sides end or `stop` is notified;
/// returns (app→peer, peer→app, close).
async fn relay_tls<S: AsyncRead + AsyncWrite + Unpin>(
    app: &mut TcpStream,
    tls: &mut S,
    stop: &tokio::sync::Notify,
) -> (u64, u64, Close) {
    let progress = Progress::default();
    let mut counted = Counted {
        inner: app,
        progress: &progress,
    };
    let copied = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut counted, tls, TLS_BUF, TLS_BUF) => Some(r),
        _ = stop.notified() => None,
    };
    let (f, b) = (
        progress.forward.load(Ordering::Relaxed),
        progress.backward.load(Ordering::Relaxed),
    );
    match copied {
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
    }
}

/// What a finished tunnel flow moved.
struct Moved {
    forward: u64,
    backward: u64,
    path: DataPath,
    close: Close,
    /// Encrypted through TLS (else spliced or copied plaintext).
    tls: bool,
}

/// Counts a finished flow's bytes and writes its record if the decision asks for one.
#[allow(clippy::too_many_arguments)] // one call per role; a struct would only rename them
fn finish(
    shared: &Shared,
    snap: &Snapshot,
    dir: Dir,
    flow: Flow,
    d: &Decision,
    m: Moved,
    spiffe: String,
    peer_reason: Option<Reason>,
    resumed: bool,
    closed_by: Vec<String>,
) {
    shared.count_bytes(dir, m.forward + m.backward, m.path, m.tls);
    if m.close == Close::Policy {
        shared.metrics.closed_by_policy.inc();
    }
    // A connection closed by a policy change is always recorded.
    if d.log || shared.log_all || m.close == Close::Policy {
        let mut r = flow_record(
            snap,
            flow,
            Some(d),
            reason_str(d),
            Some((m.forward, m.backward, m.path)),
            m.close.as_str(),
        );
        if m.tls {
            r.data_path = Some("tls".into());
        }
        r.encrypt = m.tls;
        r.peer_identity = Some(spiffe);
        r.peer_reason = peer_reason.map(|p| p.as_str().into());
        r.resumed = Some(resumed);
        r.closed_by = closed_by;
        shared.record(r);
    }
}

/// Client role: our PU connects to a registered PU.
/// TCP, TLS and the peer's identity: a tunnel connection ready for a request. The error
/// is the flow record's reason.
async fn establish(
    shared: &Shared,
    tls: &Arc<TlsConfigs>,
    ip: IpAddr,
) -> Result<Established, String> {
    let peer_addr = SocketAddr::new(ip, shared.listeners.tunnel);
    let tcp =
        match tokio::time::timeout(shared.limits.connect_timeout, TcpStream::connect(peer_addr))
            .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(_)) | Err(_) => {
                shared.error(ErrorKind::ConnectFailed);
                return Err("tunnel-unreachable".into());
            }
        };
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
    let stream = match tokio::time::timeout(
        shared.limits.handshake_timeout,
        connector.connect(ServerName::IpAddress(ip.into()), tcp),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let why = rejection_of(&e);
            handshake_result(shared, Role::Client, why);
            return Err(format!("peer-certificate:{why}"));
        }
        Err(_) => {
            handshake_result(shared, Role::Client, "timeout");
            return Err("handshake-timeout".into());
        }
    };
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    handshake_result(shared, Role::Client, if resumed { "resumed" } else { "ok" });
    let peer = peer_identity(stream.get_ref().1)
        .map_err(|e| format!("peer-certificate:{}", e.rejection().as_str()))?;
    Ok(Established::new(stream, peer, resumed, tls.clone()))
}

/// Brings the peer's pool back to its size, in the background.
fn refill(shared: &Arc<Shared>, tls: &Arc<TlsConfigs>, ip: IpAddr) {
    let addr = SocketAddr::new(ip, shared.listeners.tunnel);
    for _ in 0..shared.pool.reserve(addr, shared.limits.tunnel_pool) {
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

/// Client role: our PU connects to a registered PU.
pub(crate) async fn connect(
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    app: TcpStream,
    target: SocketAddr,
    reg: Registered,
    flow: Flow,
) {
    let Some(tls) = snap.tls.clone() else {
        return refuse(&shared, &snap, app, flow, None, "no-identity");
    };
    let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
        shared.error(ErrorKind::Overload);
        return refuse(&shared, &snap, app, flow, None, "overload");
    };
    let limit = shared.limits.handshake_timeout;
    let pooled = shared
        .pool
        .take(SocketAddr::new(target.ip(), shared.listeners.tunnel), &tls);
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
            Ok(_handshake) => establish(&shared, &tls, target.ip()).await,
            Err(_) => {
                shared.error(ErrorKind::Overload);
                Err("overload".into())
            }
        },
    };
    if shared.limits.tunnel_pool > 0 {
        refill(&shared, &tls, target.ip());
    }
    let (mut stream, peer, resumed) = match established {
        Ok(e) => (e.stream, e.peer, e.resumed),
        Err(why) => return refuse(&shared, &snap, app, flow, None, &why),
    };
    let spiffe = peer.spiffe_id().to_string();
    let reject = |shared: &Shared,
                  app: TcpStream,
                  flow: Flow,
                  d: Option<&Decision>,
                  by: &str,
                  peer_reason: Option<&str>,
                  why: &str| {
        socket::reset(app);
        shared.count_connection(Dir::Outbound, VerdictLabel::Reject);
        let mut r = flow_record(&snap, flow, d, why, None, "rejected");
        r.peer_identity = Some(spiffe.clone());
        r.rejected_by = Some(by.into());
        r.peer_reason = peer_reason.map(str::to_owned);
        r.resumed = Some(resumed);
        shared.record(r);
    };
    if peer.name != reg.name || peer.namespace != reg.namespace {
        // Someone else answers at that address with a valid certificate.
        return reject(&shared, app, flow, None, "client", None, "impersonation");
    }
    let d = decide(&snap, Direction::Outgoing, &peer, target.port(), &shared);
    if d.verdict == Verdict::Reject {
        return reject(&shared, app, flow, Some(&d), "client", None, reason_str(&d));
    }
    let exchange = async {
        stream
            .write_all(
                &Request {
                    port: target.port(),
                    encrypt: d.encrypt,
                }
                .encode(),
            )
            .await?;
        stream.flush().await?;
        let mut b = [0u8; RESPONSE_LEN];
        stream.read_exact(&mut b).await?;
        Response::decode(&b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    };
    let resp = match tokio::time::timeout(limit, exchange).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => {
            return reject(
                &shared,
                app,
                flow,
                Some(&d),
                "server",
                None,
                "tunnel-protocol",
            );
        }
    };
    if !resp.accept {
        return reject(
            &shared,
            app,
            flow,
            Some(&d),
            "server",
            Some(resp.reason.as_str()),
            reason_str(&d),
        );
    }
    let relaying = shared.relaying(
        Dir::Outbound,
        crate::open::Peer::Pu(peer_tags(&peer)),
        target.port(),
    );
    let mut app = app;
    let (fwd, bwd, path, close, tls_mode) = if resp.encrypt {
        let (a, b, c) = relay_tls(&mut app, &mut stream, relaying.stop()).await;
        if c == Close::Policy {
            socket::reset(app);
        }
        (a, b, DataPath::Copied, c, true)
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
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "no GO byte",
                ));
            }
            Ok(tcp)
        };
        match tokio::time::timeout(limit, left).await {
            Ok(Ok(tcp)) => {
                let p = Progress::default();
                let idle = shared.limits.idle_timeout;
                let o = splice::relay_until(app, tcp, idle, false, &p, relaying.stop()).await;
                (o.forward, o.backward, o.path, o.close, false)
            }
            _ => {
                drop(relaying);
                return reject(
                    &shared,
                    app,
                    flow,
                    Some(&d),
                    "server",
                    None,
                    "tunnel-protocol",
                );
            }
        }
    };
    let closed_by = relaying.closed_by();
    drop(relaying);
    drop(permit);
    let moved = Moved {
        forward: fwd,
        backward: bwd,
        path,
        close,
        tls: tls_mode,
    };
    finish(
        &shared,
        &snap,
        Dir::Outbound,
        flow,
        &d,
        moved,
        spiffe,
        Some(resp.reason),
        resumed,
        closed_by,
    );
}

/// Server role: a peer enforcer connects to our tunnel port.
pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream, from: SocketAddr) {
    let snap = shared.snapshot();
    let started = std::time::Instant::now();
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    let local = tcp
        .local_addr()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .unwrap_or(from);
    let mut destination = endpoint(local);
    destination.pu = Some(snap.pu_qualified());
    let flow = Flow {
        started,
        time: now_rfc3339(),
        dir: Dir::Inbound,
        source: endpoint(from),
        destination,
    };
    // The snapshot is an argument: the decision of a record must come from it.
    let record_refusal =
        |snap: &Snapshot, flow: Flow, d: Option<&Decision>, why: &str, peer: Option<String>| {
            shared.count_connection(Dir::Inbound, VerdictLabel::Reject);
            let mut r: FlowRecord = flow_record(snap, flow, d, why, None, "rejected");
            r.peer_identity = peer;
            r.rejected_by = Some("server".into());
            shared.record(r);
        };
    let Some(tls) = snap.tls.clone() else {
        return record_refusal(&snap, flow, None, "no-identity", None);
    };
    let Ok(handshake) = shared.handshakes.clone().try_acquire_owned() else {
        shared.error(ErrorKind::Overload);
        return record_refusal(&snap, flow, None, "overload", None);
    };
    let limit = shared.limits.handshake_timeout;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let mut stream = match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let why = rejection_of(&e);
            handshake_result(&shared, Role::Server, why);
            tracing::info!(%from, reason = why, "tunnel handshake refused");
            return record_refusal(&snap, flow, None, &format!("peer-certificate:{why}"), None);
        }
        Err(_) => {
            handshake_result(&shared, Role::Server, "timeout");
            return record_refusal(&snap, flow, None, "handshake-timeout", None);
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
            return record_refusal(
                &snap,
                flow,
                None,
                &format!("peer-certificate:{}", e.rejection().as_str()),
                None,
            );
        }
    };
    let spiffe = peer.spiffe_id().to_string();
    let mut flow = flow;
    flow.source.pu = Some(format!("{}:{}", peer.namespace, peer.name));
    // The certificate must name the PU registered at the address it comes from: a valid
    // certificate presented from another workload's address is an impersonation.
    let registered = |snap: &Snapshot| {
        snap.registry
            .get(&from.ip())
            .is_some_and(|r| r.name == peer.name && r.namespace == peer.namespace)
    };
    if !registered(&snap) {
        return record_refusal(&snap, flow, None, "impersonation", Some(spiffe));
    }

    // The request: bounded in size and time.
    // A pooled connection waits for its flow: the first byte may take up to
    // SERVER_IDLE (the peer is authenticated); the rest of the request is bounded by the
    // handshake timeout.
    drop(handshake);
    let mut b = [0u8; REQUEST_LEN];
    match tokio::time::timeout(SERVER_IDLE, stream.read_exact(&mut b[..1])).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return,
        Err(_) => return record_refusal(&snap, flow, None, "idle-before-request", Some(spiffe)),
    }
    let read_request = async {
        stream.read_exact(&mut b[1..]).await?;
        let (req, ext) = Request::decode(&b)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut skip = [0u8; MAX_EXT];
        stream.read_exact(&mut skip[..ext]).await?;
        Ok::<_, std::io::Error>(req)
    };
    let req = match tokio::time::timeout(limit, read_request).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => {
            let _ = stream
                .write_all(
                    &Response {
                        accept: false,
                        reason: Reason::BadRequest,
                        encrypt: true,
                    }
                    .encode(),
                )
                .await;
            let _ = stream.flush().await;
            return record_refusal(&snap, flow, None, "bad-request", Some(spiffe));
        }
    };
    flow.destination.port = req.port;
    // A pooled connection's flow starts with its request, not with its handshake.
    flow.started = std::time::Instant::now();
    flow.time = now_rfc3339();
    let answer = |reason: Reason, encrypt: bool| Response {
        accept: reason == Reason::Accepted,
        reason,
        encrypt,
    };
    // A pooled connection may have waited for its request across a snapshot change:
    // decide with the snapshot of now, not the one of the handshake.
    let snap = shared.snapshot();
    if !registered(&snap) {
        return record_refusal(&snap, flow, None, "impersonation", Some(spiffe));
    }
    let d = decide(&snap, Direction::Incoming, &peer, req.port, &shared);
    if d.verdict == Verdict::Reject {
        let reason = if d.tier.is_some() {
            Reason::Policy
        } else {
            Reason::Default
        };
        let _ = stream.write_all(&answer(reason, true).encode()).await;
        let _ = stream.flush().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
        return record_refusal(&snap, flow, Some(&d), reason_str(&d), Some(spiffe));
    }
    let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
        shared.error(ErrorKind::Overload);
        let _ = stream
            .write_all(&answer(Reason::Overload, true).encode())
            .await;
        let _ = stream.flush().await;
        return record_refusal(&snap, flow, Some(&d), "overload", Some(spiffe));
    };
    let workload_addr = SocketAddr::new(local.ip(), req.port);
    let workload = match tokio::time::timeout(
        shared.limits.connect_timeout,
        TcpStream::connect(workload_addr),
    )
    .await
    {
        Ok(Ok(w)) => w,
        _ => {
            shared.error(ErrorKind::ConnectFailed);
            let _ = stream
                .write_all(&answer(Reason::Unreachable, true).encode())
                .await;
            let _ = stream.flush().await;
            let mut r = flow_record(
                &snap,
                flow,
                Some(&d),
                reason_str(&d),
                None,
                "connect-failed",
            );
            r.peer_identity = Some(spiffe);
            return shared.record(r);
        }
    };
    let _ = workload.set_nodelay(true);
    let encrypt = req.encrypt || d.encrypt;
    let relaying = shared.relaying(
        Dir::Inbound,
        crate::open::Peer::Pu(peer_tags(&peer)),
        req.port,
    );
    let mut workload = workload;
    let sent = async {
        stream
            .write_all(&answer(Reason::Accepted, encrypt).encode())
            .await?;
        if !encrypt {
            stream.get_mut().1.send_close_notify();
        }
        stream.flush().await
    };
    let ok = tokio::time::timeout(limit, sent)
        .await
        .is_ok_and(|r| r.is_ok());
    let (fwd, bwd, path, close) = if !ok {
        (0, 0, DataPath::Copied, Close::Error)
    } else if encrypt {
        let (a, b, c) = relay_tls(&mut workload, &mut stream, relaying.stop()).await;
        if c == Close::Policy {
            socket::reset(workload);
        }
        (b, a, DataPath::Copied, c)
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
                let idle = shared.limits.idle_timeout;
                let o = splice::relay_until(tcp, workload, idle, false, &p, relaying.stop()).await;
                (o.forward, o.backward, o.path, o.close)
            }
            _ => (0, 0, DataPath::Copied, Close::Error),
        }
    };
    let closed_by = relaying.closed_by();
    drop(relaying);
    drop(permit);
    let moved = Moved {
        forward: fwd,
        backward: bwd,
        path,
        close,
        tls: encrypt,
    };
    finish(
        &shared,
        &snap,
        Dir::Inbound,
        flow,
        &d,
        moved,
        spiffe,
        None,
        resumed,
        closed_by,
    );
}
