//! Plain flows, to or from an address outside the mesh: connect to the destination and
//! splice the two sockets together (DNS over TCP is read on its way, see `relay::dns`).

use std::net::SocketAddr;

use segmesh_api::{CloseReason, FlowReason};
use tokio::net::TcpStream;

use crate::flow::Recorder;
use crate::metrics::ErrorKind;
use crate::open::Peer;
use crate::relay::Moved;
use crate::relay::splice::{self, Progress};

/// Connects to `target` and relays until the flow ends; the recorder holds the
/// (allowing) decision, `names` what it considered of the peer's names.
pub(crate) async fn forward(
    mut rec: Recorder,
    app: TcpStream,
    target: SocketAddr,
    names: Vec<String>,
) {
    if !rec.admit() {
        return rec.reset(app, FlowReason::Overload, None);
    }
    let shared = rec.shared().clone();
    let limits = shared.settings.limits;
    let connect = crate::socket::connect(target, None, shared.settings.socket_mark);
    let upstream = match tokio::time::timeout(limits.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, %target, "connect failed");
            shared.error(ErrorKind::ConnectFailed);
            crate::socket::reset(app);
            return rec.ended_unrelayed(CloseReason::ConnectFailed);
        }
        Err(_) => {
            shared.error(ErrorKind::ConnectTimeout);
            crate::socket::reset(app);
            return rec.ended_unrelayed(CloseReason::ConnectTimeout);
        }
    };
    let _ = upstream.set_nodelay(true);
    let peer = Peer::Address(rec.flow.peer_ip(), names);
    let stop = rec.relaying(peer, rec.flow.destination.port);
    // DNS over TCP is read to learn names (see relay::dns); the rest is spliced.
    let dns = rec.flow.direction == segmesh_policy::Direction::Outgoing && target.port() == 53;
    rec.finish_after(async move {
        let idle = limits.idle_timeout;
        let out = if dns {
            crate::relay::dns::relay(app, upstream, idle, &stop.notify, &shared.names).await
        } else {
            let progress = Progress::default();
            let k = shared.kernel();
            splice::relay_until(app, upstream, idle, false, &progress, &stop.notify, k).await
        };
        Moved::plain(out)
    });
}
