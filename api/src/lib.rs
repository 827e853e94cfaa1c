//! What the enforcer and the console share: the wire types, and the HTTPS client of the
//! console API.
//!
//! # Layout
//! - [`FlowRecord`]: one connection as an enforcer saw it (JSON lines, and to the
//!   console).
//! - [`Snapshot`]: what the console sends one enforcer.
//! - [`client`]: the HTTPS client of the console API.
//! - [`net`]: the accept loop and the backoff the enforcer and the console share.

pub mod client;
pub mod net;

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Percent-encodes a query value of the console API (`/` and `:` of `<namespace>:<name>`
/// stay readable).
pub fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One side of a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEndpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// `<namespace>:<name>` when this end is a processing unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pu: Option<String>,
    /// The external networks (`<namespace>:<name>`) the address fell in, when it is not
    /// a processing unit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external: Vec<String>,
    /// The name the enforcing PU resolved to this address that matched a domain entry
    /// of an external network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// `<namespace>:<name>` of the Service the connection was made to (its virtual
    /// address and port); `ip` and `port` are then the endpoint it went to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// A staged policy that matched, and what it would have done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedResult {
    pub policy: String,
    /// `allow` or `reject`.
    pub action: String,
}

/// One connection as an enforcer saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// When the connection was captured (RFC 3339, UTC).
    pub time: String,
    /// `outgoing` (our PU connects) or `incoming` (our PU accepts).
    pub direction: String,
    pub source: FlowEndpoint,
    pub destination: FlowEndpoint,
    /// `allow` or `reject`.
    pub verdict: String,
    /// Why: see [`FlowReason`] for every value.
    pub reason: FlowReason,
    /// The deciding policies (`<namespace>:<name>`).
    pub policies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub staged: Vec<StagedResult>,
    pub encrypt: bool,
    /// How the bytes moved: `spliced` (zero-copy), `copied`, or `tls` (encrypted in the
    /// tunnel, rustls in user space); absent when rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_path: Option<String>,
    /// Bytes from source to destination, and back.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
    /// How it ended: see [`CloseReason`] for every value.
    pub close_reason: CloseReason,
    /// The peer's SPIFFE ID, from its certificate (mesh tunnel flows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<String>,
    /// Which enforcer refused the flow: `client` or `server` (mesh tunnel flows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_by: Option<Side>,
    /// What the other enforcer answered: `accepted`, `policy`, `default`, `no-snapshot`,
    /// `bad-request`, `overload` or `unreachable` (the tunnel's reason codes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_reason: Option<String>,
    /// The modes (`Incoming`, `Outgoing`, `Bidirectional`) of the deciding policies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modes: Vec<String>,
    /// Whether the tunnel's TLS session was resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<bool>,
    /// Close reason `policy`: the policies of the new snapshot that reject the flow
    /// (`default` when none matched).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub closed_by: Vec<String>,
    /// `udp` for a UDP session (one record per 5-tuple); absent for TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// UDP sessions: datagrams from source to destination, and back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datagrams_sent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datagrams_received: Option<u64>,
}

/// Why a flow got its verdict: the decision's reason (`policy`, `default`,
/// `discovered`) or why the enforcer refused before or beside any policy. Serialized as
/// the strings the flow records always carried.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FlowReason {
    /// An enforced policy decided (allowed or rejected).
    Policy,
    /// No enforced policy matched: the default (reject).
    Default,
    /// No enforced policy matched in a namespace in discovery mode: allowed and recorded.
    Discovered,
    /// The enforcer has no valid configuration and rejects everything (fail closed).
    NoSnapshot,
    /// The connection was addressed to the enforcer's own capture port.
    Loop,
    /// A plain (non-tunnel) connection from the address of a registered PU: PUs must
    /// come through the tunnel with their certificate.
    RegisteredPu,
    /// The enforcer is at its connection or handshake limit.
    Overload,
    /// A PU-to-PU flow, but this enforcer has no workload certificate.
    NoIdentity,
    /// The peer's valid certificate names another PU than the one registered at its
    /// address.
    Impersonation,
    /// The peer enforcer's tunnel port could not be reached.
    TunnelUnreachable,
    /// The peer's certificate was refused (`peer-certificate:<why>`, `why` as the
    /// identity crate names rejections: `unknown_issuer`, `expired`, ...).
    PeerCertificate(String),
    /// The tunnel's TLS handshake did not finish in time.
    HandshakeTimeout,
    /// The peer broke the tunnel protocol (no answer, malformed answer, no GO byte).
    TunnelProtocol,
    /// A tunnel connection sent no request within the server's idle limit.
    IdleBeforeRequest,
    /// A malformed tunnel request.
    BadRequest,
    /// A captured inbound connection for an address that is not this workload's own
    /// (a neighbour trying to relay through the pod).
    NotLocal,
    /// A connection to a Service that has no endpoint (none registered, or none whose
    /// tunnel could be opened).
    NoEndpoint,
    /// The enforcer ended the flow's task without deciding it (a bug; its log says more).
    Internal,
    /// A ticket (authenticated-only tunnel flow) that was never issued, was already
    /// used or expired.
    TicketUnknown,
    /// A valid ticket presented from another address than the PU it was issued to.
    TicketAddress,
    /// A reason this build does not know (a record from a newer enforcer), kept as is.
    Unknown(String),
}

impl FlowReason {
    const NAMED: [(FlowReason, &'static str); 19] = [
        (FlowReason::Policy, "policy"),
        (FlowReason::Default, "default"),
        (FlowReason::Discovered, "discovered"),
        (FlowReason::NoSnapshot, "no-snapshot"),
        (FlowReason::Loop, "loop"),
        (FlowReason::RegisteredPu, "registered-pu"),
        (FlowReason::Overload, "overload"),
        (FlowReason::NoIdentity, "no-identity"),
        (FlowReason::Impersonation, "impersonation"),
        (FlowReason::TunnelUnreachable, "tunnel-unreachable"),
        (FlowReason::HandshakeTimeout, "handshake-timeout"),
        (FlowReason::TunnelProtocol, "tunnel-protocol"),
        (FlowReason::IdleBeforeRequest, "idle-before-request"),
        (FlowReason::BadRequest, "bad-request"),
        (FlowReason::Internal, "internal"),
        (FlowReason::NotLocal, "not-local"),
        (FlowReason::NoEndpoint, "no-endpoint"),
        (FlowReason::TicketUnknown, "ticket-unknown"),
        (FlowReason::TicketAddress, "ticket-address"),
    ];
    const PEER_CERTIFICATE: &'static str = "peer-certificate:";
}

impl fmt::Display for FlowReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlowReason::PeerCertificate(why) => write!(f, "{}{why}", Self::PEER_CERTIFICATE),
            FlowReason::Unknown(s) => f.write_str(s),
            named => {
                let (_, s) = Self::NAMED
                    .iter()
                    .find(|(r, _)| r == named)
                    .expect("every other variant is named");
                f.write_str(s)
            }
        }
    }
}

impl std::str::FromStr for FlowReason {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(why) = s.strip_prefix(Self::PEER_CERTIFICATE) {
            return Ok(FlowReason::PeerCertificate(why.to_owned()));
        }
        Ok(Self::NAMED
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(r, _)| r.clone())
            .unwrap_or_else(|| FlowReason::Unknown(s.to_owned())))
    }
}

/// How a flow ended. Serialized as the strings the flow records always carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloseReason {
    /// Both directions ended with a FIN.
    Closed,
    /// One side reset; the other was reset too.
    Reset,
    /// No bytes either way for the idle timeout.
    Idle,
    /// The destination refused the connection (or was unreachable).
    ConnectFailed,
    /// The destination did not answer within the connect timeout.
    ConnectTimeout,
    /// A new snapshot rejects the open flow: the enforcer closed it.
    Policy,
    /// Refused at establishment (the verdict, or an enforcer-side reason).
    Rejected,
    /// Another I/O error.
    Error,
    /// The enforcer shut down before the flow ended (after its drain period).
    Shutdown,
    /// A UDP session pushed out of the enforcer's full session table by a newer one.
    Evicted,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Closed => "closed",
            CloseReason::Reset => "reset",
            CloseReason::Idle => "idle",
            CloseReason::ConnectFailed => "connect-failed",
            CloseReason::ConnectTimeout => "connect-timeout",
            CloseReason::Policy => "policy",
            CloseReason::Rejected => "rejected",
            CloseReason::Error => "error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Evicted => "evicted",
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which enforcer refused a mesh tunnel flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The enforcer of the PU that connects.
    Client,
    /// The enforcer of the PU that accepts.
    Server,
}

impl Serialize for FlowReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FlowReason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(s.parse().expect("infallible"))
    }
}

/// A kubelet probe of the application that the enforcer makes instead, on loopback
/// (`/app-health/<container>/<kind>` on its admin port; the injector rewrites the pod's
/// probes to that path and hands the originals to the enforcer as JSON in
/// `SEGMESH_APP_PROBES`, keyed by path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum AppProbe {
    /// GET `path` on `port`; passes on a status from 200 to 399.
    HttpGet {
        port: u16,
        path: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<(String, String)>,
    },
    /// Passes when a TCP connection to `port` opens.
    TcpSocket { port: u16 },
}

/// The probes of one pod, by admin path.
pub type AppProbes = std::collections::BTreeMap<String, AppProbe>;

/// The admin path of a container's probe (`readiness`, `liveness` or `startup`).
pub fn app_probe_path(container: &str, kind: &str) -> String {
    format!("/app-health/{container}/{kind}")
}

/// What the console answers an enforcer's registration or renewal: the certificate it
/// issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    /// PEM: the certificate, then intermediates.
    pub chain: String,
    /// PEM: the trust bundle.
    pub bundle: String,
    /// The tags the certificate carries.
    pub tags: Vec<String>,
    /// Claimed tags the bootstrap token does not allow (not certified).
    #[serde(default)]
    pub dropped: Vec<String>,
}

/// A PU an enforcer may meet, by address. No tags: a peer's tags come only from its
/// certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    pub name: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
}

/// What one enforcer needs to decide: the policies covering its PU's namespace, the
/// external networks visible from it, the settings of its namespace and ancestors, and
/// the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Changes whenever anything an enforcer may need changes (commit, rollback,
    /// registration); enforcers watch it with `since=`.
    pub revision: u64,
    /// The published policy version.
    pub version: u64,
    pub policies: Vec<segmesh_policy::NetworkPolicy>,
    pub externals: Vec<segmesh_policy::ExternalNetwork>,
    pub namespaces: Vec<segmesh_policy::Namespace>,
    pub registry: Vec<RegistryEntry>,
    /// Every Service of the mesh, its endpoints resolved by the console.
    #[serde(default)]
    pub services: Vec<ServiceEntry>,
}

/// A Service as an enforcer needs it: where clients connect, and the endpoints to send
/// them to (resolved: the PUs its selector picks, or the listed addresses, each the PU
/// registered there or an address outside the mesh).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    /// `<namespace>:<name>`.
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<segmesh_policy::ServicePort>,
    pub endpoints: Vec<ServiceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEndpoint {
    /// The address connections go to.
    pub ip: IpAddr,
    /// `<namespace>:<name>` of the PU registered at `ip`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pu: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The strings every flow record carried before the reasons were typed: the JSON
    /// must not change.
    #[test]
    fn reasons_keep_their_strings() {
        let reasons = [
            "policy",
            "default",
            "discovered",
            "no-snapshot",
            "loop",
            "registered-pu",
            "overload",
            "no-identity",
            "impersonation",
            "tunnel-unreachable",
            "peer-certificate:unknown_issuer",
            "handshake-timeout",
            "tunnel-protocol",
            "idle-before-request",
            "bad-request",
            "internal",
            "not-local",
            "no-endpoint",
        ];
        for s in reasons {
            let r: FlowReason = s.parse().unwrap();
            assert!(
                !matches!(r, FlowReason::Unknown(_)),
                "{s} is a known reason"
            );
            assert_eq!(r.to_string(), s);
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<FlowReason>(&json).unwrap(), r);
        }
        let newer: FlowReason = serde_json::from_str("\"some-new-reason\"").unwrap();
        assert_eq!(newer, FlowReason::Unknown("some-new-reason".into()));
        assert_eq!(
            serde_json::to_string(&newer).unwrap(),
            "\"some-new-reason\""
        );

        let closes = [
            (CloseReason::Closed, "closed"),
            (CloseReason::Reset, "reset"),
            (CloseReason::Idle, "idle"),
            (CloseReason::ConnectFailed, "connect-failed"),
            (CloseReason::ConnectTimeout, "connect-timeout"),
            (CloseReason::Policy, "policy"),
            (CloseReason::Rejected, "rejected"),
            (CloseReason::Error, "error"),
            (CloseReason::Shutdown, "shutdown"),
            (CloseReason::Evicted, "evicted"),
        ];
        for (c, s) in closes {
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{s}\""));
            assert_eq!(c.as_str(), s);
        }
        assert_eq!(serde_json::to_string(&Side::Server).unwrap(), "\"server\"");
    }
}
