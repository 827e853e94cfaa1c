//! The enforcer's local configuration file (`--local-config`): the PU, its identity
//! files, the workload registry and the policy files. Relative paths are relative to the
//! file. The console later supplies the same content as a snapshot.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0}: {1}")]
    Yaml(PathBuf, #[source] serde_norway::Error),
    #[error("{0}")]
    Policy(#[from] segmesh_policy::LoadError),
    #[error("pu: {0}")]
    Pu(String),
    #[error("identity: {0}")]
    Identity(#[from] segmesh_identity::IdentityError),
    #[error("identity: the certificate names {found}, but the configuration's PU is {expected}")]
    IdentityMismatch { expected: String, found: String },
    #[error("console: {0}")]
    Console(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PuConfig {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

/// A PU this enforcer may meet (the console's wire type: one definition for both).
pub use crate::relay::sockmap::SockmapMode;
pub use segmesh_api::RegistryEntry;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listeners {
    /// Outbound capture (REDIRECT target). Default 15001.
    #[serde(default = "d_outbound")]
    pub outbound: u16,
    /// Inbound capture (TPROXY target). Default 15006.
    #[serde(default = "d_inbound")]
    pub inbound: u16,
    /// Mesh tunnel. Default 15008.
    #[serde(default = "d_tunnel")]
    pub tunnel: u16,
    /// Admin (`/healthz`, `/ready`, `/metrics`, `/config`). Default 15020.
    #[serde(default = "d_admin")]
    pub admin: u16,
    /// Bind every listener on this one address, with no transparent inbound socket, and
    /// open tunnel connections from it: several enforcers on one host (labs, the
    /// in-process tests on 127.0.0.x). Capture then needs rules of one's own. Default:
    /// none (outbound on loopback, inbound transparent and tunnel on every address).
    #[serde(default)]
    pub address: Option<IpAddr>,
}

fn d_outbound() -> u16 {
    15001
}
fn d_inbound() -> u16 {
    15006
}
fn d_tunnel() -> u16 {
    15008
}
fn d_admin() -> u16 {
    15020
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            outbound: 15001,
            inbound: 15006,
            tunnel: 15008,
            admin: 15020,
            address: None,
        }
    }
}

/// Limits of the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Concurrent proxied connections; more are refused with an RST. Default 16384.
    #[serde(default = "d_max")]
    pub max_connections: usize,
    /// Close a connection idle this long in both directions. Default 1 h.
    #[serde(default = "d_idle", with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Give up connecting to a destination after this long. Default 5 s.
    #[serde(default = "d_connect", with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// A tunnel's TLS handshake and request/response must finish within this. Default 5 s.
    #[serde(default = "d_connect", with = "humantime_serde_compat")]
    pub handshake_timeout: Duration,
    /// Tunnel handshakes in flight (both roles); more are refused. Default 256.
    #[serde(default = "d_handshakes")]
    pub max_handshakes: usize,
    /// Tunnel handshakes in flight from one source address (server role), so that idle
    /// connections from one address cannot take everyone's. Default 16.
    #[serde(default = "d_handshakes_per_source")]
    pub max_handshakes_per_source: usize,
    /// UDP sessions (5-tuples) kept at most; a new one evicts the least recently used.
    /// Default 4096.
    #[serde(default = "d_udp_sessions")]
    pub max_udp_sessions: usize,
    /// A UDP session with no datagram either way for this long ends. Default 60 s.
    #[serde(default = "d_udp_idle", with = "humantime_serde_compat")]
    pub udp_idle_timeout: Duration,
}

fn d_udp_sessions() -> usize {
    4096
}

fn d_udp_idle() -> Duration {
    Duration::from_secs(60)
}

fn d_handshakes() -> usize {
    256
}

fn d_handshakes_per_source() -> usize {
    16
}

fn d_max() -> usize {
    16384
}
fn d_idle() -> Duration {
    Duration::from_secs(3600)
}
fn d_connect() -> Duration {
    Duration::from_secs(5)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: d_max(),
            idle_timeout: d_idle(),
            connect_timeout: d_connect(),
            handshake_timeout: d_connect(),
            max_handshakes: d_handshakes(),
            max_handshakes_per_source: d_handshakes_per_source(),
            max_udp_sessions: d_udp_sessions(),
            udp_idle_timeout: d_udp_idle(),
        }
    }
}

/// How the enforcer reaches the console (console mode): it registers its PU there,
/// receives its certificate and snapshots, and reports flow records.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// `https://host:port`, or a list of them: console replicas (sharing one etcd), of
    /// which the enforcer watches one and moves to the next when it stops answering.
    #[serde(deserialize_with = "one_or_many")]
    pub url: Vec<String>,
    /// The console's CA bundle (its data dir's `ca/bundle.crt`), to verify its HTTPS
    /// certificate.
    pub ca: PathBuf,
    /// The bootstrap token, or `@path` to read it from a file.
    pub bootstrap_token: String,
    /// Where the last snapshot and the identity are kept (atomically written; used after
    /// a restart and while the console is unreachable). Default `/var/lib/segmesh`.
    #[serde(default = "d_state")]
    pub state_dir: PathBuf,
    /// The PU's addresses to register. Default: every non-loopback address of the
    /// interfaces the enforcer sees.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The full re-poll every enforcer does besides its watch (a safety net). Default
    /// 10 min.
    #[serde(default = "d_repoll", with = "humantime_serde_compat")]
    pub repoll: Duration,
}

/// A string or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

fn d_state() -> PathBuf {
    PathBuf::from("/var/lib/segmesh")
}

fn d_repoll() -> Duration {
    Duration::from_secs(600)
}

impl ConsoleConfig {
    /// The bootstrap token (read from its file when written `@path`).
    pub fn token(&self) -> Result<String, ConfigError> {
        match self.bootstrap_token.strip_prefix('@') {
            Some(p) => std::fs::read_to_string(p)
                .map(|t| t.trim().to_owned())
                .map_err(|e| ConfigError::Read(PathBuf::from(p), e)),
            None => Ok(self.bootstrap_token.clone()),
        }
    }
}

fn d_true() -> bool {
    true
}

/// Where the enforcer runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// In a workload's network namespace (a pod): the admin port listens on every
    /// address (the kubelet probes it).
    #[default]
    Sidecar,
    /// On a host, for its own processes: the admin port listens on loopback only.
    Host,
}

/// What both modes configure the same way: listeners, limits, flow records and the
/// enforcer's behaviour. Read once at start (a reload does not change listeners).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub listeners: Listeners,
    pub limits: Limits,
    /// Where flow records go: a path, or `-` for stdout. Default: none.
    pub flow_log: Option<String>,
    /// Re-decide open connections on every new snapshot. Default true.
    pub recheck_open: bool,
    /// Record every flow, not only those of policies with `log: true`. Default false.
    pub log_all_flows: bool,
    /// `sidecar` (default) or `host`.
    pub mode: Mode,
    /// `SO_MARK` of every connection the enforcer opens; capture lets the proxy uid out
    /// only with it. Default 0x1337.
    pub socket_mark: u32,
    /// The NFQUEUE number the capture rules send ICMP echo requests to. Default 1337.
    pub echo_queue: u16,
    /// The application's probes the admin port makes on the kubelet's behalf.
    pub app_probes: segmesh_api::AppProbes,
    /// Whether spliced flows are handed to the kernel (BPF sockmap). Default `off`.
    pub sockmap: SockmapMode,
    /// Authenticated-only flows to a PU start in their tunnel stream and move to a
    /// spliced connection of their own after this many bytes of bulk (both ways
    /// together; any bytes while the flow is alone on its tunnel connection); `0`: each
    /// has its own connection from its first byte. Default 256 KiB.
    pub move_after: u64,
}

/// Bytes after which an authenticated-only flow moves from its stream to a spliced
/// connection of its own, unless configured otherwise.
pub const DEFAULT_MOVE_AFTER: u64 = 256 * 1024;

fn d_move_after() -> u64 {
    DEFAULT_MOVE_AFTER
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listeners: Listeners::default(),
            limits: Limits::default(),
            flow_log: None,
            recheck_open: true,
            log_all_flows: false,
            app_probes: Default::default(),
            sockmap: SockmapMode::default(),
            move_after: DEFAULT_MOVE_AFTER,
            mode: Mode::default(),
            socket_mark: DEFAULT_SOCKET_MARK,
            echo_queue: d_echo_queue(),
        }
    }
}

/// The mark the enforcer's sockets carry unless configured otherwise (the capture init's
/// `--enforcer-mark` default).
pub const DEFAULT_SOCKET_MARK: u32 = 0x1337;

fn d_socket_mark() -> u32 {
    DEFAULT_SOCKET_MARK
}

fn d_echo_queue() -> u16 {
    1337
}

/// Where the enforcer's configuration comes from; each mode has exactly its data.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A local configuration file, reloaded on change and on SIGHUP. A file with a
    /// `console:` section is read once and turned into [`ConfigSource::Console`].
    File(PathBuf),
    /// Console mode: the PU and how to reach the console; policies, registry and
    /// identity come from the console.
    Console(Box<ConsoleSource>),
}

/// Console mode's configuration (from flags, or a file's `console:` section).
#[derive(Debug, Clone)]
pub struct ConsoleSource {
    pub pu: PuConfig,
    pub console: ConsoleConfig,
    pub settings: Settings,
}

impl ConsoleSource {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.console.url.is_empty() {
            return Err(ConfigError::Console("no console url".into()));
        }
        for u in &self.console.url {
            if !u.starts_with("https://") {
                return Err(ConfigError::Console(format!(
                    "url `{u}`: expected https://host:port"
                )));
            }
        }
        Ok(())
    }
}

/// Durations written as `5s`, `1h`, `250ms`.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    pub pu: PuConfig,
    /// Certificate, key and trust bundle (used by the mesh tunnel).
    #[serde(default)]
    pub identity: Option<IdentityFiles>,
    #[serde(default)]
    pub registry: Vec<RegistryEntry>,
    /// Policy files or folders (the YAML `segmeshctl` reads).
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    #[serde(default)]
    pub listeners: Listeners,
    #[serde(default)]
    pub limits: Limits,
    /// Where flow records go: a path, or `-` for stdout. Default: none.
    #[serde(default)]
    pub flow_log: Option<String>,
    /// Console mode: policies, registry and identity come from the console (and the
    /// local file must not name any).
    #[serde(default)]
    pub console: Option<ConsoleConfig>,
    /// Re-decide open connections on every new snapshot and close those now rejected
    /// (close reason `policy`). Default true.
    #[serde(default = "d_true")]
    pub recheck_open: bool,
    /// Record every flow, not only those whose deciding policy says `log: true` (and
    /// rejected ones, which are always recorded). Default false.
    #[serde(default)]
    pub log_all_flows: bool,
    /// `sidecar` (default) or `host`.
    #[serde(default)]
    pub mode: Mode,
    /// Resume tunnel TLS sessions (default true; off only to measure full handshakes).
    #[serde(default = "d_true")]
    pub tunnel_resumption: bool,
    /// `SO_MARK` of every connection the enforcer opens (the capture init's
    /// `--enforcer-mark`). Default 0x1337.
    #[serde(default = "d_socket_mark")]
    pub socket_mark: u32,
    /// The NFQUEUE number of ICMP echo requests (the capture init's `--echo-queue`).
    /// Default 1337.
    #[serde(default = "d_echo_queue")]
    pub echo_queue: u16,
    /// The application's probes the admin port makes for the kubelet, by path
    /// (`/app-health/<container>/<kind>`), as the injector writes them
    /// (`{httpGet: {port: 8080, path: /healthz}}` or `{tcpSocket: {port: 8080}}`).
    #[serde(default, with = "serde_norway::with::singleton_map_recursive")]
    pub app_probes: segmesh_api::AppProbes,
    /// Hand allowed spliced flows to the kernel (BPF sockmap): `off` (default: splice),
    /// `auto` (where the kernel allows, else say why at start and splice), `require` (or
    /// do not start).
    #[serde(default)]
    pub sockmap: SockmapMode,
    /// Authenticated-only flows to a PU start in their tunnel stream (multiplexed, in
    /// TLS: no connection of their own to set up) and move to a spliced connection of
    /// their own after this many bytes of bulk (reads that filled their buffer), both
    /// ways together, or of any bytes while the flow is alone on its tunnel connection:
    /// short messages of flows sharing a connection stay in their streams. `0`: each has
    /// its own connection from its first byte. Default 262144 (256 KiB).
    #[serde(default = "d_move_after")]
    pub move_after: u64,
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

impl LocalConfig {
    /// Reads the file and makes its paths absolute.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        let mut cfg: LocalConfig =
            serde_norway::from_str(&text).map_err(|e| ConfigError::Yaml(path.to_owned(), e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.policies = cfg.policies.iter().map(|p| resolve(base, p)).collect();
        if let Some(id) = cfg.identity.as_mut() {
            id.cert = resolve(base, &id.cert);
            id.key = resolve(base, &id.key);
            id.bundle = resolve(base, &id.bundle);
        }
        if let Some(f) = cfg.flow_log.as_mut().filter(|f| f.as_str() != "-") {
            *f = resolve(base, Path::new(f.as_str())).display().to_string();
        }
        if let Some(c) = cfg.console.as_mut() {
            c.ca = resolve(base, &c.ca);
            c.state_dir = resolve(base, &c.state_dir);
            if let Some(p) = c.bootstrap_token.strip_prefix('@') {
                c.bootstrap_token = format!("@{}", resolve(base, Path::new(p)).display());
            }
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// What both modes share, as this file sets it.
    pub fn settings(&self) -> Settings {
        Settings {
            listeners: self.listeners,
            limits: self.limits,
            flow_log: self.flow_log.clone(),
            recheck_open: self.recheck_open,
            log_all_flows: self.log_all_flows,
            mode: self.mode,
            socket_mark: self.socket_mark,
            echo_queue: self.echo_queue,
            app_probes: self.app_probes.clone(),
            sockmap: self.sockmap,
            move_after: self.move_after,
        }
    }

    /// Console mode, when the file has a `console:` section.
    pub fn console_source(&self) -> Option<Box<ConsoleSource>> {
        Some(Box::new(ConsoleSource {
            pu: self.pu.clone(),
            console: self.console.clone()?,
            settings: self.settings(),
        }))
    }

    /// A console-mode configuration names no policies, registry or identity: those come
    /// from the console.
    fn check(&self) -> Result<(), ConfigError> {
        if let Some(c) = &self.console {
            let mut local = Vec::new();
            if !self.policies.is_empty() {
                local.push("policies");
            }
            if !self.registry.is_empty() {
                local.push("registry");
            }
            if self.identity.is_some() {
                local.push("identity");
            }
            if !local.is_empty() {
                return Err(ConfigError::Console(format!(
                    "with a console, {} come from the console; remove them from the file",
                    local.join(", ")
                )));
            }
            ConsoleSource {
                pu: self.pu.clone(),
                console: c.clone(),
                settings: self.settings(),
            }
            .check()?;
        }
        Ok(())
    }

    /// The paths whose change should trigger a reload: this file, the identity files,
    /// and the policy files and folders as listed (see [`expand`]).
    pub fn watch_roots(&self, config: &Path) -> Vec<PathBuf> {
        let mut out = vec![config.to_owned()];
        if let Some(id) = &self.identity {
            out.extend([id.cert.clone(), id.key.clone(), id.bundle.clone()]);
        }
        out.extend(self.policies.iter().cloned());
        out
    }
}

/// Watch roots with each folder replaced by the policy files below it (listed anew on
/// each call, so files added to a folder are seen).
pub fn expand(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::with_capacity(roots.len());
    for p in roots {
        if p.is_dir() {
            collect_yaml(p, &mut out);
        } else {
            out.push(p.clone());
        }
    }
    out
}

/// Policy files below a folder, sorted, recursively.
pub fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_yaml(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}
