//! Connections our PU makes to a Service's address and port: sent to one of its
//! endpoints at the target port, each endpoint taken in round-robin turn. A PU endpoint
//! is reached through the mesh tunnel and decided there like any PU → PU flow (on its
//! certificate's tags, at both ends); one whose tunnel cannot be opened (unreachable,
//! handshake timeout, a broken tunnel connection) is skipped for the next PU endpoint,
//! each attempt within the connect and handshake timeouts. An endpoint outside the mesh
//! is an external flow, decided against the external networks its address falls in. The
//! record names the Service; its destination is the endpoint the flow went to.

use std::net::SocketAddr;
use std::sync::Arc;

use segmesh_api::FlowReason;
use segmesh_policy::{Direction, FlowPort};
use tokio::net::TcpStream;

use crate::flow::Recorder;
use crate::plan::{self, Plan};
use crate::snapshot::{Endpoint, ServiceTarget};

/// Whether an endpoint's failure is its tunnel's (try the next) rather than a decision.
pub(crate) fn skippable(reason: &FlowReason) -> bool {
    matches!(
        reason,
        FlowReason::TunnelUnreachable | FlowReason::HandshakeTimeout | FlowReason::TunnelProtocol
    )
}

/// The record's destination: the endpoint at the target port.
fn aim(rec: &mut Recorder, to: SocketAddr, ep: &Endpoint) {
    let d = &mut rec.flow.destination;
    d.ip = to.ip();
    d.port = to.port();
    d.pu = ep.pu.as_ref().map(|p| p.qualified());
    d.external.clear();
}

/// Serves one connection to `svc` (which has at least one endpoint).
pub(crate) async fn connect(mut rec: Recorder, app: TcpStream, svc: Arc<ServiceTarget>) {
    let order = svc.order();
    let Some(first) = order.first() else {
        return rec.reset(app, FlowReason::NoEndpoint, None);
    };
    if first.pu.is_none() {
        // Outside the mesh: an external flow to the endpoint.
        let to = SocketAddr::new(first.ip, svc.target);
        aim(&mut rec, to, first);
        let snap = rec.snapshot().clone();
        let planned = plan::external(&snap, Direction::Outgoing, first.ip, svc.target, &[]);
        rec.flow.destination.external = planned.networks;
        match planned.plan {
            Plan::Forward(d) => {
                rec.decided(d);
                crate::plain::forward(rec, app, to, Vec::new()).await;
            }
            Plan::Refuse { reason, decision } => {
                if let Some(d) = decision {
                    rec.decided(d);
                }
                rec.reset(app, reason, None);
            }
            Plan::Tunnel(_) | Plan::Service(_) => rec.reset(app, FlowReason::Internal, None),
        }
        return;
    }
    // Sent to each endpoint tried: read once.
    let mut first = crate::mesh::client::First::of(&app);
    for ep in &order {
        let Some(pu) = &ep.pu else { continue };
        let to = SocketAddr::new(ep.ip, svc.target);
        aim(&mut rec, to, ep);
        match Box::pin(crate::mesh::client::negotiate(
            &mut rec,
            to,
            pu,
            FlowPort::tcp(svc.target),
            Some(&mut first),
        ))
        .await
        {
            Ok(n) => return crate::mesh::client::carry(rec, app, svc.target, n),
            Err((reason, _)) if skippable(&reason) => {
                tracing::debug!(service = %svc.name, endpoint = %to, %reason, "endpoint skipped");
                rec.peer_identity = None;
                rec.resumed = None;
            }
            Err((reason, by)) => return rec.reset(app, reason, by),
        }
    }
    // Every mesh endpoint's tunnel failed.
    rec.reset(app, FlowReason::NoEndpoint, None);
}
