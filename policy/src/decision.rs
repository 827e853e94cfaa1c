//! What an enforcer decides for one flow, and the inputs of that decision.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::namespace::NamespacePath;
use crate::policy::{Action, PolicyId, Tier};
use crate::set::PolicySet;
use crate::tag::{self, IDENTITY_EXTERNAL, IDENTITY_PU, Tag, TagSet};

/// The enforcing end's role in the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The enforcer's PU opens the connection (the PU is the subject).
    Outgoing,
    /// The enforcer's PU accepts the connection (the PU is the object).
    Incoming,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// Enforced policies of `tier` decided.
    Policy,
    /// No enforced policy matched: default reject.
    Default,
    /// No enforced policy matched, and the namespace is in discovery mode: allowed and
    /// recorded as discovered.
    Discovery,
}

/// The processing unit whose enforcer decides, with its namespace and tags (automatic
/// tags included; see [`Pu::with_automatic_tags`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pu {
    pub namespace: NamespacePath,
    pub tags: TagSet,
}

/// The other end of a flow as the enforcer knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peer {
    /// A PU, with the tags from its certificate.
    Pu(TagSet),
    /// An address outside the mesh: the tag sets of the external networks it falls in
    /// (a selector matches if it matches any). Use [`Peer::external`] to build one, so
    /// that an address in no network gets `[$identity=externalnetwork]` alone.
    External(Vec<TagSet>),
}

/// The result of a decision, with everything a flow record and `explain` need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    /// The tier that decided (`reason == Policy`).
    pub tier: Option<Tier>,
    /// The deciding policies: the rejecting ones on a reject, every allowing one of the
    /// deciding tier on an allow. Sorted.
    pub policies: Vec<PolicyId>,
    /// Every applicable policy, enforced or staged, in any tier. Sorted.
    pub matched: Vec<PolicyId>,
    /// Encrypt the data plane: true unless every deciding allow policy says false.
    pub encrypt: bool,
    /// Emit a flow record: always on reject and discovery; else if a deciding policy
    /// asks for it.
    pub log: bool,
}

// === impl Pu ===

impl Pu {
    /// A PU with `$identity=processingunit` and `$namespace=<ns>` added to `tags`.
    pub fn with_automatic_tags(namespace: NamespacePath, mut tags: TagSet) -> Self {
        tags.insert(tag::known(IDENTITY_PU));
        if let Ok(t) = Tag::new("$namespace", namespace.as_str()) {
            tags.insert(t);
        }
        Pu { namespace, tags }
    }
}

// === impl Peer ===

impl Peer {
    /// An external peer from the networks it falls in; none gives the bare
    /// `[$identity=externalnetwork]`.
    pub fn external(networks: Vec<TagSet>) -> Self {
        if networks.is_empty() {
            Peer::External(vec![
                std::iter::once(tag::known(IDENTITY_EXTERNAL)).collect(),
            ])
        } else {
            Peer::External(networks)
        }
    }

    /// The external peer for an address as seen from `ns` (naive scan of the set).
    pub fn resolve(
        set: &PolicySet,
        ns: &NamespacePath,
        addr: &crate::Address,
        port: impl Into<crate::FlowPort>,
    ) -> Self {
        Peer::external(
            set.resolve_address(ns, addr, port)
                .into_iter()
                .map(|i| set.externals()[i].effective_tags())
                .collect(),
        )
    }

    pub fn is_external(&self) -> bool {
        matches!(self, Peer::External(_))
    }
}

// === impl Decision ===

impl Decision {
    /// The staged (`enforce: false`) policies that matched, with what they would have done.
    pub fn staged<'a>(
        &'a self,
        set: &'a PolicySet,
    ) -> impl Iterator<Item = (PolicyId, Action)> + 'a {
        self.matched.iter().filter_map(move |&id| {
            let p = set.policy(id);
            (!p.enforce).then_some((id, p.action))
        })
    }

    /// Names of the deciding policies (`<namespace>:<name>`).
    pub fn policy_names(&self, set: &PolicySet) -> Vec<String> {
        self.policies
            .iter()
            .map(|&id| set.policy(id).qualified_name())
            .collect()
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Outgoing => "outgoing",
            Direction::Incoming => "incoming",
        })
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Reject => "reject",
        })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Policy => "policy",
            Reason::Default => "default",
            Reason::Discovery => "discovered",
        })
    }
}
