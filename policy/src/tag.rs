//! Tags (`key=value`), tag patterns (`key=value` or `key=*`) and tag sets.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted tag, in bytes (key, `=` and value together).
pub const MAX_TAG_LEN: usize = 1024;

/// Tag automatically given to every processing unit.
pub const IDENTITY_PU: &str = "$identity=processingunit";
/// Tag automatically given to every external network.
pub const IDENTITY_EXTERNAL: &str = "$identity=externalnetwork";
/// Key of the automatic tag that names an external network.
pub const EXT_NAME_KEY: &str = "ext:name";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("expected `key=value`, found no `=` in `{0}`")]
    MissingEquals(String),
    #[error("the key of `{0}` is empty")]
    EmptyKey(String),
    #[error("the value of `{0}` is empty")]
    EmptyValue(String),
    #[error("`{0}` contains whitespace or a control character")]
    Whitespace(String),
    #[error("`{0}` is longer than {MAX_TAG_LEN} bytes")]
    TooLong(String),
    #[error("`{0}`: a value of `*` is a wildcard, allowed only in selectors")]
    WildcardNotAllowed(String),
}

/// One `key=value` tag. The key may carry a prefix (`$`, `@k8s:` ...); the value is
/// everything after the first `=`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag {
    key: String,
    value: String,
}

/// A selector's atom: an exact tag, or `key=*` (any value of that key).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TagPattern {
    key: String,
    /// `None` is the wildcard `*`.
    value: Option<String>,
}

/// A set of tags (sorted, deduplicated).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TagSet(BTreeSet<Tag>);

fn split(s: &str) -> Result<(&str, &str), TagError> {
    if s.len() > MAX_TAG_LEN {
        return Err(TagError::TooLong(s.to_owned()));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TagError::Whitespace(s.to_owned()));
    }
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| TagError::MissingEquals(s.to_owned()))?;
    if k.is_empty() {
        return Err(TagError::EmptyKey(s.to_owned()));
    }
    if v.is_empty() {
        return Err(TagError::EmptyValue(s.to_owned()));
    }
    Ok((k, v))
}

// === impl Tag ===

impl Tag {
    pub fn new(key: &str, value: &str) -> Result<Self, TagError> {
        format!("{key}={value}").parse()
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn value(&self) -> &str {
        &self.value
    }
}

impl FromStr for Tag {
    type Err = TagError;
    fn from_str(s: &str) -> Result<Self, TagError> {
        let (k, v) = split(s)?;
        if v == "*" {
            return Err(TagError::WildcardNotAllowed(s.to_owned()));
        }
        Ok(Tag {
            key: k.to_owned(),
            value: v.to_owned(),
        })
    }
}

impl TryFrom<String> for Tag {
    type Error = TagError;
    fn try_from(s: String) -> Result<Self, TagError> {
        s.parse()
    }
}

impl From<Tag> for String {
    fn from(t: Tag) -> String {
        t.to_string()
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

// === impl TagPattern ===

impl TagPattern {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The exact value, or `None` for the wildcard `key=*`.
    pub fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }

    pub fn matches(&self, tags: &TagSet) -> bool {
        match &self.value {
            Some(v) => tags.contains_kv(&self.key, v),
            None => tags.has_key(&self.key),
        }
    }
}

impl FromStr for TagPattern {
    type Err = TagError;
    fn from_str(s: &str) -> Result<Self, TagError> {
        let (k, v) = split(s)?;
        Ok(TagPattern {
            key: k.to_owned(),
            value: (v != "*").then(|| v.to_owned()),
        })
    }
}

impl TryFrom<String> for TagPattern {
    type Error = TagError;
    fn try_from(s: String) -> Result<Self, TagError> {
        s.parse()
    }
}

impl From<TagPattern> for String {
    fn from(t: TagPattern) -> String {
        t.to_string()
    }
}

impl From<Tag> for TagPattern {
    fn from(t: Tag) -> Self {
        TagPattern {
            key: t.key,
            value: Some(t.value),
        }
    }
}

impl fmt::Display for TagPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value.as_deref().unwrap_or("*"))
    }
}

// === impl TagSet ===

impl TagSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses every string as a tag.
    pub fn parse<I, S>(tags: I) -> Result<Self, TagError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        tags.into_iter().map(|s| s.as_ref().parse()).collect()
    }

    pub fn insert(&mut self, tag: Tag) -> bool {
        self.0.insert(tag)
    }

    pub fn contains(&self, tag: &Tag) -> bool {
        self.0.contains(tag)
    }

    pub fn contains_kv(&self, key: &str, value: &str) -> bool {
        self.0.iter().any(|t| t.key == key && t.value == value)
    }

    pub fn has_key(&self, key: &str) -> bool {
        self.0.iter().any(|t| t.key == key)
    }

    /// The value of the first tag with this key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.value.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Tag> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether this is the tag set of an external network.
    pub fn is_external(&self) -> bool {
        self.contains_kv("$identity", "externalnetwork")
    }
}

impl FromIterator<Tag> for TagSet {
    fn from_iter<I: IntoIterator<Item = Tag>>(iter: I) -> Self {
        TagSet(iter.into_iter().collect())
    }
}

impl Extend<Tag> for TagSet {
    fn extend<I: IntoIterator<Item = Tag>>(&mut self, iter: I) {
        self.0.extend(iter)
    }
}

impl fmt::Display for TagSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for t in &self.0 {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

/// Parses a tag that is known to be valid (the crate's own constants).
pub(crate) fn known(s: &str) -> Tag {
    s.parse().expect("built-in tag is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tags() {
        let t: Tag = "app=web".parse().unwrap();
        assert_eq!((t.key(), t.value()), ("app", "web"));
        let t: Tag = "@k8s:image=repo/x:1.2=a".parse().unwrap();
        assert_eq!((t.key(), t.value()), ("@k8s:image", "repo/x:1.2=a"));
        assert_eq!(t.to_string(), "@k8s:image=repo/x:1.2=a");
    }

    #[test]
    fn rejects_bad_tags() {
        assert!(matches!(
            "app".parse::<Tag>(),
            Err(TagError::MissingEquals(_))
        ));
        assert!(matches!("=web".parse::<Tag>(), Err(TagError::EmptyKey(_))));
        assert!(matches!(
            "app=".parse::<Tag>(),
            Err(TagError::EmptyValue(_))
        ));
        assert!(matches!(
            "app=w b".parse::<Tag>(),
            Err(TagError::Whitespace(_))
        ));
        assert!(matches!(
            "app=*".parse::<Tag>(),
            Err(TagError::WildcardNotAllowed(_))
        ));
        let long = format!("k={}", "v".repeat(MAX_TAG_LEN));
        assert!(matches!(long.parse::<Tag>(), Err(TagError::TooLong(_))));
    }

    #[test]
    fn patterns_match_exact_and_wildcard() {
        let set = TagSet::parse(["app=web", "env=prod"]).unwrap();
        let p: TagPattern = "app=web".parse().unwrap();
        assert!(p.matches(&set));
        let p: TagPattern = "env=*".parse().unwrap();
        assert!(p.matches(&set));
        assert_eq!(p.to_string(), "env=*");
        let p: TagPattern = "tier=*".parse().unwrap();
        assert!(!p.matches(&set));
        let p: TagPattern = "app=api".parse().unwrap();
        assert!(!p.matches(&set));
    }
}
