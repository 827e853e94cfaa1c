//! The reference evaluator: DESIGN.md's decision procedure written as plainly as
//! possible, scanning every policy. It exists to check the compiled [`Engine`]
//! (property tests and benchmarks), never to serve flows.
//!
//! [`Engine`]: crate::Engine

use crate::decision::{Decision, Direction, Peer, Pu, Reason, Verdict};
use crate::policy::{Action, Mode, NetworkPolicy, PolicyId, Tier};
use crate::ports::FlowPort;
use crate::selector::Selector;
use crate::set::PolicySet;

fn peer_matches(sel: &Selector, peer: &Peer, policy_ns: &crate::NamespacePath) -> bool {
    match peer {
        // A PU peer only within the policy's subtree, unless the clause names its
        // namespace (see Selector::matches_pu).
        Peer::Pu(tags) => sel.matches_pu(tags, policy_ns),
        Peer::External(alts) => sel.matches_any(alts),
    }
}

/// Whether one policy applies to the flow at this enforcer (step 1 of the procedure).
pub fn applies(
    p: &NetworkPolicy,
    dir: Direction,
    own: &Pu,
    peer: &Peer,
    port: impl Into<FlowPort>,
) -> bool {
    let mode_fits = match (dir, p.mode) {
        (_, Mode::Bidirectional) => !peer.is_external(),
        (Direction::Outgoing, Mode::Outgoing) | (Direction::Incoming, Mode::Incoming) => true,
        _ => false,
    };
    let (own_side, peer_side) = match dir {
        Direction::Outgoing => (&p.subject, &p.object),
        Direction::Incoming => (&p.object, &p.subject),
    };
    mode_fits
        && p.namespace.covers(&own.namespace, p.propagate)
        && p.ports.contains(port)
        && own_side.matches(&own.tags)
        && peer_matches(peer_side, peer, &p.namespace)
}

/// Decides one flow at one enforcer by scanning every policy.
pub fn decide(
    set: &PolicySet,
    dir: Direction,
    own: &Pu,
    peer: &Peer,
    port: impl Into<FlowPort>,
) -> Decision {
    let port = port.into();
    let matched: Vec<PolicyId> = set
        .policies()
        .iter()
        .enumerate()
        .filter(|(_, p)| applies(p, dir, own, peer, port))
        .map(|(i, _)| PolicyId(i as u32))
        .collect();
    for tier in Tier::ALL {
        let enforced: Vec<PolicyId> = matched
            .iter()
            .copied()
            .filter(|&id| set.policy(id).enforce && set.policy(id).tier == tier)
            .collect();
        if enforced.is_empty() {
            continue;
        }
        let rejects: Vec<PolicyId> = enforced
            .iter()
            .copied()
            .filter(|&id| set.policy(id).action == Action::Reject)
            .collect();
        if !rejects.is_empty() {
            return Decision {
                verdict: Verdict::Reject,
                reason: Reason::Policy,
                tier: Some(tier),
                policies: rejects,
                matched,
                encrypt: true,
                log: true,
            };
        }
        return Decision {
            verdict: Verdict::Allow,
            reason: Reason::Policy,
            tier: Some(tier),
            encrypt: enforced.iter().any(|&id| set.policy(id).encrypt),
            log: enforced.iter().any(|&id| set.policy(id).log),
            policies: enforced,
            matched,
        };
    }
    let discovery = set.discovery(&own.namespace);
    Decision {
        verdict: if discovery {
            Verdict::Allow
        } else {
            Verdict::Reject
        },
        reason: if discovery {
            Reason::Discovery
        } else {
            Reason::Default
        },
        tier: None,
        policies: Vec::new(),
        matched,
        encrypt: true,
        log: true,
    }
}
