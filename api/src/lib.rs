//! What the enforcer and the console share: the wire types, and the HTTPS client of the
//! console API.
//!
//! # Layout
//! - [`FlowRecord`]: one connection as an enforcer saw it (JSON lines, and to the
//!   console).
//! - [`Snapshot`]: what the console sends one enforcer.
//! - [`client`]: the HTTPS client of the console API.

pub mod client;

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
    /// `policy`, `default`, `discovered`, or why the enforcer refused before any
    /// policy (`no-snapshot`, `overload`, `registered-pu`, `loop`).
    pub reason: String,
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
    /// `closed`, `reset`, `idle`, `connect-failed`, `connect-timeout`, `policy`,
    /// `rejected`, `error`.
    pub close_reason: String,
    /// The peer's SPIFFE ID, from its certificate (mesh tunnel flows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<String>,
    /// Which enforcer refused the flow: `client` or `server` (mesh tunnel flows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_by: Option<String>,
    /// What the other enforcer answered (`accepted`, `policy`, `default`, ...).
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
}

/// A PU an enforcer may meet, by address. No tags: a peer's tags come only from its
/// certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}
