//! The mesh tunnel between enforcers, for flows from one PU to another.
//!
//! Client ([`client`], the enforcer of the PU that connects): TCP to
//! `<peer ip>:15008`, TLS 1.3 with our workload certificate; the server's certificate
//! must name the PU registered at that IP (else: impersonation); we decide as outgoing
//! on the *certificate's* tags, then send the request (target port, our encrypt wish)
//! and read the server's answer. Server ([`server`]): decides as incoming on the
//! client's certificate tags and answers with a reason code. A reject at either end
//! becomes an RST to the connecting application. The wire format is in [`wire`].
//!
//! UDP sessions (request flag) stay inside TLS after the accept, each datagram a frame
//! (see `wire` and `relay::datagrams`).
//!
//! Data after an accept: encrypted through TLS when either decision asks for it;
//! otherwise both ends leave TLS and splice plaintext. Leaving TLS loses and duplicates
//! nothing because neither side can read the other's plaintext into its TLS buffer:
//! the server sends its answer and `close_notify`, then nothing until it has read the
//! client's `close_notify`; the client reads the server's `close_notify`, sends its own,
//! and sends no plaintext until it has read the raw [`GO`](wire::GO) byte the server
//! sends after that.

pub(crate) mod client;
pub(crate) mod server;
pub mod wire;

use segmesh_identity::{IdentityError, WorkloadIdentity};
use segmesh_policy::{Decision, Direction, PreparedPeer, Tag, TagSet};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::metrics::{HandshakeLabels, Role};
use crate::snapshot::Snapshot;
use crate::state::Shared;

/// The policy tags of a peer: its certificate's tags plus the automatic ones its SPIFFE
/// ID proves. Nothing the peer says in the tunnel header is used.
pub(crate) fn peer_tags(id: &WorkloadIdentity) -> TagSet {
    let mut tags = automatic_tags(&id.name, &id.namespace);
    tags.extend(id.tags.iter().filter_map(|t| t.parse::<Tag>().ok()));
    tags
}

/// The tags any PU has by its name and namespace alone.
pub(crate) fn automatic_tags(name: &str, namespace: &str) -> TagSet {
    let mut tags = TagSet::new();
    for (k, v) in [
        ("$identity", "processingunit"),
        ("$namespace", namespace),
        ("$name", name),
    ] {
        if let Ok(t) = Tag::new(k, v) {
            tags.insert(t);
        }
    }
    tags
}

/// Decides a flow with a peer PU on its certificate's tags (timed).
fn decide(
    snap: &Snapshot,
    dir: Direction,
    id: &WorkloadIdentity,
    port: impl Into<segmesh_policy::FlowPort>,
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

/// Why a TLS handshake failed, as the identity crate names certificate rejections.
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

fn invalid(what: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}
