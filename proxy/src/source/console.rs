//! Console mode: the enforcer registers its PU with the console (bootstrap token, CSR;
//! the key never leaves the enforcer), renews its certificate through the same path,
//! watches its snapshot with a long-poll (plus a full re-poll every 10 minutes), keeps
//! the last snapshot and identity on disk (written atomically; used after a restart and
//! while the console is unreachable), and sends its flow records to the console in
//! batches from a bounded queue (dropped and counted when the console is away).
//!
//! With neither a snapshot from the console nor one on disk, the enforcer keeps
//! rejecting everything.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use segmesh_api::{FlowRecord, Issued};
use segmesh_identity::{KeyAlgorithm, Sessions, TlsConfigs, WorkloadIdentity, WorkloadKey};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use segmesh_api::net::Backoff;

use crate::config::{ConfigError, ConsoleConfig, PuConfig};
use crate::metrics::ReloadLabels;
use crate::sink::Entry;
use crate::snapshot::Snapshot;
use crate::state::Shared;
/// Records per request at most.
const FLOW_BATCH: usize = 500;
/// How long records wait for a batch to fill.
const FLOW_LINGER: Duration = Duration::from_secs(1);
/// How long the console may hold a snapshot request open.
const WATCH_WAIT: Duration = Duration::from_secs(30);

pub use segmesh_api::client::{CallError, Client};

/// A client of the console a console section describes (its CA read from the file, its
/// bootstrap token resolved).
pub fn client(cfg: &ConsoleConfig) -> Result<Client, ConfigError> {
    let pem = std::fs::read_to_string(&cfg.ca).map_err(|e| ConfigError::Read(cfg.ca.clone(), e))?;
    Client::replicas(&cfg.url, &cfg.token()?, &pem).map_err(|e| ConfigError::Console(e.to_string()))
}

/// What is kept on disk next to the identity files.
#[derive(Debug, Serialize, Deserialize)]
struct Cached {
    /// `<namespace>:<name>`: a cache of another PU is ignored.
    pu: String,
    /// The tags our certificate carries.
    tags: Vec<String>,
    snapshot: Option<segmesh_api::Snapshot>,
}

/// Our identity as the console issued it.
struct Identity {
    tls: Arc<TlsConfigs>,
    /// PEM, to renew with.
    chain_pem: String,
    key_pem: String,
    tags: Vec<String>,
    not_after: SystemTime,
    /// At 2/3 of the certificate's life.
    renew_at: SystemTime,
}

/// What the console tasks share: the latest snapshot and identity.
pub struct State {
    pu: PuConfig,
    cfg: ConsoleConfig,
    snapshot: Option<segmesh_api::Snapshot>,
    identity: Option<Identity>,
    /// The newest revision the console offered (taken or found unusable).
    seen: Option<u64>,
    /// Tags from the cache, until a registration answers.
    cached_tags: Option<Vec<String>>,
    /// The console client authenticated by `identity`, built once per certificate (by
    /// its expiry).
    cert_client: Option<(SystemTime, Arc<Client>)>,
}

const SNAPSHOT_FILE: &str = "snapshot.json";
const CERT_FILE: &str = "identity.crt";
const KEY_FILE: &str = "identity.key";
const BUNDLE_FILE: &str = "identity.bundle.crt";

/// Writes a file atomically: a temporary file in the same folder, synced, renamed over
/// the old one, the folder synced.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn identity_from_pem(chain: &str, key: &str, bundle: &str) -> Result<Identity, String> {
    let certs = segmesh_identity::ca::certs_from_pem(chain).map_err(|e| e.to_string())?;
    let own = WorkloadIdentity::from_cert(certs.first().ok_or("no certificate")?)
        .map_err(|e| e.to_string())?;
    let sessions = Sessions::new().map_err(|e| e.to_string())?;
    let tls = TlsConfigs::from_pem(chain, key, bundle, &own.trust_domain, &sessions)
        .map_err(|e| e.to_string())?;
    Ok(Identity {
        tls: Arc::new(tls),
        chain_pem: chain.to_owned(),
        key_pem: key.to_owned(),
        tags: own.tags.clone(),
        not_after: own.not_after,
        renew_at: own.renew_at(2.0 / 3.0),
    })
}

impl State {
    fn qualified(&self) -> String {
        format!("{}:{}", self.pu.namespace, self.pu.name)
    }

    fn path(&self, f: &str) -> PathBuf {
        self.cfg.state_dir.join(f)
    }

    /// Reads what a previous run left on disk (nothing, if it is another PU's or
    /// unreadable).
    pub fn load(pu: &PuConfig, cfg: &ConsoleConfig) -> State {
        let mut st = State {
            pu: pu.clone(),
            cfg: cfg.clone(),
            snapshot: None,
            identity: None,
            seen: None,
            cached_tags: None,
            cert_client: None,
        };
        let cached: Option<Cached> = std::fs::read(st.path(SNAPSHOT_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match cached {
            Some(c) if c.pu == st.qualified() => {
                st.cached_tags = Some(c.tags);
                st.snapshot = c.snapshot;
            }
            Some(c) => {
                tracing::warn!(cached = %c.pu, pu = %st.qualified(), "the state folder holds another PU's snapshot; ignoring it");
                return st;
            }
            None => return st,
        }
        let read = |f: &str| std::fs::read_to_string(st.path(f));
        if let (Ok(c), Ok(k), Ok(b)) = (read(CERT_FILE), read(KEY_FILE), read(BUNDLE_FILE)) {
            match identity_from_pem(&c, &k, &b) {
                Ok(id) if id.not_after > SystemTime::now() => st.identity = Some(id),
                Ok(_) => tracing::warn!("the cached certificate has expired"),
                Err(e) => tracing::warn!(error = %e, "the cached identity is unusable"),
            }
        }
        st
    }

    /// The snapshot to enforce, if there is one to build.
    pub fn build(&self, source: &'static str) -> Option<Result<Snapshot, ConfigError>> {
        let snap = self.snapshot.as_ref()?;
        let tags = match (&self.identity, &self.cached_tags) {
            (Some(id), _) => &id.tags,
            (None, Some(t)) => t,
            // Our own tags come from the console; without them we cannot decide.
            (None, None) => return None,
        };
        Some(Snapshot::from_console(
            &self.pu.name,
            &self.pu.namespace,
            tags,
            snap,
            self.identity.as_ref().map(|i| i.tls.clone()),
            source,
        ))
    }

    fn save(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.cfg.state_dir)?;
        let tags = self
            .identity
            .as_ref()
            .map(|i| i.tags.clone())
            .or_else(|| self.cached_tags.clone())
            .unwrap_or_default();
        let c = Cached {
            pu: self.qualified(),
            tags,
            snapshot: self.snapshot.clone(),
        };
        let bytes = serde_json::to_vec(&c).map_err(std::io::Error::other)?;
        write_atomic(&self.path(SNAPSHOT_FILE), &bytes, 0o600)
    }
}

fn count(shared: &Shared, result: &'static str) {
    shared
        .metrics
        .console_requests
        .get_or_create(&ReloadLabels { result })
        .inc();
}

/// Builds and installs the snapshot from the current state (when it has one).
fn install(shared: &Shared, st: &State, why: &str) {
    match st.build("console") {
        None => {}
        Some(Ok(s)) => shared.install(s, why),
        Some(Err(e)) => shared.rejected(format!("the console's snapshot: {e}")),
    }
}

/// Takes `s` from the console if it can be built: then it is cached and enforced. One
/// that cannot is neither (the previous one stays in force and in the cache, so a
/// restart does not fail closed on it); the next watch asks for what follows it.
fn take(shared: &Shared, g: &mut State, s: segmesh_api::Snapshot) {
    let revision = s.revision;
    g.seen = Some(revision);
    let previous = g.snapshot.replace(s);
    let built = match g.build("console") {
        Some(r) => r.map(Some),
        // Before the first certificate (no tags of our own yet): the policies must
        // still compile.
        None => {
            let snap = g.snapshot.as_ref().expect("just set");
            Snapshot::from_console(&g.pu.name, &g.pu.namespace, &[], snap, None, "check")
                .map(|_| None)
        }
    };
    match built {
        Ok(snap) => {
            if let Err(e) = g.save() {
                tracing::warn!(error = %e, "cannot write the snapshot cache");
            }
            if let Some(snap) = snap {
                shared.install(snap, &format!("console revision {revision}"));
            }
        }
        Err(e) => {
            g.snapshot = previous;
            shared.rejected(format!("the console's revision {revision}: {e}"));
        }
    }
}

/// The addresses to register: the configured ones, or every non-loopback address of
/// this network namespace's interfaces.
fn addresses(cfg: &ConsoleConfig) -> Vec<IpAddr> {
    if !cfg.ips.is_empty() {
        return cfg.ips.clone();
    }
    let mut out: Vec<IpAddr> = crate::local::addresses()
        .unwrap_or_default()
        .into_iter()
        .filter(|ip| {
            !ip.is_loopback()
                && !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Registers (with the bootstrap token) or renews (with the current certificate): a new
/// key and CSR; the console answers with a certificate carrying the tags it recorded.
async fn register(client: &Client, st: &Mutex<State>, renew: bool) -> Result<Identity, CallError> {
    // A renewal with our certificate while it is valid; else with the token.
    let by_certificate = if renew {
        authenticated(client, st)
    } else {
        None
    };
    let client = by_certificate.as_deref().unwrap_or(client);
    let (body, key, state_dir) = {
        let st = st.lock().expect("lock poisoned");
        let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256)
            .map_err(|e| CallError::Body(e.to_string()))?;
        let csr = key
            .csr_pem(&st.pu.name)
            .map_err(|e| CallError::Body(e.to_string()))?;
        let body = serde_json::json!({
            "name": st.pu.name,
            "namespace": st.pu.namespace,
            "tags": st.pu.tags,
            "ips": addresses(&st.cfg),
            "csr": csr,
            "renew": renew,
        });
        (body, key, st.cfg.state_dir.clone())
    };
    let r: Issued = client
        .call(
            "POST",
            "/v1/enforcers/register",
            Some(body.to_string().into_bytes()),
            Duration::from_secs(10),
        )
        .await?;
    if !r.dropped.is_empty() {
        tracing::warn!(dropped = ?r.dropped, "the console did not certify some claimed tags (the bootstrap token does not allow them)");
    }
    let id = identity_from_pem(&r.chain, &key.pem(), &r.bundle).map_err(CallError::Body)?;
    let save = || -> std::io::Result<()> {
        std::fs::create_dir_all(&state_dir)?;
        write_atomic(&state_dir.join(KEY_FILE), key.pem().as_bytes(), 0o600)?;
        write_atomic(&state_dir.join(BUNDLE_FILE), r.bundle.as_bytes(), 0o644)?;
        write_atomic(&state_dir.join(CERT_FILE), r.chain.as_bytes(), 0o644)
    };
    if let Err(e) = save() {
        tracing::warn!(error = %e, dir = %state_dir.display(), "cannot keep the identity on disk");
    }
    tracing::info!(tags = ?r.tags, renew, "certificate issued by the console");
    Ok(Identity { tags: r.tags, ..id })
}

/// The client authenticated by our certificate while we hold a valid one (else the
/// caller uses the bootstrap token).
fn authenticated(client: &Client, st: &Mutex<State>) -> Option<Arc<Client>> {
    let mut st = st.lock().expect("lock poisoned");
    let id = st
        .identity
        .as_ref()
        .filter(|id| id.not_after > SystemTime::now())?;
    if let Some((at, c)) = &st.cert_client {
        if *at == id.not_after {
            return Some(c.clone());
        }
    }
    let at = id.not_after;
    let c = Arc::new(client.with_identity(&id.chain_pem, &id.key_pem).ok()?);
    st.cert_client = Some((at, c.clone()));
    Some(c)
}

/// Obtains and renews the certificate: at start (retrying until the console answers),
/// then at 2/3 of each certificate's life. At start a valid cached certificate renews
/// itself (the console lets only the PU's current certificate re-register a live PU);
/// if the console refuses that, the bootstrap token registers anew. A renewal refused
/// because the PU was deleted (410) ends renewals.
async fn identity_loop(shared: Arc<Shared>, client: Arc<Client>, st: Arc<Mutex<State>>) {
    let mut renew = st.lock().expect("lock poisoned").identity.is_some();
    let mut started = false;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        match register(&client, &st, renew).await {
            Ok(id) => {
                count(&shared, "ok");
                backoff.succeed();
                renew = true;
                started = true;
                let renew_at = id.renew_at;
                {
                    let mut g = st.lock().expect("lock poisoned");
                    g.identity = Some(id);
                    g.cached_tags = None;
                    if let Err(e) = g.save() {
                        tracing::warn!(error = %e, "cannot write the snapshot cache");
                    }
                    install(&shared, &g, "certificate issued");
                }
                let wait = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tokio::time::sleep(wait).await;
            }
            Err(e @ CallError::Status { .. }) if renew && !started => {
                count(&shared, "error");
                tracing::warn!(error = %e, "the cached certificate cannot renew itself; registering with the bootstrap token");
                renew = false;
            }
            Err(e @ CallError::Status { status: 410, .. }) => {
                count(&shared, "error");
                tracing::error!(error = %e, "the console refuses to renew this PU's certificate (deleted); no more renewals");
                return;
            }
            Err(e) => {
                count(&shared, "error");
                let wait = backoff.fail();
                if backoff.failures() == 1 || matches!(e, CallError::Status { .. }) {
                    tracing::warn!(error = %e, retry_in = ?wait, "registration with the console failed");
                } else {
                    tracing::debug!(error = %e, retry_in = ?wait, "registration with the console failed");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Watches the snapshot: a long-poll with the last revision seen, and a full fetch at
/// the re-poll interval. Every change is written to disk before it is enforced.
async fn watch_loop(shared: Arc<Shared>, client: Arc<Client>, st: Arc<Mutex<State>>) {
    let (pu, repoll) = {
        let g = st.lock().expect("lock poisoned");
        (g.qualified(), g.cfg.repoll)
    };
    let mut last_full = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    loop {
        let since = {
            let g = st.lock().expect("lock poisoned");
            g.seen.or(g.snapshot.as_ref().map(|s| s.revision))
        };
        // Without a snapshot, or at the re-poll interval: a plain fetch, answered at once.
        let full = since.is_none() || last_full.elapsed() >= repoll;
        let wait = WATCH_WAIT.min(repoll);
        let path = match since {
            Some(r) if !full => format!(
                "/v1/snapshot?pu={}&since={r}&wait={}",
                segmesh_api::query_escape(&pu),
                wait.as_secs()
            ),
            _ => format!("/v1/snapshot?pu={}", segmesh_api::query_escape(&pu)),
        };
        let auth = authenticated(&client, &st);
        match auth
            .as_deref()
            .unwrap_or(&client)
            .call::<segmesh_api::Snapshot>("GET", &path, None, wait + Duration::from_secs(10))
            .await
        {
            Ok(s) => {
                count(&shared, "ok");
                if backoff.failures() > 0 {
                    tracing::info!("the console is reachable again");
                }
                backoff.succeed();
                if full {
                    last_full = Instant::now();
                }
                let mut g = st.lock().expect("lock poisoned");
                if g.snapshot.as_ref() != Some(&s) && g.seen != Some(s.revision) {
                    take(&shared, &mut g, s);
                } else {
                    g.seen = Some(s.revision);
                }
            }
            Err(e) => {
                count(&shared, "error");
                let mut wait = backoff.fail();
                // With console replicas the client has moved to the next one: ask it at
                // once (the backoff paces the failures after that).
                if backoff.failures() == 1 && client.replica_count() > 1 {
                    wait = Duration::ZERO;
                }
                if backoff.failures() == 1 {
                    tracing::warn!(error = %e, "cannot fetch the snapshot; enforcing the last one");
                } else {
                    tracing::debug!(error = %e, "cannot fetch the snapshot");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Sends flow records in batches; while the console is away the batch waits (and the
/// queue behind it fills up, then drops). A flush (at shutdown) sends everything queued
/// at once, one attempt per batch.
async fn flow_loop(
    shared: Arc<Shared>,
    client: Arc<Client>,
    st: Arc<Mutex<State>>,
    pu: String,
    mut rx: mpsc::Receiver<Entry>,
) {
    let path = format!("/v1/flows?pu={}", segmesh_api::query_escape(&pu));
    let send = |batch: Vec<FlowRecord>| {
        let (client, st, path, shared) = (client.clone(), st.clone(), path.clone(), shared.clone());
        async move {
            let body = serde_json::to_vec(&batch).expect("flow records serialize");
            // Only our certificate may report flows: before we have one, they wait.
            let Some(auth) = authenticated(&client, &st) else {
                return Err(batch);
            };
            let sent = auth
                .call::<serde_json::Value>("POST", &path, Some(body), Duration::from_secs(10))
                .await;
            match sent {
                Ok(_) => {
                    shared.metrics.console_flows_sent.inc_by(batch.len() as u64);
                    Ok(())
                }
                Err(e) => {
                    tracing::debug!(error = %e, queued = batch.len(), "cannot send flow records");
                    Err(batch)
                }
            }
        }
    };
    let mut batch: Vec<FlowRecord> = Vec::with_capacity(FLOW_BATCH);
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    loop {
        let mut flush = None;
        if batch.is_empty() {
            match rx.recv().await {
                Some(Entry::Record(r)) => batch.push(r),
                Some(Entry::Flush(done)) => flush = Some(done),
                None => return,
            }
        }
        let until = tokio::time::Instant::now() + FLOW_LINGER;
        while batch.len() < FLOW_BATCH && flush.is_none() {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(Entry::Record(r))) => batch.push(r),
                Ok(Some(Entry::Flush(done))) => flush = Some(done),
                _ => break,
            }
        }
        if let Some(done) = flush {
            while let Ok(e) = rx.try_recv() {
                if let Entry::Record(r) = e {
                    batch.push(r);
                }
            }
            while !batch.is_empty() {
                let rest = batch.split_off(batch.len().min(FLOW_BATCH));
                let _ = send(std::mem::replace(&mut batch, rest)).await;
            }
            let _ = done.send(());
            continue;
        }
        match send(std::mem::take(&mut batch)).await {
            Ok(()) => backoff.succeed(),
            Err(unsent) => {
                batch = unsent;
                tokio::time::sleep(backoff.fail()).await;
            }
        }
    }
}

/// Starts the console tasks.
pub fn spawn(
    shared: Arc<Shared>,
    client: Client,
    state: State,
    flows: mpsc::Receiver<Entry>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let pu = state.qualified();
    let client = Arc::new(client);
    let st = Arc::new(Mutex::new(state));
    vec![
        tokio::spawn(identity_loop(shared.clone(), client.clone(), st.clone())),
        tokio::spawn(watch_loop(shared.clone(), client.clone(), st.clone())),
        tokio::spawn(flow_loop(shared, client, st, pu, flows)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::sink::{FlowLog, Sinks};

    fn wire(revision: u64, clauses: usize) -> segmesh_api::Snapshot {
        let loaded = segmesh_policy::load(&[segmesh_policy::Source {
            name: "p.yaml",
            text: "kind: NetworkPolicy\nname: p\nnamespace: /acme\naction: Allow\nmode: Bidirectional\nsubject: [[app=web]]\nobject: [[app=api]]\n",
        }])
        .unwrap();
        let mut p = loaded.set.policies()[0].clone();
        p.subject = segmesh_policy::Selector(vec![vec!["app=web".parse().unwrap()]; clauses]);
        segmesh_api::Snapshot {
            revision,
            version: revision,
            policies: vec![p],
            externals: Vec::new(),
            namespaces: Vec::new(),
            registry: Vec::new(),
            services: Vec::new(),
        }
    }

    /// The attack: a snapshot whose selector has 65,537 clauses. It is refused (no
    /// panic), the previous one stays enforced and cached, `/ready` has the reason, and
    /// a restart from the cache enforces the previous one (not fail-closed).
    #[test]
    fn an_unbuildable_snapshot_is_neither_enforced_nor_cached() {
        let dir = std::env::temp_dir().join(format!("segmesh-take-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pu = PuConfig {
            name: "web".into(),
            namespace: "/acme".into(),
            tags: vec!["app=web".into()],
        };
        let cfg = ConsoleConfig {
            url: vec!["https://127.0.0.1:1".into()],
            ca: dir.join("ca.crt"),
            bootstrap_token: "t".into(),
            state_dir: dir.clone(),
            ips: Vec::new(),
            repoll: Duration::from_secs(600),
        };
        let mut settings = Settings::default();
        // One listen address: no capture of its own (installing a snapshot then leaves
        // this machine's tracked UDP flows alone).
        settings.listeners.address = Some("127.0.0.1".parse().unwrap());
        let shared = Shared::new(
            settings,
            Snapshot::fail_closed(),
            Sinks::new(FlowLog::open(None).unwrap(), None),
        );
        let mut st = State::load(&pu, &cfg);
        st.cached_tags = Some(vec!["app=web".into()]);
        take(&shared, &mut st, wire(1, 1));
        assert!(shared.snapshot().version.contains("revision 1"));
        assert_eq!(shared.rejection(), None);
        take(&shared, &mut st, wire(2, 65_537));
        assert!(
            shared.snapshot().version.contains("revision 1"),
            "the previous one"
        );
        let why = shared.rejection().expect("a reason");
        assert!(why.contains("65537 clauses (at most 256)"), "{why}");
        assert_eq!(shared.metrics.snapshot_rejected.get(), 1);
        assert_eq!(st.seen, Some(2), "the next watch asks for what follows it");
        let again = State::load(&pu, &cfg);
        assert_eq!(
            again.snapshot.map(|s| s.revision),
            Some(1),
            "the cache keeps revision 1"
        );
        take(&shared, &mut st, wire(3, 2));
        assert!(shared.snapshot().version.contains("revision 3"));
        assert_eq!(shared.rejection(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
