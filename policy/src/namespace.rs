//! Namespace paths (`/acme/shop`) and namespace settings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::policy::Tier;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    #[error("`{0}`: a namespace path starts with `/`")]
    NotAbsolute(String),
    #[error("`{0}`: empty segment or trailing `/`")]
    EmptySegment(String),
    #[error("`{0}`: segments use letters, digits, `-`, `_` and `.` only")]
    BadCharacter(String),
}

/// An absolute namespace path. `/` is the root; `/acme/shop` is below `/acme`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NamespacePath(String);

impl NamespacePath {
    pub fn root() -> Self {
        NamespacePath("/".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    pub fn parent(&self) -> Option<NamespacePath> {
        if self.is_root() {
            return None;
        }
        let i = self.0.rfind('/').expect("absolute path");
        Some(NamespacePath(if i == 0 {
            "/".to_owned()
        } else {
            self.0[..i].to_owned()
        }))
    }

    /// This namespace, then each ancestor up to the root.
    pub fn self_and_ancestors(&self) -> Vec<NamespacePath> {
        let mut out = vec![self.clone()];
        while let Some(p) = out.last().and_then(|p| p.parent()) {
            out.push(p);
        }
        out
    }

    /// Whether `self` is `other` or one of its ancestors.
    pub fn is_ancestor_or_self(&self, other: &NamespacePath) -> bool {
        self.is_root()
            || other.0 == self.0
            || (other.0.starts_with(&self.0) && other.0.as_bytes()[self.0.len()] == b'/')
    }

    /// Whether a policy of this namespace applies to a PU in `pu` (`propagate`: also
    /// below).
    pub fn covers(&self, pu: &NamespacePath, propagate: bool) -> bool {
        if propagate {
            self.is_ancestor_or_self(pu)
        } else {
            self == pu
        }
    }
}

impl FromStr for NamespacePath {
    type Err = NamespaceError;
    fn from_str(s: &str) -> Result<Self, NamespaceError> {
        if !s.starts_with('/') {
            return Err(NamespaceError::NotAbsolute(s.to_owned()));
        }
        if s == "/" {
            return Ok(Self::root());
        }
        for seg in s[1..].split('/') {
            if seg.is_empty() {
                return Err(NamespaceError::EmptySegment(s.to_owned()));
            }
            if !seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(NamespaceError::BadCharacter(s.to_owned()));
            }
        }
        Ok(NamespacePath(s.to_owned()))
    }
}

impl TryFrom<String> for NamespacePath {
    type Error = NamespaceError;
    fn try_from(s: String) -> Result<Self, NamespaceError> {
        s.parse()
    }
}

impl From<NamespacePath> for String {
    fn from(n: NamespacePath) -> String {
        n.0
    }
}

impl fmt::Display for NamespacePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Settings of one namespace (`kind: Namespace`). Unset settings are inherited from the
/// nearest ancestor that sets them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub path: NamespacePath,
    /// Allow flows that no enforced policy decides (recorded as `discovered`).
    /// Default: false.
    pub discovery: Option<bool>,
    /// Tier given to policies of this namespace (and below) that name none.
    /// Default: application.
    pub default_tier: Option<Tier>,
    /// The tag key prefixes the bootstrap tokens of this namespace (and below, unless
    /// they declare their own) may certify (`app`, `team:`; a prefix matches keys that
    /// start with it). None: no limit declared here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_prefixes: Option<Vec<String>>,
}

impl Namespace {
    /// Whether a tag key is within `prefixes`.
    pub fn key_allowed(prefixes: &[String], key: &str) -> bool {
        prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(s: &str) -> NamespacePath {
        s.parse().unwrap()
    }

    #[test]
    fn parses_paths() {
        assert!(ns("/").is_root());
        assert_eq!(ns("/acme/shop").parent(), Some(ns("/acme")));
        assert_eq!(ns("/acme").parent(), Some(ns("/")));
        assert_eq!(ns("/").parent(), None);
        assert!(matches!(
            "acme".parse::<NamespacePath>(),
            Err(NamespaceError::NotAbsolute(_))
        ));
        assert!(matches!(
            "/acme/".parse::<NamespacePath>(),
            Err(NamespaceError::EmptySegment(_))
        ));
        assert!(matches!(
            "/a b".parse::<NamespacePath>(),
            Err(NamespaceError::BadCharacter(_))
        ));
        assert_eq!(
            ns("/a/b/c").self_and_ancestors(),
            vec![ns("/a/b/c"), ns("/a/b"), ns("/a"), ns("/")]
        );
    }

    #[test]
    fn coverage() {
        assert!(ns("/acme").covers(&ns("/acme/shop"), true));
        assert!(!ns("/acme").covers(&ns("/acme/shop"), false));
        assert!(ns("/acme").covers(&ns("/acme"), false));
        // A sibling that shares a prefix is not below.
        assert!(!ns("/acme").covers(&ns("/acmex"), true));
        assert!(ns("/").covers(&ns("/x"), true));
        assert!(!ns("/acme/shop").covers(&ns("/acme"), true));
    }
}
