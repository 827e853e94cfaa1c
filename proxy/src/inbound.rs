//! Plain connections to our PU from outside the mesh, captured (TPROXY) to the inbound
//! listener: the socket's local address is the original destination. Decided against
//! the external networks of the source address; PUs must come through the tunnel.

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
    let snap = shared.snapshot();
    let target = match stream.local_addr() {
        Ok(t) => SocketAddr::new(t.ip().to_canonical(), t.port()),
        Err(_) => {
            shared.error(ErrorKind::OriginalDst);
            return socket::reset(stream);
        }
    };
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let mut flow = Flow::new(Direction::Incoming, peer, target);
    flow.destination.pu = Some(snap.pu_qualified());
    let since = Instant::now();
    let local = shared.is_local(target.ip());
    let planned = plan::inbound(&snap, &shared.settings.listeners, peer, target, local);
    crate::dispatch::carry_out(shared, snap, flow, planned, since, stream, target).await;
}
