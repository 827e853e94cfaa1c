//! Port specifications: `tcp/N`, `tcp/N-M`, `any`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("expected `tcp/N`, `tcp/N-M` or `any`, found `{0}`")]
    Syntax(String),
    #[error("`{0}`: only tcp is supported (segmesh is an L4 TCP mesh)")]
    Protocol(String),
    #[error("`{0}`: ports are 1 to 65535")]
    OutOfRange(String),
    #[error("`{0}`: the range's start is above its end")]
    Reversed(String),
}

/// An inclusive TCP port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

/// The ports a policy or external network applies to: any, or a sorted list of
/// non-overlapping ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Ports {
    #[default]
    Any,
    Ranges(Vec<PortRange>),
}

/// One item of a port list: a range or `any`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortSpec {
    Any,
    Range(PortRange),
}

fn port(s: &str, whole: &str) -> Result<u16, PortError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortError::Syntax(whole.to_owned()));
    }
    match s.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err(PortError::OutOfRange(whole.to_owned())),
    }
}

impl FromStr for PortSpec {
    type Err = PortError;
    fn from_str(s: &str) -> Result<Self, PortError> {
        if s.eq_ignore_ascii_case("any") {
            return Ok(PortSpec::Any);
        }
        let (proto, rest) = s
            .split_once('/')
            .ok_or_else(|| PortError::Syntax(s.to_owned()))?;
        if !proto.eq_ignore_ascii_case("tcp") {
            return if proto.eq_ignore_ascii_case("udp") || proto.eq_ignore_ascii_case("sctp") {
                Err(PortError::Protocol(s.to_owned()))
            } else {
                Err(PortError::Syntax(s.to_owned()))
            };
        }
        let (a, b) = rest.split_once('-').unwrap_or((rest, rest));
        let (start, end) = (port(a, s)?, port(b, s)?);
        if start > end {
            return Err(PortError::Reversed(s.to_owned()));
        }
        Ok(PortSpec::Range(PortRange { start, end }))
    }
}

impl PortRange {
    /// Parses a single port `tcp/N` (a flow's port).
    pub fn single(s: &str) -> Result<u16, PortError> {
        match s.parse::<PortSpec>()? {
            PortSpec::Range(r) if r.start == r.end => Ok(r.start),
            _ => Err(PortError::Syntax(s.to_owned())),
        }
    }
}

impl Ports {
    /// Builds from parsed specs: an empty list or one with `any` is `Any`; ranges are
    /// sorted and merged.
    pub fn from_specs(specs: impl IntoIterator<Item = PortSpec>) -> Self {
        let mut ranges = Vec::new();
        for s in specs {
            match s {
                PortSpec::Any => return Ports::Any,
                PortSpec::Range(r) => ranges.push(r),
            }
        }
        if ranges.is_empty() {
            return Ports::Any;
        }
        ranges.sort();
        let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(r.start) <= u32::from(last.end) + 1 => {
                    last.end = last.end.max(r.end)
                }
                _ => merged.push(r),
            }
        }
        Ports::Ranges(merged)
    }

    pub fn contains(&self, port: u16) -> bool {
        match self {
            Ports::Any => true,
            Ports::Ranges(rs) => {
                // Ranges are sorted and disjoint: binary search on the start.
                let i = rs.partition_point(|r| r.start <= port);
                i > 0 && rs[i - 1].end >= port
            }
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "tcp/{}", self.start)
        } else {
            write!(f, "tcp/{}-{}", self.start, self.end)
        }
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ports::Any => f.write_str("any"),
            Ports::Ranges(rs) => {
                for (i, r) in rs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{r}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!("any".parse::<PortSpec>(), Ok(PortSpec::Any));
        assert_eq!(
            "tcp/80".parse::<PortSpec>(),
            Ok(PortSpec::Range(PortRange { start: 80, end: 80 }))
        );
        assert_eq!(
            "TCP/8000-8100".parse::<PortSpec>(),
            Ok(PortSpec::Range(PortRange {
                start: 8000,
                end: 8100
            }))
        );
        for bad in ["80", "tcp/", "tcp/x", "tcp/1-", "http/80", "tcp/-5"] {
            assert!(
                matches!(bad.parse::<PortSpec>(), Err(PortError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "udp/53".parse::<PortSpec>(),
            Err(PortError::Protocol(_))
        ));
        assert!(matches!(
            "tcp/0".parse::<PortSpec>(),
            Err(PortError::OutOfRange(_))
        ));
        assert!(matches!(
            "tcp/70000".parse::<PortSpec>(),
            Err(PortError::OutOfRange(_))
        ));
        assert!(matches!(
            "tcp/90-80".parse::<PortSpec>(),
            Err(PortError::Reversed(_))
        ));
    }

    #[test]
    fn merges_and_contains() {
        let p = Ports::from_specs(
            ["tcp/10-20", "tcp/21", "tcp/5", "tcp/100-200", "tcp/150-160"]
                .iter()
                .map(|s| s.parse().unwrap()),
        );
        assert_eq!(p.to_string(), "tcp/5,tcp/10-21,tcp/100-200");
        for (port, want) in [
            (4, false),
            (5, true),
            (6, false),
            (10, true),
            (21, true),
            (22, false),
            (200, true),
            (201, false),
        ] {
            assert_eq!(p.contains(port), want, "{port}");
        }
        assert_eq!(Ports::from_specs([]), Ports::Any);
        assert_eq!(
            Ports::from_specs([
                PortSpec::Range(PortRange { start: 1, end: 1 }),
                PortSpec::Any
            ]),
            Ports::Any
        );
    }
}
