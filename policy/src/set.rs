//! A validated set of policies, external networks and namespace settings.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::namespace::{Namespace, NamespacePath};
use crate::network::{Address, ExternalNetwork};
use crate::policy::{NetworkPolicy, PolicyId, Tier};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetError {
    #[error("duplicate policy `{name}` in namespace {namespace}")]
    DuplicatePolicy {
        namespace: NamespacePath,
        name: String,
    },
    #[error("duplicate external network `{name}` in namespace {namespace}")]
    DuplicateExternal {
        namespace: NamespacePath,
        name: String,
    },
    #[error("duplicate namespace {0}")]
    DuplicateNamespace(NamespacePath),
    #[error("more than {} policies", u32::MAX)]
    TooMany,
    /// A size beyond [`crate::limits`].
    #[error("{0}")]
    Bound(String),
}

/// Checks one policy or network against [`crate::limits`].
fn bounded(
    what: &str,
    selectors: &[(&str, &crate::Selector)],
    ports: &crate::Ports,
) -> Result<(), SetError> {
    use crate::limits::*;
    for (side, s) in selectors {
        if s.0.len() > MAX_CLAUSES {
            return Err(SetError::Bound(format!(
                "{what}: {side} has {} clauses (at most {MAX_CLAUSES})",
                s.0.len()
            )));
        }
        if let Some(c) = s.0.iter().find(|c| c.len() > MAX_CLAUSE_TAGS) {
            return Err(SetError::Bound(format!(
                "{what}: a clause of {side} has {} tags (at most {MAX_CLAUSE_TAGS})",
                c.len()
            )));
        }
    }
    if let crate::Ports::Ranges(r) = ports {
        if r.len() > MAX_PORTS {
            return Err(SetError::Bound(format!(
                "{what}: {} port ranges (at most {MAX_PORTS})",
                r.len()
            )));
        }
    }
    Ok(())
}

/// Policies sorted by (namespace, name), so a [`PolicyId`] and every decision are
/// independent of the order the documents were loaded in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySet {
    policies: Vec<NetworkPolicy>,
    externals: Vec<ExternalNetwork>,
    namespaces: BTreeMap<NamespacePath, Namespace>,
}

impl PolicySet {
    pub fn new(
        mut policies: Vec<NetworkPolicy>,
        mut externals: Vec<ExternalNetwork>,
        namespaces: Vec<Namespace>,
    ) -> Result<Self, SetError> {
        use crate::limits::*;
        if u32::try_from(policies.len()).is_err() {
            return Err(SetError::TooMany);
        }
        if policies.len() > MAX_POLICIES || externals.len() > MAX_POLICIES {
            return Err(SetError::Bound(format!(
                "{} policies and {} external networks (at most {MAX_POLICIES} each)",
                policies.len(),
                externals.len()
            )));
        }
        for p in &policies {
            bounded(
                &format!("policy {}", p.qualified_name()),
                &[("subject", &p.subject), ("object", &p.object)],
                &p.ports,
            )?;
        }
        for e in &externals {
            let what = format!("external network {}:{}", e.namespace, e.name);
            bounded(&what, &[], &e.ports)?;
            if e.entries.len() > MAX_ENTRIES || e.tags.len() > MAX_TAGS {
                return Err(SetError::Bound(format!(
                    "{what}: {} entries and {} tags (at most {MAX_ENTRIES} and {MAX_TAGS})",
                    e.entries.len(),
                    e.tags.len()
                )));
            }
        }
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        if let Some(w) = policies
            .windows(2)
            .find(|w| (&w[0].namespace, &w[0].name) == (&w[1].namespace, &w[1].name))
        {
            return Err(SetError::DuplicatePolicy {
                namespace: w[0].namespace.clone(),
                name: w[0].name.clone(),
            });
        }
        externals.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        if let Some(w) = externals
            .windows(2)
            .find(|w| (&w[0].namespace, &w[0].name) == (&w[1].namespace, &w[1].name))
        {
            return Err(SetError::DuplicateExternal {
                namespace: w[0].namespace.clone(),
                name: w[0].name.clone(),
            });
        }
        let mut map = BTreeMap::new();
        let mut seen = HashSet::new();
        for n in namespaces {
            if !seen.insert(n.path.clone()) {
                return Err(SetError::DuplicateNamespace(n.path));
            }
            map.insert(n.path.clone(), n);
        }
        Ok(PolicySet {
            policies,
            externals,
            namespaces: map,
        })
    }

    pub fn policies(&self) -> &[NetworkPolicy] {
        &self.policies
    }

    pub fn policy(&self, id: PolicyId) -> &NetworkPolicy {
        &self.policies[id.0 as usize]
    }

    pub fn externals(&self) -> &[ExternalNetwork] {
        &self.externals
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.namespaces.values()
    }

    /// Whether flows of PUs in `ns` that no enforced policy decides are allowed: the
    /// nearest namespace (itself or an ancestor) that sets `discovery` decides; default
    /// false.
    pub fn discovery(&self, ns: &NamespacePath) -> bool {
        ns.self_and_ancestors()
            .iter()
            .find_map(|p| self.namespaces.get(p).and_then(|n| n.discovery))
            .unwrap_or(false)
    }

    /// The external networks visible from `ns` (declared in it or an ancestor) that
    /// contain `addr` on `port`, as indexes into [`externals`](Self::externals). A
    /// straightforward scan; the compiled engine indexes this.
    pub fn resolve_address(
        &self,
        ns: &NamespacePath,
        addr: &Address,
        port: impl Into<crate::FlowPort>,
    ) -> Vec<usize> {
        let port = port.into();
        self.externals
            .iter()
            .enumerate()
            .filter(|(_, e)| e.namespace.is_ancestor_or_self(ns) && e.matches(addr, port))
            .map(|(i, _)| i)
            .collect()
    }
}

/// The tier of a policy that names none: the nearest namespace setting, else application.
pub(crate) fn default_tier(
    namespaces: &BTreeMap<NamespacePath, Namespace>,
    ns: &NamespacePath,
) -> Tier {
    ns.self_and_ancestors()
        .iter()
        .find_map(|p| namespaces.get(p).and_then(|n| n.default_tier))
        .unwrap_or(Tier::Application)
}
