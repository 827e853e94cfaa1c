//! The store on etcd, for several console replicas on one etcd cluster.
//!
//! Every mutation is one etcd transaction built the way etcd's own software transactional
//! memory does it: the keys it read are compared on their modification revision, so that
//! it applies only if none changed since, and it is taken again from a fresh read when one
//! did. Counters (the revision, the last version, the last audit entry, the last flow
//! record) are keys of their own: two replicas committing at the same moment compare the
//! same counter and one of them reads again, so no version number is given twice and no
//! commit is lost. Nothing here elects a leader: etcd's transactions are the only
//! arbiter.
//!
//! Keys (below the prefix, `/segmesh/` by default): `draft`, `meta/{revision,version,
//! audit,flow,flows}`, `versions/<20 digits>`, `tokens/<hash>`, `audit/<20 digits>`,
//! `pus/<namespace>:<name>`, `leases/<namespace>:<name>` (attached to an etcd lease),
//! `flows/<20 digits>`, `flowsby/<reporter, hex>/<20 digits>`, `blobs/<name>`.
//!
//! The trait is synchronous (the embedded store needs no I/O wait): each call runs on
//! the store's own small runtime and the caller waits for it (`block_in_place` inside a
//! multi-threaded runtime, so the caller's other tasks move to another worker).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    AuditEntry, Documents, DraftStamp, PuRecord, Store, StoreError, StoredFlow, TokenRecord,
    Version, now,
};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port` of each member.
    pub endpoints: Vec<String>,
    /// TLS to etcd (`https://` endpoints): the CA that signed the members' certificates,
    /// and the console's client certificate and key for etcd's `--client-cert-auth`.
    pub tls: Option<EtcdTls>,
    /// Every key lives below it (several meshes, or tests, can share one etcd).
    pub prefix: String,
    /// How long one store call may take, retries included, before it fails.
    pub call_limit: Duration,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            tls: None,
            prefix: "/segmesh/".into(),
            call_limit: Duration::from_secs(10),
        }
    }
}

/// PEM texts for TLS to etcd.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca_pem: String,
    /// The console's client certificate and key (both or neither).
    pub identity: Option<(String, String)>,
}

/// Records appended per transaction: etcd refuses transactions of more than 128
/// operations by default, and each record is two puts.
const FLOW_CHUNK: usize = 16;
/// Deletions per trimming transaction.
const TRIM_CHUNK: usize = 40;
/// Keys per range request when reading a whole prefix.
const PAGE: i64 = 500;
/// Attempts of one transaction that keeps meeting concurrent changes.
const MAX_ATTEMPTS: usize = 200;

/// An etcd error; [`StoreError::EtcdUnavailable`] when the same request may succeed a
/// moment later (the member or the connection went away, no leader for a moment).
fn etcd_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    use tonic::Code;
    let unavailable = match &e {
        E::TransportError(_) | E::IoError(_) => true,
        E::GRpcStatus(s) => {
            matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled
            ) || (s.code() == Code::Unknown && s.message().contains("transport"))
        }
        _ => false,
    };
    let too_large = matches!(&e, E::GRpcStatus(s)
        if s.code() == Code::ResourceExhausted || s.message().contains("too large"));
    if too_large {
        StoreError::TooLarge(e.to_string())
    } else if unavailable {
        StoreError::EtcdUnavailable(e.to_string())
    } else {
        StoreError::Etcd(e.to_string())
    }
}

fn transient(e: &StoreError) -> bool {
    matches!(e, StoreError::EtcdUnavailable(_))
}

fn counter_value(v: Option<&[u8]>) -> Result<u64, StoreError> {
    match v {
        None => Ok(0),
        Some(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                StoreError::Etcd(format!("a counter holds {:?}", String::from_utf8_lossy(b)))
            }),
    }
}

fn seq_key(kind: &str, seq: u64) -> String {
    format!("{kind}/{seq:020}")
}

fn seq_of(key: &str) -> Option<u64> {
    key.rsplit('/').next()?.parse().ok()
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

type Audit = (String, String, String);

fn owned((a, b, c): (&str, &str, &str)) -> Audit {
    (a.into(), b.into(), c.into())
}

/// The client and the key prefix: cheap to clone into each call.
#[derive(Clone)]
struct Etcd {
    client: Client,
    prefix: Arc<str>,
}

impl Etcd {
    fn key(&self, k: &str) -> Vec<u8> {
        format!("{}{k}", self.prefix).into_bytes()
    }

    /// A key's value and modification revision.
    async fn get(&self, k: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let r = self
            .client
            .kv_client()
            .get(self.key(k), None)
            .await
            .map_err(etcd_err)?;
        Ok(r.kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    async fn get_json<T: DeserializeOwned>(&self, k: &str) -> Result<Option<T>, StoreError> {
        match self.get(k).await? {
            Some((v, _)) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Every key below `prefix` (without the store's prefix) with its value, in key
    /// order, read in pages; at most `limit` of them.
    async fn range(
        &self,
        prefix: &str,
        keys_only: bool,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let full = self.key(prefix);
        let mut end = full.clone();
        // The first key after every key with this prefix.
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let mut from = full;
        let mut out = Vec::new();
        let mut revision = 0;
        loop {
            let page = PAGE.min((limit - out.len()) as i64);
            let mut o = GetOptions::new().with_range(end.clone()).with_limit(page);
            if keys_only {
                o = o.with_keys_only();
            }
            // Later pages read the same revision as the first: one consistent view.
            if revision > 0 {
                o = o.with_revision(revision);
            }
            let r = self
                .client
                .kv_client()
                .get(from.clone(), Some(o))
                .await
                .map_err(etcd_err)?;
            if revision == 0 {
                revision = r.header().map_or(0, |h| h.revision());
            }
            let kvs = r.kvs();
            for kv in kvs {
                let k = String::from_utf8_lossy(&kv.key()[self.prefix.len()..]).into_owned();
                out.push((k, kv.value().to_vec()));
            }
            if !r.more() || kvs.is_empty() || out.len() >= limit {
                return Ok(out);
            }
            from = kvs.last().map(|kv| kv.key().to_vec()).unwrap_or_default();
            from.push(0);
        }
    }

    async fn range_json<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        self.range(prefix, false, usize::MAX)
            .await?
            .into_iter()
            .map(|(k, v)| Ok((k, serde_json::from_slice(&v)?)))
            .collect()
    }

    async fn count(&self, prefix: &str) -> Result<u64, StoreError> {
        let r = self
            .client
            .kv_client()
            .get(
                self.key(prefix),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(etcd_err)?;
        Ok(r.count().max(0) as u64)
    }
}

/// The member this store talks to: one at a time, the next after an error that says the
/// member or its connection is gone. (etcd-client's balanced channel over every endpoint
/// keeps sending a share of the requests to a dead member: with one of three members
/// killed, store calls took seconds in a row.)
struct Members {
    endpoints: Vec<String>,
    options: ConnectOptions,
    prefix: Arc<str>,
    current: std::sync::Mutex<(usize, Etcd)>,
}

impl Members {
    /// A client of one member (connecting is lazy).
    async fn client_of(&self, i: usize) -> Result<Etcd, StoreError> {
        let c = Client::connect([&self.endpoints[i]], Some(self.options.clone()))
            .await
            .map_err(etcd_err)?;
        Ok(Etcd {
            client: c,
            prefix: self.prefix.clone(),
        })
    }

    fn get(&self) -> (usize, Etcd) {
        let g = self.current.lock().expect("lock poisoned");
        (g.0, g.1.clone())
    }

    /// After a failure on member `from`: the next one, unless another call moved on
    /// already.
    async fn move_on(&self, from: usize) {
        if self.endpoints.len() < 2 || self.get().0 != from {
            return;
        }
        let next = (from + 1) % self.endpoints.len();
        match self.client_of(next).await {
            Ok(e) => {
                let mut g = self.current.lock().expect("lock poisoned");
                if g.0 == from {
                    tracing::info!(from = %self.endpoints[from], to = %self.endpoints[next], "etcd member unavailable; using the next");
                    *g = (next, e);
                }
            }
            Err(err) => {
                tracing::warn!(endpoint = %self.endpoints[next], error = %err, "cannot set up an etcd client")
            }
        }
    }
}

/// One optimistic transaction: what it read is compared at commit, what it writes is
/// applied only then.
struct Stm<'a> {
    e: &'a Etcd,
    compares: Vec<Compare>,
    ops: Vec<TxnOp>,
}

impl<'a> Stm<'a> {
    fn new(e: &'a Etcd) -> Stm<'a> {
        Stm {
            e,
            compares: Vec::new(),
            ops: Vec::new(),
        }
    }

    async fn read(&mut self, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let got = self.e.get(k).await?;
        // A key that does not exist compares as modification revision 0.
        let rev = got.as_ref().map_or(0, |(_, r)| *r);
        self.compares
            .push(Compare::mod_revision(self.e.key(k), CompareOp::Equal, rev));
        Ok(got.map(|(v, _)| v))
    }

    async fn read_json<T: DeserializeOwned>(&mut self, k: &str) -> Result<Option<T>, StoreError> {
        match self.read(k).await? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    async fn counter(&mut self, k: &str) -> Result<u64, StoreError> {
        counter_value(self.read(k).await?.as_deref())
    }

    /// The key must not have changed after `revision`.
    fn unchanged_since(&mut self, k: &str, revision: i64) {
        self.compares.push(Compare::mod_revision(
            self.e.key(k),
            CompareOp::Less,
            revision + 1,
        ));
    }

    fn put(&mut self, k: &str, v: impl Into<Vec<u8>>) {
        self.ops.push(TxnOp::put(self.e.key(k), v, None));
    }

    fn put_json<T: Serialize>(&mut self, k: &str, v: &T) -> Result<(), StoreError> {
        self.put(k, serde_json::to_vec(v)?);
        Ok(())
    }

    fn delete(&mut self, k: &str) {
        self.ops.push(TxnOp::delete(self.e.key(k), None));
    }

    /// Adds one to counter `k`; the new value.
    async fn count_up(&mut self, k: &str) -> Result<u64, StoreError> {
        let n = self.counter(k).await? + 1;
        self.put(k, n.to_string());
        Ok(n)
    }

    async fn bump(&mut self) -> Result<(), StoreError> {
        self.count_up("meta/revision").await.map(|_| ())
    }

    async fn audit(&mut self, (who, action, detail): &Audit) -> Result<(), StoreError> {
        let seq = self.count_up("meta/audit").await?;
        let e = AuditEntry {
            seq,
            time: now(),
            who: who.clone(),
            action: action.clone(),
            detail: detail.clone(),
        };
        self.put_json(&seq_key("audit", seq), &e)
    }

    /// Applies the writes if nothing read changed; false if something did.
    async fn commit(self) -> Result<bool, StoreError> {
        let r = self
            .e
            .client
            .kv_client()
            .txn(Txn::new().when(self.compares).and_then(self.ops))
            .await
            .map_err(etcd_err)?;
        Ok(r.succeeded())
    }
}

/// Runs `body` until its transaction applies (it returns `Some`) or the attempts run out.
macro_rules! optimistic {
    ($body:expr) => {{
        let mut attempts = 0;
        loop {
            if let Some(done) = $body {
                break Ok(done);
            }
            attempts += 1;
            if attempts >= MAX_ATTEMPTS {
                break Err(StoreError::Etcd(format!(
                    "gave up after {MAX_ATTEMPTS} attempts: the keys kept changing under concurrent writers"
                )));
            }
        }
    }};
}

/// The etcd backend of [`Store`].
pub struct EtcdStore {
    members: Arc<Members>,
    call_limit: Duration,
    /// Its own runtime (the trait is synchronous); shut down in the background on drop,
    /// which is allowed inside another runtime.
    rt: Option<tokio::runtime::Runtime>,
    revision: tokio::sync::watch::Receiver<u64>,
    /// The etcd lease behind each PU's lease key, as this replica last granted it:
    /// renewed with a keep-alive (no write) while it lives and its key is there.
    lease_ids: Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
}

impl EtcdStore {
    /// Connects to etcd (it must answer within the call limit) and starts following the
    /// revision key.
    pub fn connect(opts: &EtcdOptions) -> Result<EtcdStore, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Etcd("no etcd endpoint given".into()));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("segmesh-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Etcd(format!("a runtime for the etcd client: {e}")))?;
        let endpoints = opts.endpoints.clone();
        let limit = opts.call_limit;
        let tls_wanted = opts.tls.is_some();
        if endpoints
            .iter()
            .any(|e| e.starts_with("https://") != tls_wanted)
        {
            return Err(StoreError::Etcd(if tls_wanted {
                "with an etcd CA, every endpoint is https://".into()
            } else {
                "https:// etcd endpoints need the CA that signed them (--etcd-ca)".into()
            }));
        }
        let tls = opts.tls.clone().map(|t| {
            let mut o = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(t.ca_pem));
            if let Some((cert, key)) = t.identity {
                o = o.identity(etcd_client::Identity::from_pem(cert, key));
            }
            o
        });
        let mut o = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            // One request gives up well within the call's limit, so that a member that
            // stalls (open connections, no answers) is left for the next one while the
            // call can still succeed there.
            .with_timeout((limit / 4).max(Duration::from_secs(1)))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            // A member cut off from the others fails requests and watches at once
            // instead of serving stale reads or a silent watch.
            .with_require_leader(true);
        if let Some(t) = tls {
            o = o.with_tls(t);
        }
        let prefix: Arc<str> = opts.prefix.clone().into();
        let members = wait_on(
            &rt,
            async move {
                // The first member that answers.
                let mut errors = Vec::new();
                for (i, ep) in endpoints.iter().enumerate() {
                    let c = match Client::connect([ep], Some(o.clone())).await {
                        Ok(c) => c,
                        Err(err) => {
                            errors.push(format!("{ep}: {err}"));
                            continue;
                        }
                    };
                    // Connecting is lazy: ask once so that a wrong endpoint fails here.
                    match c
                        .kv_client()
                        .get("/", Some(GetOptions::new().with_count_only()))
                        .await
                    {
                        Ok(_) => {
                            return Ok(Members {
                                endpoints: endpoints.clone(),
                                options: o,
                                current: std::sync::Mutex::new((
                                    i,
                                    Etcd {
                                        client: c,
                                        prefix: prefix.clone(),
                                    },
                                )),
                                prefix,
                            });
                        }
                        Err(err) => errors.push(format!("{ep}: {err}")),
                    }
                }
                Err(StoreError::Etcd(format!(
                    "no etcd member answered: {}",
                    errors.join("; ")
                )))
            },
            limit * opts.endpoints.len().max(1) as u32,
        )
        .map_err(|e| StoreError::Etcd(format!("{} ({})", e, opts.endpoints.join(", "))))?;
        let members = Arc::new(members);
        let (tx, rx) = tokio::sync::watch::channel(0);
        rt.spawn(follow(members.clone(), tx));
        Ok(EtcdStore {
            members,
            call_limit: opts.call_limit,
            rt: Some(rt),
            revision: rx,
            lease_ids: Default::default(),
        })
    }

    /// Runs one store operation on the store's runtime, trying again on transient errors
    /// (a member gone, no leader for a moment) until the call limit.
    fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(Etcd) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send,
    {
        let members = self.members.clone();
        let limit = self.call_limit;
        let rt = self.rt.as_ref().expect("runtime lives until drop");
        wait_on(
            rt,
            async move {
                let deadline = Instant::now() + limit;
                let mut pause = Duration::ZERO;
                loop {
                    let (i, e) = members.get();
                    match op(e).await {
                        Err(err) if transient(&err) && Instant::now() + pause < deadline => {
                            tracing::debug!(error = %err, "etcd call failed; trying again");
                            members.move_on(i).await;
                            // At once on the next member; paced once every member failed.
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2)
                                .clamp(Duration::from_millis(10), Duration::from_millis(500));
                        }
                        other => return other,
                    }
                }
            },
            limit + Duration::from_secs(1),
        )
    }

    /// A shared value written once (`create_blob`), e.g. the CA, encrypted by the caller.
    pub fn blob(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let k = format!("blobs/{name}");
        self.run(move |e| {
            let k = k.clone();
            async move { Ok(e.get(&k).await?.map(|(v, _)| v)) }
        })
    }

    /// Writes `name` unless it exists; whether this call wrote it (of replicas starting
    /// together, exactly one does).
    pub fn create_blob(&self, name: &str, value: &[u8]) -> Result<bool, StoreError> {
        let k = format!("blobs/{name}");
        let v = value.to_vec();
        self.run(move |e| {
            let (k, v) = (k.clone(), v.clone());
            async move {
                let key = e.key(&k);
                let r = e
                    .client
                    .kv_client()
                    .txn(
                        Txn::new()
                            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                            .and_then([TxnOp::put(key, v, None)]),
                    )
                    .await
                    .map_err(etcd_err)?;
                Ok(r.succeeded())
            }
        })
    }

    async fn add_chunk(e: &Etcd, chunk: &[StoredFlow]) -> Result<(), StoreError> {
        optimistic!({
            let mut t = Stm::new(e);
            let last = t.counter("meta/flow").await?;
            let stored = t.counter("meta/flows").await?;
            for (seq, f) in (last + 1..).zip(chunk) {
                t.put_json(&seq_key("flows", seq), f)?;
                t.put(&seq_key(&format!("flowsby/{}", hex(&f.reporter)), seq), "");
            }
            t.put("meta/flow", (last + chunk.len() as u64).to_string());
            t.put("meta/flows", (stored + chunk.len() as u64).to_string());
            t.commit().await?.then_some(())
        })
    }

    /// Deletes the oldest records beyond `per_reporter` of each of `reporters` and
    /// beyond `keep` in all, a bounded number per transaction.
    async fn trim(
        e: &Etcd,
        reporters: &[String],
        keep: usize,
        per_reporter: usize,
    ) -> Result<(), StoreError> {
        loop {
            let done: bool = optimistic!({
                let mut t = Stm::new(e);
                let stored = t.counter("meta/flows").await?;
                let mut gone: BTreeMap<u64, String> = BTreeMap::new();
                for r in reporters {
                    let prefix = format!("flowsby/{}/", hex(r));
                    let mine = e.count(&prefix).await? as usize;
                    let excess = mine.saturating_sub(per_reporter).min(TRIM_CHUNK);
                    if excess > 0 {
                        for (k, _) in e.range(&prefix, true, excess).await? {
                            if let Some(seq) = seq_of(&k) {
                                gone.insert(seq, r.clone());
                            }
                        }
                    }
                }
                // Everyone's oldest beyond the total (those just chosen count as gone).
                let total_excess = (stored as usize)
                    .saturating_sub(keep)
                    .saturating_sub(gone.len())
                    .min(TRIM_CHUNK);
                if total_excess > 0 {
                    let mut taken = 0;
                    for (k, v) in e.range("flows/", false, total_excess + gone.len()).await? {
                        let Some(seq) = seq_of(&k) else { continue };
                        if taken == total_excess || gone.contains_key(&seq) {
                            continue;
                        }
                        let f: StoredFlow = serde_json::from_slice(&v)?;
                        gone.insert(seq, f.reporter);
                        taken += 1;
                    }
                }
                if gone.is_empty() {
                    Some(true)
                } else {
                    for (seq, r) in &gone {
                        t.delete(&seq_key("flows", *seq));
                        t.delete(&seq_key(&format!("flowsby/{}", hex(r)), *seq));
                    }
                    t.put(
                        "meta/flows",
                        stored.saturating_sub(gone.len() as u64).to_string(),
                    );
                    t.commit().await?.then_some(false)
                }
            })?;
            if done {
                return Ok(());
            }
        }
    }
}

/// Runs `f` on `rt` and waits for it, within `limit`.
fn wait_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    limit: Duration,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let r = tokio::time::timeout(limit, f).await.unwrap_or_else(|_| {
            Err(StoreError::EtcdUnavailable(format!(
                "no answer within {limit:?}"
            )))
        });
        let _ = tx.send(r);
    });
    let wait = move || {
        rx.recv()
            .unwrap_or_else(|_| Err(StoreError::Etcd("the etcd client stopped".into())))
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// Follows `meta/revision` with etcd's watch (and reads it afresh after every broken
/// watch), publishing each value.
async fn follow(members: Arc<Members>, tx: tokio::sync::watch::Sender<u64>) {
    let mut pause = Duration::from_millis(100);
    loop {
        if tx.is_closed() {
            return;
        }
        let (i, e) = members.get();
        let key = e.key("meta/revision");
        let read = async {
            // Read first, then watch from just after the read: nothing falls between.
            let r = e.client.kv_client().get(key.clone(), None).await?;
            let at = r.header().map_or(0, |h| h.revision());
            if let Some(kv) = r.kvs().first() {
                if let Ok(v) = counter_value(Some(kv.value())) {
                    tx.send_if_modified(|cur| std::mem::replace(cur, v) != v);
                }
            }
            let mut stream = e
                .client
                .watch_client()
                .watch(
                    key.clone(),
                    Some(WatchOptions::new().with_start_revision(at + 1)),
                )
                .await?;
            while let Some(msg) = stream.message().await? {
                if msg.canceled() {
                    break;
                }
                for ev in msg.events() {
                    if let Some(kv) = ev.kv() {
                        if let Ok(v) = counter_value(Some(kv.value())) {
                            tx.send_if_modified(|cur| std::mem::replace(cur, v) != v);
                        }
                    }
                }
            }
            Ok::<(), etcd_client::Error>(())
        };
        match read.await {
            Ok(()) => pause = Duration::from_millis(100),
            Err(err) => {
                tracing::warn!(error = %err, "etcd watch of the revision broke; following again");
                members.move_on(i).await;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Store for EtcdStore {
    fn draft(&self) -> Result<Option<Documents>, StoreError> {
        self.run(|e| async move { e.get_json("draft").await })
    }

    fn draft_base(&self) -> Result<(Documents, DraftStamp), StoreError> {
        self.run(|e| async move {
            // The draft and the last version in one read, at one revision: the stamp.
            let r = e
                .client
                .kv_client()
                .txn(Txn::new().and_then([
                    TxnOp::get(e.key("draft"), None),
                    TxnOp::get(e.key("meta/version"), None),
                ]))
                .await
                .map_err(etcd_err)?;
            let stamp = r.header().map_or(0, |h| h.revision());
            let mut got = r.op_responses().into_iter().map(|o| match o {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            let (draft, version) = (got.next().flatten(), got.next().flatten());
            let docs = if let Some(d) = draft {
                serde_json::from_slice(&d)?
            } else {
                match counter_value(version.as_deref())? {
                    0 => Documents::default(),
                    n => {
                        e.get_json::<Version>(&seq_key("versions", n))
                            .await?
                            .ok_or(StoreError::NoSuchVersion(n))?
                            .documents
                    }
                }
            };
            Ok((docs, DraftStamp(stamp.max(0) as u64)))
        })
    }

    fn set_draft(
        &self,
        docs: &Documents,
        since: DraftStamp,
        audit: (&str, &str, &str),
    ) -> Result<(), StoreError> {
        let docs = serde_json::to_vec(docs)?;
        let audit = owned(audit);
        self.run(move |e| {
            let (docs, audit) = (docs.clone(), audit.clone());
            async move {
                optimistic!({
                    let mut t = Stm::new(&e);
                    let at = since.0 as i64;
                    // Refused whole when the draft or the live version moved since.
                    for k in ["draft", "meta/version"] {
                        if e.get(k).await?.is_some_and(|(_, r)| r > at) {
                            return Err(StoreError::Conflict);
                        }
                        t.unchanged_since(k, at);
                    }
                    t.put("draft", docs.clone());
                    t.audit(&audit).await?;
                    t.commit().await?.then_some(())
                })
            }
        })
    }

    fn commit(&self, audit: (&str, &str, &str)) -> Result<u64, StoreError> {
        let audit = owned(audit);
        self.run(move |e| {
            let audit = audit.clone();
            async move {
                optimistic!({
                    let mut t = Stm::new(&e);
                    let Some(draft) = t.read_json::<Documents>("draft").await? else {
                        return Err(StoreError::NoDraft);
                    };
                    let next = t.count_up("meta/version").await?;
                    let v = Version {
                        version: next,
                        committed_at: now(),
                        by: audit.0.clone(),
                        how: "commit".into(),
                        documents: draft,
                    };
                    t.put_json(&seq_key("versions", next), &v)?;
                    t.delete("draft");
                    t.bump().await?;
                    t.audit(&audit).await?;
                    t.commit().await?.then_some(next)
                })
            }
        })
    }

    fn rollback(&self, to: u64, audit: (&str, &str, &str)) -> Result<u64, StoreError> {
        let audit = owned(audit);
        self.run(move |e| {
            let audit = audit.clone();
            async move {
                // Published versions never change: read outside the transaction.
                let old: Version = e
                    .get_json(&seq_key("versions", to))
                    .await?
                    .ok_or(StoreError::NoSuchVersion(to))?;
                optimistic!({
                    let mut t = Stm::new(&e);
                    let next = t.count_up("meta/version").await?;
                    let v = Version {
                        version: next,
                        committed_at: now(),
                        by: audit.0.clone(),
                        how: format!("rollback to {to}"),
                        documents: old.documents.clone(),
                    };
                    t.put_json(&seq_key("versions", next), &v)?;
                    t.bump().await?;
                    t.audit(&audit).await?;
                    t.commit().await?.then_some(next)
                })
            }
        })
    }

    fn live(&self) -> Result<Option<Version>, StoreError> {
        self.run(|e| async move {
            match counter_value(e.get("meta/version").await?.map(|(v, _)| v).as_deref())? {
                0 => Ok(None),
                n => e.get_json(&seq_key("versions", n)).await,
            }
        })
    }

    fn version(&self, v: u64) -> Result<Option<Version>, StoreError> {
        self.run(move |e| async move { e.get_json(&seq_key("versions", v)).await })
    }

    fn put_token(
        &self,
        hash: &str,
        token: &TokenRecord,
        audit: (&str, &str, &str),
    ) -> Result<(), StoreError> {
        let k = format!("tokens/{hash}");
        let token = serde_json::to_vec(token)?;
        let audit = owned(audit);
        self.run(move |e| {
            let (k, token, audit) = (k.clone(), token.clone(), audit.clone());
            async move {
                optimistic!({
                    let mut t = Stm::new(&e);
                    t.put(&k, token.clone());
                    t.audit(&audit).await?;
                    t.commit().await?.then_some(())
                })
            }
        })
    }

    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let k = format!("tokens/{hash}");
        self.run(move |e| {
            let k = k.clone();
            async move { e.get_json(&k).await }
        })
    }

    fn tokens(&self) -> Result<Vec<(String, TokenRecord)>, StoreError> {
        self.run(|e| async move {
            Ok(e.range_json::<TokenRecord>("tokens/")
                .await?
                .into_iter()
                .map(|(k, t)| (k["tokens/".len()..].to_owned(), t))
                .collect())
        })
    }

    fn delete_token(&self, hash: &str, audit: (&str, &str, &str)) -> Result<bool, StoreError> {
        let k = format!("tokens/{hash}");
        let audit = owned(audit);
        self.run(move |e| {
            let (k, audit) = (k.clone(), audit.clone());
            async move {
                optimistic!({
                    let mut t = Stm::new(&e);
                    if t.read(&k).await?.is_none() {
                        break Ok(false);
                    }
                    t.delete(&k);
                    t.audit(&audit).await?;
                    t.commit().await?.then_some(true)
                })
            }
        })
    }

    fn audit_log(&self) -> Result<Vec<AuditEntry>, StoreError> {
        self.run(|e| async move {
            Ok(e.range_json::<AuditEntry>("audit/")
                .await?
                .into_iter()
                .map(|(_, a)| a)
                .collect())
        })
    }

    fn put_pu(&self, pu: &PuRecord, audit: (&str, &str, &str)) -> Result<(), StoreError> {
        let pu = pu.clone();
        let audit = owned(audit);
        self.run(move |e| {
            let (pu, audit) = (pu.clone(), audit.clone());
            async move {
                let k = format!("pus/{}:{}", pu.namespace, pu.name);
                optimistic!({
                    let mut t = Stm::new(&e);
                    let old: Option<PuRecord> = t.read_json(&k).await?;
                    t.put_json(&k, &pu)?;
                    // As on redb: a renewal that changes nothing enforcers see is no news.
                    if old.is_none_or(|o| o.ips != pu.ips || o.tags != pu.tags) {
                        t.bump().await?;
                    }
                    t.audit(&audit).await?;
                    t.commit().await?.then_some(())
                })
            }
        })
    }

    fn pus(&self) -> Result<Vec<PuRecord>, StoreError> {
        self.run(|e| async move {
            Ok(e.range_json::<PuRecord>("pus/")
                .await?
                .into_iter()
                .map(|(_, p)| p)
                .collect())
        })
    }

    fn pu(&self, namespace: &str, name: &str) -> Result<Option<PuRecord>, StoreError> {
        let k = format!("pus/{namespace}:{name}");
        self.run(move |e| {
            let k = k.clone();
            async move { e.get_json(&k).await }
        })
    }

    fn delete_pu(
        &self,
        namespace: &str,
        name: &str,
        audit: (&str, &str, &str),
    ) -> Result<bool, StoreError> {
        let id = format!("{namespace}:{name}");
        let audit = owned(audit);
        self.run(move |e| {
            let (id, audit) = (id.clone(), audit.clone());
            async move {
                optimistic!({
                    let mut t = Stm::new(&e);
                    let k = format!("pus/{id}");
                    if t.read(&k).await?.is_none() {
                        break Ok(false);
                    }
                    t.delete(&k);
                    t.delete(&format!("leases/{id}"));
                    t.bump().await?;
                    t.audit(&audit).await?;
                    t.commit().await?.then_some(true)
                })
            }
        })
    }

    fn revision(&self) -> Result<u64, StoreError> {
        self.run(|e| async move {
            counter_value(e.get("meta/revision").await?.map(|(v, _)| v).as_deref())
        })
    }

    fn add_flows(
        &self,
        flows: &[StoredFlow],
        keep: usize,
        per_reporter: usize,
    ) -> Result<(), StoreError> {
        let flows: Vec<StoredFlow> = flows.to_vec();
        self.run(move |e| {
            let flows = flows.clone();
            async move {
                // Each chunk is appended whole; the bounds are restored right after
                // (a reader in between may see a few records past them).
                for chunk in flows.chunks(FLOW_CHUNK) {
                    Self::add_chunk(&e, chunk).await?;
                    let mut reporters: Vec<String> =
                        chunk.iter().map(|f| f.reporter.clone()).collect();
                    reporters.sort_unstable();
                    reporters.dedup();
                    Self::trim(&e, &reporters, keep, per_reporter).await?;
                }
                Ok(())
            }
        })
    }

    fn flows(&self) -> Result<Vec<StoredFlow>, StoreError> {
        self.run(|e| async move {
            e.range_json::<StoredFlow>("flows/")
                .await?
                .into_iter()
                .map(|(k, mut f)| {
                    f.seq = seq_of(&k).unwrap_or(0);
                    Ok(f)
                })
                .collect()
        })
    }

    fn renew_lease(&self, namespace: &str, name: &str, ttl: Duration) -> Result<(), StoreError> {
        let k = format!("leases/{namespace}:{name}");
        let secs = ttl.as_secs().max(1) as i64;
        let ids = self.lease_ids.clone();
        self.run(move |e| {
            let (k, ids) = (k.clone(), ids.clone());
            async move {
                let known = ids.lock().expect("lock poisoned").get(&k).copied();
                if let Some(id) = known {
                    // Alive, and its key still there (a deleted PU's key is gone)?
                    let kept = e.client.lease_client().keep_alive(id).await.is_ok();
                    if kept && e.count(&k).await? == 1 {
                        return Ok(());
                    }
                }
                let lease = e
                    .client
                    .lease_client()
                    .grant(secs, None)
                    .await
                    .map_err(etcd_err)?;
                e.client
                    .kv_client()
                    .put(
                        e.key(&k),
                        "",
                        Some(PutOptions::new().with_lease(lease.id())),
                    )
                    .await
                    .map_err(etcd_err)?;
                ids.lock().expect("lock poisoned").insert(k, lease.id());
                Ok(())
            }
        })
    }

    fn leases(&self) -> Result<Option<HashSet<String>>, StoreError> {
        self.run(|e| async move {
            Ok(Some(
                e.range("leases/", true, usize::MAX)
                    .await?
                    .into_iter()
                    .map(|(k, _)| k["leases/".len()..].to_owned())
                    .collect(),
            ))
        })
    }

    fn follow_revision(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.revision.clone())
    }
}
