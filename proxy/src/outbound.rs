//! Connections our PU opens, captured (REDIRECT) to the outbound listener: the original
//! destination from `SO_ORIGINAL_DST`, then the [plan](crate::plan): refuse, the mesh
//! tunnel to a PU, or a plain flow to an external network.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use segmesh_policy::Direction;
use tokio::net::TcpStream;

use crate::flow::Flow;
use crate::metrics::ErrorKind;
use crate::plan;
use crate::socket;
use crate::state::Shared;

/// Serves one captured connection.
pub(crate) async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    match socket::original_dst(&stream, peer) {
        Ok(target) => proxy(shared, stream, peer, target).await,
        Err(e) => {
            tracing::debug!(error = %e, "no original destination (connected to the capture port directly?)");
            shared.error(ErrorKind::OriginalDst);
            socket::reset(stream);
        }
    }
}

/// Serves a connection of our PU from `peer` whose original destination is `target`.
pub(crate) async fn proxy(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
) {
    let snap = shared.snapshot();
    let target = SocketAddr::new(target.ip().to_canonical(), target.port());
    let mut flow = Flow::new(Direction::Outgoing, peer, target);
    flow.source.pu = Some(snap.pu_qualified());
    let since = Instant::now();
    let names = shared.names.names(target.ip(), std::time::Instant::now());
    let planned = plan::outbound(&snap, &shared.settings.listeners, target, &names);
    crate::dispatch::carry_out(shared, snap, flow, planned, since, stream, target).await;
}
