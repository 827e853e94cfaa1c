//! External networks: addresses outside the mesh (no enforcer at that end), matched by
//! CIDR, IP or domain name, and optionally by port.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::namespace::NamespacePath;
use crate::ports::Ports;
use crate::tag::{self, EXT_NAME_KEY, IDENTITY_EXTERNAL, Tag, TagSet};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("`{0}`: a wildcard is allowed only as the whole first label (`*.example.com`)")]
    Wildcard(String),
    #[error("`{0}` is not an IP address, a CIDR or a domain name")]
    Invalid(String),
}

/// A domain name or a one-label wildcard (`*.example.com` matches `a.example.com`, not
/// `example.com` nor `a.b.example.com`). Stored lower-case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DomainPattern {
    Exact(String),
    /// The suffix after `*.`.
    Wildcard(String),
}

/// One entry of an external network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Entry {
    Net(IpNet),
    Domain(DomainPattern),
}

/// An address outside the mesh as an enforcer sees it: the IP it connects to or accepts
/// from and, when known (DNS answer, SNI), the name it goes by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Address {
    pub ip: Option<IpAddr>,
    pub domain: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalNetwork {
    pub name: String,
    pub namespace: NamespacePath,
    pub tags: TagSet,
    pub entries: Vec<Entry>,
    pub ports: Ports,
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// A domain name per RFC 1035 preferred syntax, at least two labels, whose last label is
/// not all digits (RFC 3696 §2), so a mistyped IP like `10.0.0.300` is not a name.
fn valid_domain(d: &str) -> bool {
    let labels: Vec<&str> = d.split('.').collect();
    d.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| valid_label(l))
        && !labels
            .last()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

impl FromStr for DomainPattern {
    type Err = EntryError;
    fn from_str(s: &str) -> Result<Self, EntryError> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("*.") {
            if rest.contains('*') || !valid_domain(rest) {
                return Err(if rest.contains('*') {
                    EntryError::Wildcard(s.to_owned())
                } else {
                    EntryError::Invalid(s.to_owned())
                });
            }
            return Ok(DomainPattern::Wildcard(rest.to_owned()));
        }
        if lower.contains('*') {
            return Err(EntryError::Wildcard(s.to_owned()));
        }
        if !valid_domain(&lower) {
            return Err(EntryError::Invalid(s.to_owned()));
        }
        Ok(DomainPattern::Exact(lower))
    }
}

impl DomainPattern {
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match self {
            DomainPattern::Exact(d) => *d == name,
            DomainPattern::Wildcard(suffix) => name
                .split_once('.')
                .is_some_and(|(first, rest)| valid_label(first) && rest == suffix),
        }
    }
}

impl FromStr for Entry {
    type Err = EntryError;
    fn from_str(s: &str) -> Result<Self, EntryError> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Entry::Net(IpNet::from(ip)));
        }
        if let Ok(net) = s.parse::<IpNet>() {
            // `10.1.2.3/8` means the network `10.0.0.0/8`.
            return Ok(Entry::Net(net.trunc()));
        }
        if s.contains('/') || s.contains(':') {
            return Err(EntryError::Invalid(s.to_owned()));
        }
        s.parse().map(Entry::Domain)
    }
}

impl Entry {
    pub fn matches(&self, addr: &Address) -> bool {
        match self {
            Entry::Net(net) => addr.ip.is_some_and(|ip| net.contains(&ip.to_canonical())),
            Entry::Domain(d) => addr.domain.as_deref().is_some_and(|n| d.matches(n)),
        }
    }
}

impl ExternalNetwork {
    /// The tags a selector sees for this network: its own plus `$identity=externalnetwork`
    /// and `ext:name=<name>`.
    pub fn effective_tags(&self) -> TagSet {
        let mut t = self.tags.clone();
        t.insert(tag::known(IDENTITY_EXTERNAL));
        if let Ok(name) = Tag::new(EXT_NAME_KEY, &self.name) {
            t.insert(name);
        }
        t
    }

    /// Whether this network contains the address on this port (ignoring namespaces).
    pub fn matches(&self, addr: &Address, port: impl Into<crate::FlowPort>) -> bool {
        self.ports.contains(port) && self.entries.iter().any(|e| e.matches(addr))
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(d) => f.write_str(d),
            DomainPattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Net(n) => write!(f, "{n}"),
            Entry::Domain(d) => write!(f, "{d}"),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.ip, &self.domain) {
            (Some(ip), Some(d)) => write!(f, "{d} ({ip})"),
            (Some(ip), None) => write!(f, "{ip}"),
            (None, Some(d)) => f.write_str(d),
            (None, None) => f.write_str("(no address)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: &str) -> Address {
        Address {
            ip: Some(ip.parse().unwrap()),
            domain: None,
        }
    }

    fn name(d: &str) -> Address {
        Address {
            ip: None,
            domain: Some(d.to_owned()),
        }
    }

    #[test]
    fn parses_entries() {
        assert_eq!(
            "10.1.2.3/8".parse::<Entry>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "198.51.100.7".parse::<Entry>().unwrap().to_string(),
            "198.51.100.7/32"
        );
        assert_eq!("::/0".parse::<Entry>().unwrap().to_string(), "::/0");
        assert_eq!(
            "fd00::3".parse::<Entry>().unwrap().to_string(),
            "fd00::3/128"
        );
        assert_eq!(
            "API.Example.com.".parse::<Entry>().unwrap().to_string(),
            "api.example.com"
        );
        assert_eq!(
            "*.example.com".parse::<Entry>().unwrap().to_string(),
            "*.example.com"
        );
    }

    #[test]
    fn rejects_bad_wildcards_and_garbage() {
        for bad in [
            "*",
            "googleapis*.com",
            "googleapis.*",
            "*.*.com",
            "a.*.com",
            "*example.com",
        ] {
            assert!(
                matches!(bad.parse::<Entry>(), Err(EntryError::Wildcard(_))),
                "{bad}"
            );
        }
        for bad in [
            "10.0.0.300",
            "10.0.0.0/33",
            "not a name",
            "-a.com",
            "localhost",
            "fd00::/129",
            "*.com1.123",
        ] {
            assert!(
                matches!(bad.parse::<Entry>(), Err(EntryError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn matching() {
        let e: Entry = "10.0.0.0/8".parse().unwrap();
        assert!(e.matches(&addr("10.9.9.9")));
        assert!(!e.matches(&addr("11.0.0.1")));
        assert!(!e.matches(&addr("::1")));
        assert!(!e.matches(&name("ten.example.com")));
        let w: Entry = "*.example.com".parse().unwrap();
        assert!(w.matches(&name("a.example.com")));
        assert!(w.matches(&name("A.EXAMPLE.COM.")));
        assert!(!w.matches(&name("example.com")));
        assert!(!w.matches(&name("a.b.example.com")));
        let x: Entry = "example.com".parse().unwrap();
        assert!(x.matches(&name("example.com")));
        assert!(!x.matches(&name("a.example.com")));
    }
}
