//! Selectors: OR of ANDs of tag patterns.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::tag::{EXT_NAME_KEY, TagPattern, TagSet};

/// `[[a=1, b=2], [c=3]]` matches a tag set that has (a=1 and b=2) or c=3.
/// An empty selector matches nothing. Clauses are never empty (the loader rejects
/// `[]` as a clause, which would otherwise match everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Selector(pub Vec<Vec<TagPattern>>);

impl Selector {
    pub fn clauses(&self) -> &[Vec<TagPattern>] {
        &self.0
    }

    pub fn matches(&self, tags: &TagSet) -> bool {
        self.0
            .iter()
            .any(|clause| !clause.is_empty() && clause.iter().all(|p| p.matches(tags)))
    }

    /// Whether the selector matches any of several alternative tag sets (an address that
    /// falls in several external networks).
    pub fn matches_any(&self, alternatives: &[TagSet]) -> bool {
        alternatives.iter().any(|t| self.matches(t))
    }

    /// Whether the selector of a policy of namespace `policy_ns` matches a PU peer with
    /// `tags`: a clause matches only a peer in `policy_ns` or below, unless the clause
    /// names the peer's namespace itself (a `$namespace` pattern), the way a Kubernetes
    /// NetworkPolicy's pod selector stays in its namespace. The peer's namespace is its
    /// `$namespace` tag (`/` without one).
    pub fn matches_pu(&self, tags: &TagSet, policy_ns: &crate::NamespacePath) -> bool {
        let inside = policy_ns.is_ancestor_or_self(&pu_namespace(tags));
        self.0.iter().any(|clause| {
            !clause.is_empty()
                && clause.iter().all(|p| p.matches(tags))
                && (inside || names_namespace(clause))
        })
    }

    /// Whether every clause can only ever match external networks.
    pub fn selects_only_external(&self) -> bool {
        !self.0.is_empty() && self.0.iter().all(|c| clause_is_external(c))
    }
}

/// The key of the automatic tag naming a PU's namespace.
pub const NAMESPACE_KEY: &str = "$namespace";

/// Whether a clause names a peer's namespace (`$namespace=/acme/lab`, `$namespace=*`):
/// it then reaches beyond the policy's own subtree.
pub fn names_namespace(clause: &[TagPattern]) -> bool {
    clause.iter().any(|p| p.key() == NAMESPACE_KEY)
}

/// A PU's namespace from its `$namespace` tag (`/` without one).
pub fn pu_namespace(tags: &TagSet) -> crate::NamespacePath {
    tags.iter()
        .find(|t| t.key() == NAMESPACE_KEY)
        .and_then(|t| t.value().parse().ok())
        .unwrap_or_else(crate::NamespacePath::root)
}

/// A clause selects external networks only when it requires `$identity=externalnetwork`
/// or an `ext:name` tag: processing units carry neither.
pub fn clause_is_external(clause: &[TagPattern]) -> bool {
    clause.iter().any(|p| {
        (p.key() == "$identity" && p.value() == Some("externalnetwork")) || p.key() == EXT_NAME_KEY
    })
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, clause) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str("[")?;
            for (j, p) in clause.iter().enumerate() {
                if j > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{p}")?;
            }
            f.write_str("]")?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(clauses: &[&[&str]]) -> Selector {
        Selector(
            clauses
                .iter()
                .map(|c| c.iter().map(|p| p.parse().unwrap()).collect())
                .collect(),
        )
    }

    #[test]
    fn or_of_ands() {
        let s = sel(&[&["a=1", "b=2"], &["c=3"]]);
        assert!(s.matches(&TagSet::parse(["a=1", "b=2"]).unwrap()));
        assert!(s.matches(&TagSet::parse(["c=3"]).unwrap()));
        assert!(!s.matches(&TagSet::parse(["a=1"]).unwrap()));
        assert!(!s.matches(&TagSet::parse(["b=2", "c=4"]).unwrap()));
    }

    #[test]
    fn empty_selector_matches_nothing() {
        assert!(!Selector::default().matches(&TagSet::parse(["a=1"]).unwrap()));
        assert!(!Selector(vec![vec![]]).matches(&TagSet::new()));
    }

    #[test]
    fn external_clauses() {
        assert!(sel(&[&["ext:name=internet"]]).selects_only_external());
        assert!(sel(&[&["$identity=externalnetwork", "zone=x"]]).selects_only_external());
        assert!(!sel(&[&["ext:name=internet"], &["app=web"]]).selects_only_external());
        assert!(!sel(&[&["zone=public"]]).selects_only_external());
    }
}
