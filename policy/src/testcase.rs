//! Policy test cases (`kind: PolicyTest`) and their evaluation at both ends, as the
//! enforcers would decide.

use serde::{Deserialize, Serialize};

use crate::decision::{Decision, Direction, Peer, Pu, Verdict};
use crate::engine::{Engine, PreparedPeer, PreparedPu};
use crate::namespace::NamespacePath;
use crate::network::Address;
use crate::policy::Location;
use crate::ports::FlowPort;
use crate::tag::TagSet;

/// One end of a test case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaseEnd {
    /// A PU with these tags (automatic tags are added).
    Pu(TagSet),
    /// An external end given by tags (they include `$identity=externalnetwork`).
    External(TagSet),
    /// An address outside the mesh, matched to external networks.
    Address(Address),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestCase {
    pub name: String,
    pub from: CaseEnd,
    pub to: CaseEnd,
    pub port: FlowPort,
    pub expect: Verdict,
    pub from_namespace: NamespacePath,
    pub to_namespace: NamespacePath,
    pub location: Location,
}

/// The decision of one enforcing end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndResult {
    pub direction: Direction,
    /// The enforcing PU (automatic tags included).
    pub pu: Pu,
    /// The other end as this enforcer saw it.
    pub peer: Peer,
    /// For an address peer: the external networks it fell in.
    pub networks: Vec<String>,
    pub decision: Decision,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaseOutcome {
    /// The client's enforcer (outgoing), when the client is a PU.
    pub client: Option<EndResult>,
    /// The server's enforcer (incoming), when the server is a PU.
    pub server: Option<EndResult>,
    /// Allow only if every enforcing end allows.
    pub actual: Verdict,
}

// === impl CaseEnd ===

impl CaseEnd {
    pub fn is_pu(&self) -> bool {
        matches!(self, CaseEnd::Pu(_))
    }
}

fn decide_end(
    engine: &Engine,
    direction: Direction,
    own_tags: &TagSet,
    own_ns: &NamespacePath,
    other: &CaseEnd,
    other_ns: &NamespacePath,
    port: FlowPort,
) -> EndResult {
    let pu = Pu::with_automatic_tags(own_ns.clone(), own_tags.clone());
    let prepared: PreparedPu = engine.prepare_pu(&pu);
    let set = engine.set();
    let (peer, prepared_peer, networks) = match other {
        CaseEnd::Pu(t) => {
            let p = Peer::Pu(Pu::with_automatic_tags(other_ns.clone(), t.clone()).tags);
            let pp = engine.prepare_peer(&p);
            (p, pp, Vec::new())
        }
        CaseEnd::External(t) => {
            let p = Peer::External(vec![t.clone()]);
            let pp = engine.prepare_peer(&p);
            (p, pp, Vec::new())
        }
        CaseEnd::Address(addr) => {
            let ids = engine.resolve_address(&prepared, addr, port);
            let nets = ids.iter().map(|&i| &set.externals()[i as usize]);
            let networks = nets
                .clone()
                .map(|e| format!("{}:{}", e.namespace, e.name))
                .collect();
            let p = Peer::external(nets.map(|e| e.effective_tags()).collect());
            (p, PreparedPeer::Networks(ids), networks)
        }
    };
    let decision = engine.decide(direction, &prepared, &prepared_peer, port);
    EndResult {
        direction,
        pu,
        peer,
        networks,
        decision,
    }
}

/// Evaluates a case per DESIGN.md: PU → PU at both ends (both must allow), PU →
/// external only at the client, external → PU only at the server.
pub fn evaluate(engine: &Engine, case: &TestCase) -> CaseOutcome {
    let client = match &case.from {
        CaseEnd::Pu(t) => Some(decide_end(
            engine,
            Direction::Outgoing,
            t,
            &case.from_namespace,
            &case.to,
            &case.to_namespace,
            case.port,
        )),
        _ => None,
    };
    let server = match &case.to {
        CaseEnd::Pu(t) => Some(decide_end(
            engine,
            Direction::Incoming,
            t,
            &case.to_namespace,
            &case.from,
            &case.from_namespace,
            case.port,
        )),
        _ => None,
    };
    let actual = if [&client, &server]
        .into_iter()
        .flatten()
        .all(|e| e.decision.verdict == Verdict::Allow)
    {
        Verdict::Allow
    } else {
        Verdict::Reject
    };
    CaseOutcome {
        client,
        server,
        actual,
    }
}

impl CaseOutcome {
    /// The ends that decided the outcome: on a reject, the rejecting ends; on an allow,
    /// every end.
    pub fn deciding_ends(&self) -> impl Iterator<Item = &EndResult> {
        let actual = self.actual;
        [&self.client, &self.server]
            .into_iter()
            .flatten()
            .filter(move |e| actual == Verdict::Allow || e.decision.verdict == Verdict::Reject)
    }
}
