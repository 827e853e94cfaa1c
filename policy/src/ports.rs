//! Port specifications: `tcp/N`, `tcp/N-M`, `udp/N`, `udp/N-M`, `icmp` (echo), `any`;
//! and a flow's port ([`FlowPort`]): its protocol and destination port.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("expected `tcp/N`, `tcp/N-M`, `udp/N`, `udp/N-M`, `icmp` or `any`, found `{0}`")]
    Syntax(String),
    #[error("`{0}`: the protocols are tcp, udp and icmp")]
    Protocol(String),
    #[error("`{0}`: ports are 1 to 65535")]
    OutOfRange(String),
    #[error("`{0}`: the range's start is above its end")]
    Reversed(String),
}

/// The IP protocol of a flow. ICMP flows are echo (request and reply).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }

    fn is_default(&self) -> bool {
        *self == Protocol::Tcp
    }
}

/// One flow's port: its protocol and destination port (0 for ICMP echo). A bare `u16`
/// converts to a TCP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowPort {
    pub protocol: Protocol,
    pub port: u16,
}

impl FlowPort {
    pub const ICMP_ECHO: FlowPort = FlowPort {
        protocol: Protocol::Icmp,
        port: 0,
    };

    pub fn tcp(port: u16) -> FlowPort {
        FlowPort {
            protocol: Protocol::Tcp,
            port,
        }
    }

    pub fn udp(port: u16) -> FlowPort {
        FlowPort {
            protocol: Protocol::Udp,
            port,
        }
    }

    /// Protocol and port as one ordered number (protocol in the high bits), so that a
    /// port range of one protocol is an interval of keys.
    pub fn key(self) -> u32 {
        (self.protocol as u32) << 16 | u32::from(self.port)
    }
}

/// A flow's port on the wire: `"tcp/80"`, `"udp/53"`, `"icmp"` (a bare number is TCP).
impl Serialize for FlowPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FlowPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Number(u16),
            Text(String),
        }
        match Wire::deserialize(d)? {
            Wire::Number(n) => Ok(FlowPort::tcp(n)),
            Wire::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl From<u16> for FlowPort {
    fn from(port: u16) -> FlowPort {
        FlowPort::tcp(port)
    }
}

impl fmt::Display for FlowPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            Protocol::Icmp => f.write_str("icmp"),
            p => write!(f, "{}/{}", p.as_str(), self.port),
        }
    }
}

impl FromStr for FlowPort {
    type Err = PortError;
    /// `tcp/N`, `udp/N` or `icmp`.
    fn from_str(s: &str) -> Result<Self, PortError> {
        match s.parse::<PortSpec>()? {
            PortSpec::Range(r) if r.start == r.end => Ok(FlowPort {
                protocol: r.protocol,
                port: r.start,
            }),
            _ => Err(PortError::Syntax(s.to_owned())),
        }
    }
}

/// An inclusive port range of one protocol (`icmp`: the range 0-0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    /// Absent in documents of older versions: tcp.
    #[serde(default, skip_serializing_if = "Protocol::is_default")]
    pub protocol: Protocol,
    pub start: u16,
    pub end: u16,
}

/// The ports a policy or external network applies to: any (every protocol), or a sorted
/// list of non-overlapping ranges.
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
        if s.eq_ignore_ascii_case("icmp") {
            return Ok(PortSpec::Range(PortRange {
                protocol: Protocol::Icmp,
                start: 0,
                end: 0,
            }));
        }
        let (proto, rest) = s
            .split_once('/')
            .ok_or_else(|| PortError::Syntax(s.to_owned()))?;
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            // ICMP has types, not ports: `icmp` alone means echo.
            "icmp" => return Err(PortError::Syntax(s.to_owned())),
            "sctp" | "icmpv6" | "gre" | "esp" => return Err(PortError::Protocol(s.to_owned())),
            _ => return Err(PortError::Syntax(s.to_owned())),
        };
        let (a, b) = rest.split_once('-').unwrap_or((rest, rest));
        let (start, end) = (port(a, s)?, port(b, s)?);
        if start > end {
            return Err(PortError::Reversed(s.to_owned()));
        }
        Ok(PortSpec::Range(PortRange {
            protocol,
            start,
            end,
        }))
    }
}

impl PortRange {
    /// Parses one flow's port: `tcp/N`, `udp/N` or `icmp`.
    pub fn single(s: &str) -> Result<FlowPort, PortError> {
        s.parse()
    }

    fn key_start(&self) -> u32 {
        FlowPort {
            protocol: self.protocol,
            port: self.start,
        }
        .key()
    }

    fn key_end(&self) -> u32 {
        FlowPort {
            protocol: self.protocol,
            port: self.end,
        }
        .key()
    }
}

impl Ports {
    /// Builds from parsed specs: an empty list or one with `any` is `Any`; ranges are
    /// sorted and merged (within a protocol).
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
                Some(last)
                    if last.protocol == r.protocol
                        && u32::from(r.start) <= u32::from(last.end) + 1 =>
                {
                    last.end = last.end.max(r.end)
                }
                _ => merged.push(r),
            }
        }
        Ports::Ranges(merged)
    }

    pub fn contains(&self, port: impl Into<FlowPort>) -> bool {
        self.contains_key(port.into().key())
    }

    /// [`contains`](Self::contains) for a [`FlowPort::key`].
    pub fn contains_key(&self, key: u32) -> bool {
        match self {
            Ports::Any => true,
            Ports::Ranges(rs) => {
                // Ranges are sorted and disjoint in key order: binary search on the start.
                let i = rs.partition_point(|r| r.key_start() <= key);
                i > 0 && rs[i - 1].key_end() >= key
            }
        }
    }

    /// The smallest and largest key these ports contain.
    pub fn key_bounds(&self) -> (u32, u32) {
        match self {
            Ports::Any => (0, u32::MAX),
            Ports::Ranges(rs) => (
                rs.first().map_or(0, |r| r.key_start()),
                rs.last().map_or(u32::MAX, |r| r.key_end()),
            ),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            Protocol::Icmp => f.write_str("icmp"),
            p if self.start == self.end => write!(f, "{}/{}", p.as_str(), self.start),
            p => write!(f, "{}/{}-{}", p.as_str(), self.start, self.end),
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
            Ok(PortSpec::Range(PortRange {
                protocol: Protocol::Tcp,
                start: 80,
                end: 80
            }))
        );
        assert_eq!(
            "TCP/8000-8100".parse::<PortSpec>(),
            Ok(PortSpec::Range(PortRange {
                protocol: Protocol::Tcp,
                start: 8000,
                end: 8100
            }))
        );
        for bad in [
            "80", "tcp/", "tcp/x", "tcp/1-", "http/80", "tcp/-5", "icmp/8", "udp", "udp/",
        ] {
            assert!(
                matches!(bad.parse::<PortSpec>(), Err(PortError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "sctp/53".parse::<PortSpec>(),
            Err(PortError::Protocol(_))
        ));
        assert!(matches!(
            "udp/0".parse::<PortSpec>(),
            Err(PortError::OutOfRange(_))
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
                PortSpec::Range(PortRange {
                    protocol: Protocol::Tcp,
                    start: 1,
                    end: 1
                }),
                PortSpec::Any
            ]),
            Ports::Any
        );
    }

    #[test]
    fn protocols_are_kept_apart() {
        let p = Ports::from_specs(
            ["udp/53", "tcp/53", "udp/54-60", "icmp", "tcp/54"]
                .iter()
                .map(|s| s.parse().unwrap()),
        );
        assert_eq!(p.to_string(), "tcp/53-54,udp/53-60,icmp");
        for (port, want) in [
            (FlowPort::tcp(53), true),
            (FlowPort::tcp(55), false),
            (FlowPort::udp(53), true),
            (FlowPort::udp(60), true),
            (FlowPort::udp(61), false),
            (FlowPort::ICMP_ECHO, true),
        ] {
            assert_eq!(p.contains(port), want, "{port}");
        }
        let tcp_only = Ports::from_specs(["tcp/1-65535".parse().unwrap()]);
        assert!(tcp_only.contains(443));
        assert!(!tcp_only.contains(FlowPort::udp(443)));
        assert!(!tcp_only.contains(FlowPort::ICMP_ECHO));
        // `any` is every protocol: an emergency reject-all must cover UDP and ICMP.
        assert!(Ports::Any.contains(FlowPort::udp(9)) && Ports::Any.contains(FlowPort::ICMP_ECHO));
        for s in ["tcp/80", "udp/53", "icmp"] {
            assert_eq!(s.parse::<FlowPort>().unwrap().to_string(), s);
        }
        assert!("udp/1-2".parse::<FlowPort>().is_err());
    }

    /// Documents written before protocols existed (no `protocol` field) are TCP, and TCP
    /// ranges serialize without it.
    #[test]
    fn wire_form_is_compatible() {
        let old: PortRange = serde_json::from_str(r#"{"start":80,"end":90}"#).unwrap();
        assert_eq!(old.protocol, Protocol::Tcp);
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"start":80,"end":90}"#
        );
        let udp = PortRange {
            protocol: Protocol::Udp,
            start: 53,
            end: 53,
        };
        let json = serde_json::to_string(&udp).unwrap();
        assert_eq!(serde_json::from_str::<PortRange>(&json).unwrap(), udp);
    }
}
