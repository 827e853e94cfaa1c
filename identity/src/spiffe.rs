//! SPIFFE IDs of processing units: `spiffe://<trust-domain>/ns/<namespace path>/pu/<name>`
//! (SPIFFE ID spec: <https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>).

use std::fmt;
use std::str::FromStr;

use crate::IdentityError;

/// Default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "segmesh.local";

/// A PU's identity. `namespace` is an absolute path (`/` for the root).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub name: String,
}

fn bad(id: &str, reason: &'static str) -> IdentityError {
    IdentityError::BadSpiffeId {
        id: id.to_owned(),
        reason,
    }
}

/// SPIFFE trust domain characters: lowercase letters, digits, `.`, `-`, `_`.
pub fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// SPIFFE path segment characters: letters, digits, `.`, `-`, `_`; not `.` or `..`.
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, name: &str) -> Result<Self, IdentityError> {
        let id = SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        // Round-trip through the parser so both paths apply the same rules.
        id.to_string().parse()
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad(s, "not a spiffe:// URI"))?;
        if s.len() > 2048 {
            return Err(bad(s, "longer than 2048 bytes"));
        }
        let (td, path) = rest.split_once('/').ok_or_else(|| bad(s, "no path"))?;
        if !valid_trust_domain(td) {
            return Err(bad(s, "bad trust domain"));
        }
        if s.contains(['?', '#', '%']) {
            return Err(bad(s, "query, fragment or percent-encoding"));
        }
        let path = format!("/{path}");
        let after_ns = path
            .strip_prefix("/ns")
            .ok_or_else(|| bad(s, "path does not start with /ns/"))?;
        let i = after_ns
            .rfind("/pu/")
            .ok_or_else(|| bad(s, "path has no /pu/<name>"))?;
        let (ns, name) = (&after_ns[..i], &after_ns[i + 4..]);
        if !valid_segment(name) {
            return Err(bad(s, "bad PU name"));
        }
        if !ns.is_empty() && !ns[1..].split('/').all(valid_segment) {
            return Err(bad(s, "bad namespace segment"));
        }
        Ok(SpiffeId {
            trust_domain: td.to_owned(),
            namespace: if ns.is_empty() {
                "/".to_owned()
            } else {
                ns.to_owned()
            },
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.namespace.trim_end_matches('/');
        write!(
            f,
            "spiffe://{}/ns{}/pu/{}",
            self.trust_domain, ns, self.name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for (s, ns, name) in [
            (
                "spiffe://segmesh.local/ns/acme/shop/pu/web",
                "/acme/shop",
                "web",
            ),
            ("spiffe://segmesh.local/ns/pu/web", "/", "web"),
            ("spiffe://td/ns/pu/pu/x", "/pu", "x"),
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!((id.namespace.as_str(), id.name.as_str()), (ns, name));
            assert_eq!(id.to_string(), s);
        }
        assert_eq!(
            SpiffeId::new("segmesh.local", "/", "db")
                .unwrap()
                .to_string(),
            "spiffe://segmesh.local/ns/pu/db"
        );
    }

    #[test]
    fn rejects() {
        for s in [
            "https://segmesh.local/ns/a/pu/b",
            "spiffe://Segmesh/ns/a/pu/b",
            "spiffe://segmesh.local",
            "spiffe://segmesh.local/x/a/pu/b",
            "spiffe://segmesh.local/ns/a/b",
            "spiffe://segmesh.local/ns/a/pu/b/c",
            "spiffe://segmesh.local/ns/a//pu/b",
            "spiffe://segmesh.local/ns/a/pu/",
            "spiffe://segmesh.local/ns/a/pu/b?x",
        ] {
            assert!(
                matches!(
                    s.parse::<SpiffeId>(),
                    Err(IdentityError::BadSpiffeId { .. })
                ),
                "{s}"
            );
        }
    }
}
