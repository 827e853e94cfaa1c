//! The mesh tunnel between enforcers, for flows from one PU to another.
//!
//! One TLS 1.3 connection per pair of enforcers carries HTTP/2 ([`conns`]); each flow is
//! one `CONNECT` stream on it ([`wire`]), so no flow pays a handshake. Client
//! ([`client`], the enforcer of the PU that connects): the connection to `<peer
//! ip>:15008` must present the certificate of the PU registered at that IP (else:
//! impersonation); we decide as outgoing on the *certificate's* tags, then open a stream
//! (target port, our encrypt wish) and read the server's answer. Server ([`server`]): the
//! connection's certificate must name the PU registered at its source address; each
//! stream is decided as incoming on those certificate tags and answered with a reason
//! code. A reject at either end becomes an RST to the connecting application.
//!
//! Data after an accept: encrypted in the flow's stream when either decision asks for it
//! (UDP sessions always, each datagram a frame); otherwise the server answers with a
//! single-use ticket ([`tickets`]) and the client opens a plain TCP connection to the
//! tunnel port that presents it; the server checks that it comes from the address of
//! the PU it issued it to, and both ends splice. Once the client holds a book of
//! tickets asked for on its connection, an authenticated-only flow skips the stream:
//! it presents a ticket from the book with its port on the data connection, and the
//! server decides it there ([`tickets`]). docs/design.md gives the threat model.

pub(crate) mod client;
pub(crate) mod conns;
pub(crate) mod server;
pub(crate) mod stream;
pub(crate) mod tickets;
pub mod wire;

use segmesh_identity::{IdentityError, WorkloadIdentity};
use segmesh_policy::{Decision, Direction, PreparedPeer, Tag, TagSet};

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

/// Decides a flow with a peer PU on its certificate's tags ([`peer_tags`], made once
/// per connection; timed).
fn decide(
    snap: &Snapshot,
    dir: Direction,
    tags: &TagSet,
    port: impl Into<segmesh_policy::FlowPort>,
    shared: &Shared,
) -> Decision {
    let t = std::time::Instant::now();
    let peer = PreparedPeer::Pu(snap.engine.id_set(tags));
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
