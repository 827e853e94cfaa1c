//! Carries out a [plan](crate::plan) for a captured connection: the flow record learns
//! who the other end is, then the connection is refused, sent through the mesh tunnel,
//! or forwarded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use segmesh_policy::Direction;
use tokio::net::TcpStream;

use crate::flow::{Flow, Recorder};
use crate::plan::{Plan, Planned};
use crate::snapshot::Snapshot;
use crate::state::Shared;

/// `planned` was made from `snap` for `flow` at `since` (for the decision-time metric);
/// `target` is where the application wanted to go (outbound) or our workload (inbound).
/// The record is set up here, synchronously: the future returned holds only what the
/// connection's path needs (an async fn would keep its arguments, the flow and the plan,
/// in every flow's task for as long as the flow lives).
pub(crate) fn carry_out(
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    mut flow: Flow,
    mut planned: Planned,
    since: Instant,
    stream: TcpStream,
    target: SocketAddr,
) -> impl std::future::Future<Output = ()> + Send {
    if planned.decided() {
        shared
            .metrics
            .decision_seconds
            .observe(since.elapsed().as_secs_f64());
    }
    let other = match flow.direction {
        Direction::Outgoing => &mut flow.destination,
        Direction::Incoming => &mut flow.source,
    };
    other.pu = planned.peer_pu.take();
    other.external = std::mem::take(&mut planned.networks);
    other.domain = planned.domain.take();
    other.service = planned.service.take();
    let rec = Recorder::new(&shared, snap, flow);
    let (plan, names) = (planned.plan, planned.names);
    async move {
        let mut rec = rec;
        match plan {
            Plan::Refuse { reason, decision } => {
                if let Some(d) = decision {
                    rec.decided(d);
                }
                rec.reset(stream, reason, None);
            }
            Plan::Tunnel(pu) => crate::mesh::client::connect(rec, stream, target, pu).await,
            Plan::Forward(d) => {
                rec.decided(d);
                crate::plain::forward(rec, stream, target, names).await;
            }
            Plan::Service(s) => crate::service::connect(rec, stream, s.0).await,
        }
    }
}
