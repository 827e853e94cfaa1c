//! Human-readable explanation of a decision: the applicable policies tier by tier and
//! why the verdict follows.

use std::fmt::Write;

use crate::decision::{Decision, Peer, Reason, Verdict};
use crate::policy::{Action, Tier};
use crate::set::PolicySet;
use crate::testcase::EndResult;

fn peer_line(end: &EndResult) -> String {
    match &end.peer {
        Peer::Pu(tags) => format!("processing unit [{tags}]"),
        Peer::External(alts) if !end.networks.is_empty() => {
            format!("external address in network(s) {}", end.networks.join(", "))
        }
        Peer::External(alts) => {
            let sets: Vec<String> = alts.iter().map(|t| format!("[{t}]")).collect();
            format!("external end {}", sets.join(" or "))
        }
    }
}

/// Renders one enforcing end's decision.
pub fn render_end(set: &PolicySet, end: &EndResult) -> String {
    let d = &end.decision;
    let mut out = String::new();
    let role = match end.direction {
        crate::Direction::Outgoing => "client",
        crate::Direction::Incoming => "server",
    };
    let _ = writeln!(
        out,
        "{role} enforcer, deciding as {} in namespace {}",
        end.direction, end.pu.namespace
    );
    let _ = writeln!(out, "  own tags: [{}]", end.pu.tags);
    let _ = writeln!(out, "  peer:     {}", peer_line(end));
    let _ = writeln!(out, "  applicable policies:");
    for tier in Tier::ALL {
        let here: Vec<_> = d
            .matched
            .iter()
            .map(|&id| (id, set.policy(id)))
            .filter(|(_, p)| p.tier == tier)
            .collect();
        if here.is_empty() {
            let _ = writeln!(out, "    {:<15} -", tier.as_str());
            continue;
        }
        for (i, (id, p)) in here.iter().enumerate() {
            let label = if i == 0 { tier.as_str() } else { "" };
            let state = if !p.enforce {
                format!("staged, would {}", p.action.to_string().to_lowercase())
            } else if d.policies.contains(id) {
                "enforced, deciding".to_owned()
            } else {
                "enforced".to_owned()
            };
            let origin = p
                .origin
                .as_ref()
                .map(|o| format!("  ({o})"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "    {:<15} {:<6} {:<13} {} [{}]{}",
                label,
                p.action,
                p.mode,
                p.qualified_name(),
                state,
                origin
            );
        }
    }
    let _ = writeln!(out, "  verdict:  {}", why(set, end, d));
    out
}

fn why(set: &PolicySet, end: &EndResult, d: &Decision) -> String {
    let names = d.policy_names(set).join(", ");
    match (d.reason, d.verdict) {
        (Reason::Policy, Verdict::Reject) => format!(
            "REJECT: tier {} is the first with an enforced match, and a Reject there beats any Allow ({names})",
            d.tier.map_or("?", Tier::as_str)
        ),
        (Reason::Policy, Verdict::Allow) => format!(
            "ALLOW: tier {} is the first with an enforced match, and it holds only Allow ({names}); data plane {}",
            d.tier.map_or("?", Tier::as_str),
            if d.encrypt {
                "encrypted"
            } else {
                "authenticated-only"
            }
        ),
        (Reason::Discovery, _) => format!(
            "ALLOW (discovered): no enforced policy matched and namespace {} is in discovery mode",
            end.pu.namespace
        ),
        (Reason::Default, _) => {
            let staged: Vec<String> = d
                .staged(set)
                .map(|(id, a)| {
                    format!(
                        "{} would {}",
                        set.policy(id).qualified_name(),
                        if a == Action::Allow {
                            "allow"
                        } else {
                            "reject"
                        }
                    )
                })
                .collect();
            let mut s = "REJECT (default): no enforced policy matched; default deny".to_owned();
            if !staged.is_empty() {
                s.push_str(&format!(" (staged only: {})", staged.join(", ")));
            }
            s
        }
    }
}
