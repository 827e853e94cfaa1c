//! The console's operations on its store: validated, authorized, audited.
//!
//! `apply` validates every submitted file together (a bad document rejects the whole
//! apply with file:line:col, and nothing is written), checks the caller may edit every
//! namespace the documents live in, and merges them into the draft by identity
//! (kind, namespace, name). `commit` publishes the draft atomically as the next version;
//! `rollback` republishes an earlier one. Tokens are stored as SHA-256 hashes.

use std::collections::BTreeSet;

use segmesh_identity::{Ca, SpiffeId};
use segmesh_policy::{LoadError, NamespacePath, PolicySet, Source, Tag, TagPattern, TagSet};

use crate::store::{
    Documents, PuRecord, Role, Store, StoreError, StoredFlow, TokenRecord, Version,
};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid documents; nothing was applied:\n{0}")]
    Invalid(LoadError),
    /// The documents are valid alone but conflict with the draft's.
    #[error("nothing was applied: {0}")]
    Conflict(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("unknown or missing API token")]
    Unauthenticated,
    #[error("no {kind} {name} in namespace {namespace} in the draft")]
    NotFound {
        kind: String,
        namespace: String,
        name: String,
    },
    #[error("bad namespace: {0}")]
    Namespace(#[from] segmesh_policy::namespace::NamespaceError),
    /// A renewal for a PU that was deleted: the enforcer must stop renewing.
    #[error("{0}")]
    Gone(String),
}

/// Services as enforcers need them: each with its endpoints resolved against the
/// registered PUs (by their certified tags for a selector, by address for a list), in a
/// stable order (PUs by namespace and name; listed addresses as listed).
fn services_of<'a>(
    services: impl Iterator<Item = &'a segmesh_policy::Service>,
    pus: &[PuRecord],
) -> Vec<segmesh_api::ServiceEntry> {
    let mut sorted: Vec<&PuRecord> = pus.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let qualified = |p: &PuRecord| format!("{}:{}", p.namespace, p.name);
    services
        .map(|s| {
            let endpoints = match &s.endpoints {
                segmesh_policy::Endpoints::Selector(_) => sorted
                    .iter()
                    .filter(|p| {
                        let tags: TagSet = p.tags.iter().filter_map(|t| t.parse().ok()).collect();
                        p.namespace
                            .parse::<NamespacePath>()
                            .is_ok_and(|ns| s.selects(&ns, &tags))
                    })
                    // One address per PU: the tunnel reaches it at any of them.
                    .filter_map(|p| {
                        Some(segmesh_api::ServiceEndpoint {
                            ip: *p.ips.first()?,
                            pu: Some(qualified(p)),
                        })
                    })
                    .collect(),
                segmesh_policy::Endpoints::Addresses(ips) => ips
                    .iter()
                    .map(|ip| segmesh_api::ServiceEndpoint {
                        ip: *ip,
                        pu: sorted
                            .iter()
                            .find(|p| p.ips.iter().any(|a| a.to_canonical() == *ip))
                            .map(|p| qualified(p)),
                    })
                    .collect(),
            };
            segmesh_api::ServiceEntry {
                name: s.qualified_name(),
                addresses: s.addresses.clone(),
                ports: s.ports.clone(),
                endpoints,
            }
        })
        .collect()
}

/// Who is calling, from their token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    pub namespace: NamespacePath,
}

/// What an apply changed in the draft.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Changes {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    pub removed: Vec<String>,
}

/// SHA-256 of a token, hex.
pub fn hash_token(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn new_token() -> String {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system RNG works");
    format!(
        "smt_{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

fn key(ns: &NamespacePath, name: &str) -> String {
    format!("{ns}:{name}")
}

/// The documents' content, without where they were read from.
/// One document of `docs` by kind and key, comparable.
fn document(docs: &Documents, kind: &str, k: &str) -> Option<serde_json::Value> {
    let v = match kind {
        "NetworkPolicy" => docs.policies.get(k).map(serde_json::to_value),
        "ExternalNetwork" => docs.externals.get(k).map(serde_json::to_value),
        "Namespace" => docs.namespaces.get(k).map(serde_json::to_value),
        "Service" => docs.services.get(k).map(serde_json::to_value),
        _ => None,
    };
    v.and_then(Result::ok)
}

fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
    let strip = |v: &T| {
        let mut j = serde_json::to_value(v).unwrap_or_default();
        if let Some(o) = j.as_object_mut() {
            o.remove("origin");
        }
        j
    };
    strip(a) == strip(b)
}

/// Default lifetime of the certificates the console issues to enforcers (renewed at
/// 2/3).
pub const CERT_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// What an enforcer sends to register.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Registration {
    pub name: String,
    pub namespace: String,
    /// The tags the enforcer claims for its PU.
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
    /// PEM certificate signing request (the key stays with the enforcer).
    pub csr: String,
    /// A renewal of a registered PU: refused (410) when the PU was deleted, so deleting
    /// a PU stops its renewals. A first registration (false) records the PU anew.
    #[serde(default)]
    pub renew: bool,
}

/// What the console answers a registration (the wire type of `segmesh-api`).
pub use segmesh_api::Issued;

/// How many flow records the console keeps (the oldest go first).
pub const FLOWS_KEPT: usize = 200_000;
/// Flow records kept of any one reporting PU.
pub const FLOWS_KEPT_PER_PU: usize = 20_000;

/// Which flow records to show.
#[derive(Debug, Clone, Default)]
pub struct FlowFilter {
    /// `<namespace>:<name>` or a bare name; matches either end.
    pub pu: Option<String>,
    /// `allow` or `reject`.
    pub verdict: Option<String>,
    /// Only records of flows that started this recently.
    pub since: Option<std::time::Duration>,
    /// Only the last N matching records.
    pub limit: Option<usize>,
    /// Only records stored before this one (`seq`): the next older page.
    pub before: Option<u64>,
}

pub struct Console<S: Store> {
    pub store: S,
    /// Lifetime of the certificates issued to enforcers.
    pub cert_ttl: std::time::Duration,
    /// The Kubernetes cluster as the console follows it (empty when it does not).
    pub cluster: std::sync::Arc<crate::cluster::Cluster>,
    /// How long a PU stays registered without renewing its lease (its enforcer's
    /// snapshot watch and renewals renew it).
    pub lease: std::time::Duration,
    /// When each PU's lease was last renewed through this console (with the embedded
    /// store, the only record: after a restart every registered PU starts with a fresh
    /// lease).
    leases: std::sync::Mutex<std::collections::HashMap<(String, String), std::time::Instant>>,
    /// When this console last renewed each PU's lease in a store that keeps leases
    /// (etcd: its replicas share them); renewed there at most every quarter lease.
    renewed_in_store:
        std::sync::Mutex<std::collections::HashMap<(String, String), std::time::Instant>>,
    /// With a store that keeps leases, PUs get one lease of grace after this console
    /// starts (their enforcers may have waited for a console).
    started: std::time::Instant,
    /// The live documents and the registry as read for the last snapshot, with the
    /// revision read just before: watchers woken by one commit share one read of the
    /// store (on etcd, two requests instead of two per watcher).
    snapshot_state: std::sync::Mutex<Option<SnapshotState>>,
}

/// What snapshots are cut from, at one revision.
struct SnapshotState {
    revision: u64,
    version: u64,
    docs: std::sync::Arc<Documents>,
    pus: std::sync::Arc<Vec<crate::store::PuRecord>>,
}

/// Which PUs hold a lease, read once for a sweep or a registration.
struct LeaseView {
    /// From a store that keeps leases; `None` with the embedded store.
    shared: Option<std::collections::HashSet<String>>,
}

/// Default PU lease: three of the enforcers' 30 s snapshot watches.
pub const PU_LEASE: std::time::Duration = std::time::Duration::from_secs(90);

impl Caller {
    fn can_edit(&self, ns: &NamespacePath) -> bool {
        self.role == Role::Editor && self.namespace.is_ancestor_or_self(ns)
    }

    fn can_view(&self, ns: &NamespacePath) -> bool {
        self.namespace.is_ancestor_or_self(ns)
    }
}

impl<S: Store> Console<S> {
    pub fn new(store: S) -> Self {
        Console {
            store,
            cert_ttl: CERT_TTL,
            cluster: Default::default(),
            lease: PU_LEASE,
            leases: Default::default(),
            renewed_in_store: Default::default(),
            started: std::time::Instant::now(),
            snapshot_state: Default::default(),
        }
    }

    /// Renews `namespace:name`'s lease (here, and in a store that keeps leases at most
    /// every quarter lease).
    pub fn touch(&self, namespace: &str, name: &str) {
        let id = (namespace.to_owned(), name.to_owned());
        let now = std::time::Instant::now();
        self.leases
            .lock()
            .expect("lock poisoned")
            .insert(id.clone(), now);
        let due = self
            .renewed_in_store
            .lock()
            .expect("lock poisoned")
            .get(&id)
            .is_none_or(|at| at.elapsed() >= self.lease / 4);
        if due {
            match self.store.renew_lease(namespace, name, self.lease) {
                Ok(()) => {
                    self.renewed_in_store
                        .lock()
                        .expect("lock poisoned")
                        .insert(id, now);
                }
                Err(e) => {
                    tracing::warn!(pu = %format!("{namespace}:{name}"), error = %e, "cannot renew the lease in the store")
                }
            }
        }
    }

    fn lease_view(&self) -> Result<LeaseView, ConsoleError> {
        Ok(LeaseView {
            shared: self.store.leases()?,
        })
    }

    /// Whether a registered PU's lease runs: renewed here within the lease, or (a store
    /// that keeps leases) held in the store, or this console started less than a lease
    /// ago; with the embedded store, one never seen since the console started gets a
    /// fresh one.
    fn leased(&self, view: &LeaseView, namespace: &str, name: &str) -> bool {
        let mut l = self.leases.lock().expect("lock poisoned");
        let id = (namespace.to_owned(), name.to_owned());
        match &view.shared {
            None => {
                let at = l.entry(id).or_insert_with(std::time::Instant::now);
                at.elapsed() < self.lease
            }
            Some(held) => {
                l.get(&id).is_some_and(|at| at.elapsed() < self.lease)
                    || held.contains(&format!("{namespace}:{name}"))
                    || self.started.elapsed() < self.lease
            }
        }
    }

    /// Removes the PUs whose lease lapsed (Kubernetes reuses pod addresses); their
    /// names. Enforcers drop them with the next snapshot.
    pub fn expire_leases(&self) -> Result<Vec<String>, ConsoleError> {
        let mut gone = Vec::new();
        let view = self.lease_view()?;
        for p in self.store.pus()? {
            if !self.leased(&view, &p.namespace, &p.name)
                && self
                    .store
                    .delete_pu(&p.namespace, &p.name, ("console", "lease", "lapsed"))?
            {
                self.leases
                    .lock()
                    .expect("lock poisoned")
                    .remove(&(p.namespace.clone(), p.name.clone()));
                gone.push(format!("{}:{}", p.namespace, p.name));
            }
        }
        Ok(gone)
    }

    /// The addresses a registration or renewal of `namespace:name` claims, canonical
    /// (v4-mapped v6 as v4), if no other live PU holds any of them; with `source` (the
    /// registering connection's address), it must be one of them unless `any_source`.
    fn claimable(
        &self,
        namespace: &str,
        name: &str,
        ips: &[std::net::IpAddr],
        source: Option<std::net::IpAddr>,
        any_source: bool,
        view: &LeaseView,
    ) -> Result<Vec<std::net::IpAddr>, ConsoleError> {
        let mut claimed: Vec<std::net::IpAddr> = ips.iter().map(|ip| ip.to_canonical()).collect();
        claimed.sort();
        claimed.dedup();
        if let Some(src) = source.map(|s| s.to_canonical()) {
            if !any_source && !claimed.contains(&src) {
                return Err(ConsoleError::Forbidden(format!(
                    "a PU registers from one of its own addresses: {src} is not among {claimed:?} (a token created with --any-source allows it)"
                )));
            }
        }
        for other in self.store.pus()? {
            if other.namespace == namespace && other.name == name {
                continue;
            }
            if let Some(ip) = other
                .ips
                .iter()
                .map(|i| i.to_canonical())
                .find(|i| claimed.contains(i))
            {
                if self.leased(view, &other.namespace, &other.name) {
                    return Err(ConsoleError::Conflict(format!(
                        "{ip} belongs to the live PU {}:{}",
                        other.namespace, other.name
                    )));
                }
                // Lapsed: it leaves the registry now rather than at the next sweep, so
                // that no enforcer sees the address claimed twice meanwhile.
                self.store.delete_pu(
                    &other.namespace,
                    &other.name,
                    ("console", "lease", "lapsed; its address is claimed again"),
                )?;
            }
        }
        Ok(claimed)
    }

    /// What enforcers watch: the store's revision plus the cluster's changes (both only
    /// grow, so their sum moves whenever either does).
    ///
    /// A store that follows other replicas' changes (etcd) answers from its watch
    /// without a request: it may trail the store by a watch event's delivery, which
    /// only delays a wake-up, never labels old content with a new revision (content is
    /// read after the revision).
    pub fn revision(&self) -> Result<u64, ConsoleError> {
        let store = match self.store.follow_revision() {
            Some(rx) => *rx.borrow(),
            None => self.store.revision()?,
        };
        Ok(store + self.cluster.generation())
    }

    /// Every Service enforcers follow: the cluster's, then the documents' (which win
    /// where both claim an address and port).
    fn all_services(&self, docs: &Documents) -> Vec<segmesh_policy::Service> {
        let mut all = self.cluster.services();
        all.extend(docs.services.values().cloned());
        all
    }

    /// Creates a token; returns it (shown once, stored only hashed). Creating an editor
    /// token needs editor rights on its namespace; `by: None` is the console's own
    /// bootstrap.
    pub fn create_token(
        &self,
        by: Option<&Caller>,
        name: &str,
        role: Role,
        namespace: &NamespacePath,
    ) -> Result<String, ConsoleError> {
        if let Some(c) = by {
            if !c.can_edit(namespace) {
                return Err(ConsoleError::Forbidden(format!(
                    "{} may not create tokens for {namespace}",
                    c.name
                )));
            }
        }
        self.name_free(name, namespace)?;
        let token = new_token();
        let who = by.map_or("console", |c| c.name.as_str());
        let rec = TokenRecord {
            name: name.into(),
            role,
            namespace: namespace.to_string(),
            allowed_tags: Vec::new(),
            any_source: false,
        };
        self.store.put_token(
            &hash_token(&token),
            &rec,
            (who, "token", &format!("{name}: {role:?} on {namespace}")),
        )?;
        Ok(token)
    }

    /// The tags a PU `namespace:name` is certified with: the `claimed` ones the token
    /// `rec` allows within the namespace's tag prefixes as they are now (they may have
    /// narrowed since the token was made), `extra` ones the console vouches for itself
    /// (the cluster's), and the automatic ones. Also the claimed tags left out.
    fn certified(
        &self,
        rec: &TokenRecord,
        ns: &NamespacePath,
        name: &str,
        claimed: &[String],
        extra: Vec<String>,
    ) -> Result<(Vec<String>, Vec<String>), ConsoleError> {
        let patterns: Vec<TagPattern> = rec
            .allowed_tags
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        let prefixes = self.tag_prefixes(ns)?;
        let mut tags: BTreeSet<String> = extra.into_iter().collect();
        let mut dropped = Vec::new();
        for t in claimed {
            let ok = match t.parse::<Tag>() {
                Ok(tag) if !tag.key().starts_with('$') => {
                    let within = prefixes
                        .as_ref()
                        .is_none_or(|p| segmesh_policy::Namespace::key_allowed(p, tag.key()));
                    let one: TagSet = std::iter::once(tag).collect();
                    within && patterns.iter().any(|p| p.matches(&one))
                }
                _ => false,
            };
            if ok {
                tags.insert(t.clone());
            } else {
                dropped.push(t.clone());
            }
        }
        tags.insert("$identity=processingunit".into());
        tags.insert(format!("$namespace={ns}"));
        tags.insert(format!("$name={name}"));
        Ok((tags.into_iter().collect(), dropped))
    }

    /// The tags a followed cluster's pod is certified with at a renewal: what the
    /// cluster says of it now, through the token that registered it (the nearest of
    /// that name above it); None when not a known pod or the token is gone (the recorded
    /// tags stay).
    fn renewed_pod_tags(&self, pu: &PuRecord) -> Result<Option<Vec<String>>, ConsoleError> {
        let Some(k8s_ns) = pu
            .namespace
            .strip_prefix("/k8s/")
            .filter(|_| self.cluster.is_following())
        else {
            return Ok(None);
        };
        let Some(pod) = self.cluster.pod(k8s_ns, &pu.name) else {
            return Ok(None);
        };
        let ns: NamespacePath = pu.namespace.parse()?;
        let token = self
            .store
            .tokens()?
            .into_iter()
            .map(|(_, t)| t)
            .filter(|t| t.name == pu.by && t.role == Role::Enforcer)
            .filter_map(|t| Some((t.namespace.parse::<NamespacePath>().ok()?, t)))
            .filter(|(tns, _)| tns.is_ancestor_or_self(&ns))
            .max_by_key(|(tns, _)| tns.as_str().len())
            .map(|(_, t)| t);
        let Some(token) = token else {
            return Ok(None);
        };
        let labels: Vec<String> = pod.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let (tags, _) = self.certified(&token, &ns, &pu.name, &labels, pod.cluster_tags(k8s_ns))?;
        Ok(Some(tags))
    }

    /// Whether `token` is a bootstrap token (checked before a registration's body is
    /// read).
    pub fn is_bootstrap_token(&self, token: &str) -> bool {
        matches!(self.store.token(&hash_token(token)), Ok(Some(t)) if t.role == Role::Enforcer)
    }

    /// The tag prefixes `ns`'s tokens may certify (the live namespace settings).
    fn tag_prefixes(&self, ns: &NamespacePath) -> Result<Option<Vec<String>>, ConsoleError> {
        // The live namespace documents alone (no policy set to build per registration).
        let Some(live) = self.store.live()? else {
            return Ok(None);
        };
        Ok(ns.self_and_ancestors().iter().find_map(|p| {
            live.documents
                .namespaces
                .get(p.as_str())
                .and_then(|n| n.tag_prefixes.clone())
        }))
    }

    /// A token name is unique within its namespace.
    fn name_free(&self, name: &str, namespace: &NamespacePath) -> Result<(), ConsoleError> {
        let ns = namespace.to_string();
        if self
            .store
            .tokens()?
            .iter()
            .any(|(_, t)| t.name == name && t.namespace == ns)
        {
            return Err(ConsoleError::Conflict(format!(
                "a token named {name} exists in {namespace}; revoke it or choose another name"
            )));
        }
        Ok(())
    }

    /// Revokes the tokens named `name` (API or bootstrap) in the namespaces the caller
    /// edits (names are unique per namespace; a same-named token elsewhere is not the
    /// caller's and neither blocks nor is touched); the token making the call cannot
    /// revoke itself. Enforcers registered with a revoked bootstrap token keep working
    /// with their certificates; no new PU registers with it.
    pub fn revoke_token(
        &self,
        caller: &Caller,
        own_token: &str,
        name: &str,
    ) -> Result<usize, ConsoleError> {
        let own = hash_token(own_token);
        let named: Vec<(String, TokenRecord)> = self
            .store
            .tokens()?
            .into_iter()
            .filter(|(_, t)| {
                t.name == name
                    && t.namespace
                        .parse::<NamespacePath>()
                        .is_ok_and(|ns| caller.can_edit(&ns))
            })
            .collect();
        if named.is_empty() {
            return Err(ConsoleError::NotFound {
                kind: "token".into(),
                namespace: "/".into(),
                name: name.into(),
            });
        }
        for (hash, _) in &named {
            if *hash == own {
                return Err(ConsoleError::Forbidden(
                    "a token cannot revoke itself".into(),
                ));
            }
        }
        for (hash, t) in &named {
            self.store.delete_token(
                hash,
                (
                    &caller.name,
                    "revoke",
                    &format!("token {}: {:?} on {}", t.name, t.role, t.namespace),
                ),
            )?;
        }
        Ok(named.len())
    }

    pub fn authenticate(&self, token: &str) -> Result<Caller, ConsoleError> {
        let rec = self
            .store
            .token(&hash_token(token))?
            .ok_or(ConsoleError::Unauthenticated)?;
        if rec.role == Role::Enforcer {
            // Bootstrap tokens register enforcers; they do not administer.
            return Err(ConsoleError::Unauthenticated);
        }
        Ok(Caller {
            name: rec.name,
            role: rec.role,
            namespace: rec.namespace.parse()?,
        })
    }

    /// Creates a bootstrap token for enforcers of `namespace` (and below) whose PUs may
    /// carry tags matching `allowed_tags` (`key=value` or `key=*`).
    pub fn create_bootstrap_token(
        &self,
        by: &Caller,
        name: &str,
        namespace: &NamespacePath,
        allowed_tags: &[String],
    ) -> Result<String, ConsoleError> {
        self.create_bootstrap_token_with(by, name, namespace, allowed_tags, false)
    }

    /// A bootstrap token; `any_source`: its PUs may register from addresses they do not
    /// claim (behind NAT).
    pub fn create_bootstrap_token_with(
        &self,
        by: &Caller,
        name: &str,
        namespace: &NamespacePath,
        allowed_tags: &[String],
        any_source: bool,
    ) -> Result<String, ConsoleError> {
        if !by.can_edit(namespace) {
            return Err(ConsoleError::Forbidden(format!(
                "{} may not create bootstrap tokens for {namespace}",
                by.name
            )));
        }
        let prefixes = self.tag_prefixes(namespace)?;
        for p in allowed_tags {
            let pattern = p
                .parse::<TagPattern>()
                .map_err(|e| ConsoleError::Forbidden(format!("bad tag pattern: {e}")))?;
            if let Some(prefixes) = &prefixes {
                if !segmesh_policy::Namespace::key_allowed(prefixes, pattern.key()) {
                    return Err(ConsoleError::Forbidden(format!(
                        "`{p}` is outside the tag prefixes {namespace} may certify ({})",
                        prefixes.join(", ")
                    )));
                }
            }
        }
        self.name_free(name, namespace)?;
        let token = new_token();
        let rec = TokenRecord {
            name: name.into(),
            role: Role::Enforcer,
            namespace: namespace.to_string(),
            allowed_tags: allowed_tags.to_vec(),
            any_source,
        };
        let detail = format!(
            "{name}: bootstrap for {namespace}, tags {}",
            allowed_tags.join(" ")
        );
        self.store
            .put_token(&hash_token(&token), &rec, (&by.name, "token", &detail))?;
        Ok(token)
    }

    /// An enforcer registers its PU with a bootstrap token and a CSR. The console records
    /// the PU with the claimed tags the token allows (others are dropped and returned),
    /// adds the automatic tags, and signs a certificate carrying exactly those.
    pub fn register(
        &self,
        bootstrap: &str,
        ca: &Ca,
        req: &Registration,
    ) -> Result<Issued, ConsoleError> {
        self.register_from(bootstrap, ca, req, None)
    }

    /// [`register`](Self::register) from the connection's address `source` (None: an
    /// in-process caller). A live PU's name is not taken over with a token: its
    /// enforcer renews with its certificate, anyone else waits until its lease lapses.
    pub fn register_from(
        &self,
        bootstrap: &str,
        ca: &Ca,
        req: &Registration,
        source: Option<std::net::IpAddr>,
    ) -> Result<Issued, ConsoleError> {
        let rec = self
            .store
            .token(&hash_token(bootstrap))?
            .ok_or(ConsoleError::Unauthenticated)?;
        if rec.role != Role::Enforcer {
            return Err(ConsoleError::Forbidden(format!(
                "token {} is not a bootstrap token",
                rec.name
            )));
        }
        let scope: NamespacePath = rec.namespace.parse()?;
        let ns: NamespacePath = req.namespace.parse()?;
        if !scope.is_ancestor_or_self(&ns) {
            return Err(ConsoleError::Forbidden(format!(
                "bootstrap token {} is for {scope}, not {ns}",
                rec.name
            )));
        }
        let registered = self.store.pu(ns.as_str(), &req.name)?.is_some();
        if req.renew && !registered {
            return Err(ConsoleError::Gone(format!(
                "{ns}:{} is not registered (deleted?): no renewal",
                req.name
            )));
        }
        // One read of the leases for the name's and the addresses' checks.
        let view = self.lease_view()?;
        if registered && self.leased(&view, ns.as_str(), &req.name) {
            return Err(ConsoleError::Conflict(format!(
                "{ns}:{} is registered and live: only its current certificate re-registers it (or wait {:?} after its enforcer stops)",
                req.name, self.lease
            )));
        }
        let ips = self.claimable(
            ns.as_str(),
            &req.name,
            &req.ips,
            source,
            rec.any_source,
            &view,
        )?;
        let mut extra = Vec::new();
        let mut dropped = Vec::new();
        // A pod of the cluster the console follows: its tags are what the cluster says
        // (labels as the token allows, its namespace and service account), its addresses
        // must be the pod's.
        let mut claimed = req.tags.clone();
        if let Some(k8s_ns) = ns
            .as_str()
            .strip_prefix("/k8s/")
            .filter(|_| self.cluster.is_following())
        {
            let pod = self.cluster.pod(k8s_ns, &req.name).ok_or_else(|| {
                ConsoleError::Forbidden(format!(
                    "the cluster has no pod {k8s_ns}/{}: a PU of {ns} must be one",
                    req.name
                ))
            })?;
            if let Some(ip) = req
                .ips
                .iter()
                .find(|ip| !pod.ips.contains(&ip.to_canonical()))
            {
                return Err(ConsoleError::Forbidden(format!(
                    "{ip} is not an address of pod {k8s_ns}/{} ({:?})",
                    req.name, pod.ips
                )));
            }
            let labels: Vec<String> = pod.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            dropped.extend(req.tags.iter().filter(|t| !labels.contains(t)).cloned());
            claimed = labels;
            extra = pod.cluster_tags(k8s_ns);
        }
        let (tags, refused) = self.certified(&rec, &ns, &req.name, &claimed, extra)?;
        dropped.extend(refused);
        let id = SpiffeId::new(ca.trust_domain(), ns.as_str(), &req.name)
            .map_err(|e| ConsoleError::Forbidden(e.to_string()))?;
        let issued = ca
            .issue(&req.csr, &id, &tags, self.cert_ttl)
            .map_err(|e| ConsoleError::Forbidden(format!("cannot issue: {e}")))?;
        let pu = PuRecord {
            name: req.name.clone(),
            namespace: ns.to_string(),
            tags: tags.clone(),
            ips,
            registered_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string(),
            by: rec.name.clone(),
            any_source: rec.any_source,
        };
        self.store.put_pu(
            &pu,
            (
                &rec.name,
                "register",
                &format!("{id} tags {}", tags.join(" ")),
            ),
        )?;
        self.touch(ns.as_str(), &req.name);
        Ok(Issued {
            chain: issued.chain_pem,
            bundle: issued.bundle_pem,
            tags,
            dropped,
        })
    }

    /// A renewal authenticated by the enforcer's current certificate (no bootstrap
    /// token): only for the PU that certificate names, only while the PU is registered
    /// (410 after a deletion), and with the tags the console recorded for it.
    pub fn renew_by_certificate(
        &self,
        holder: &segmesh_identity::WorkloadIdentity,
        ca: &Ca,
        req: &Registration,
    ) -> Result<Issued, ConsoleError> {
        self.renew_from(holder, ca, req, None)
    }

    /// [`renew_by_certificate`](Self::renew_by_certificate) from the connection's address
    /// `source`: new addresses are checked like a registration's.
    pub fn renew_from(
        &self,
        holder: &segmesh_identity::WorkloadIdentity,
        ca: &Ca,
        req: &Registration,
        source: Option<std::net::IpAddr>,
    ) -> Result<Issued, ConsoleError> {
        if holder.namespace != req.namespace || holder.name != req.name {
            return Err(ConsoleError::Forbidden(format!(
                "the certificate of {} cannot renew {}:{}",
                holder.spiffe_id(),
                req.namespace,
                req.name
            )));
        }
        let Some(mut pu) = self.store.pu(&req.namespace, &req.name)? else {
            return Err(ConsoleError::Gone(format!(
                "{}:{} is not registered (deleted?): no renewal",
                req.namespace, req.name
            )));
        };
        if !req.ips.is_empty() {
            // A PU registered from behind NAT renews from there too.
            let view = self.lease_view()?;
            pu.ips = self.claimable(
                &pu.namespace,
                &pu.name,
                &req.ips,
                source,
                pu.any_source,
                &view,
            )?;
        }
        // A followed cluster's pod: its labels as they are now.
        if let Some(tags) = self.renewed_pod_tags(&pu)? {
            pu.tags = tags;
        }
        let id = SpiffeId::new(ca.trust_domain(), &pu.namespace, &pu.name)
            .map_err(|e| ConsoleError::Forbidden(e.to_string()))?;
        let issued = ca
            .issue(&req.csr, &id, &pu.tags, self.cert_ttl)
            .map_err(|e| ConsoleError::Forbidden(format!("cannot issue: {e}")))?;
        let who = holder.spiffe_id().to_string();
        self.store.put_pu(
            &pu,
            (&who, "renew", &format!("{id} tags {}", pu.tags.join(" "))),
        )?;
        self.touch(&pu.namespace, &pu.name);
        Ok(Issued {
            chain: issued.chain_pem,
            bundle: issued.bundle_pem,
            tags: pu.tags,
            dropped: Vec::new(),
        })
    }

    /// Validates `files` together, checks rights, merges them into the draft.
    pub fn apply(&self, caller: &Caller, files: &[Source<'_>]) -> Result<Changes, ConsoleError> {
        let loaded = segmesh_policy::load(files).map_err(ConsoleError::Invalid)?;
        let set = loaded.set;
        let mut denied = BTreeSet::new();
        for p in set.policies() {
            if !caller.can_edit(&p.namespace) {
                denied.insert(p.namespace.to_string());
            }
        }
        for e in set.externals() {
            if !caller.can_edit(&e.namespace) {
                denied.insert(e.namespace.to_string());
            }
        }
        for s in &loaded.services {
            if !caller.can_edit(&s.namespace) {
                denied.insert(s.namespace.to_string());
            }
        }
        for n in set.namespaces() {
            // A namespace's own settings belong to whoever edits its parent.
            let ok = match n.path.parent() {
                Some(parent) => caller.can_edit(&parent),
                None => caller.can_edit(&NamespacePath::root()) && caller.namespace.is_root(),
            };
            if !ok {
                denied.insert(format!(
                    "{} (its settings need editor rights on its parent)",
                    n.path
                ));
            }
        }
        if !denied.is_empty() {
            return Err(ConsoleError::Forbidden(format!(
                "{} ({:?} on {}) may not edit: {}",
                caller.name,
                caller.role,
                caller.namespace,
                denied.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        let mut touched = Vec::new();
        touched.extend(
            set.policies()
                .iter()
                .map(|p| ("NetworkPolicy", key(&p.namespace, &p.name))),
        );
        touched.extend(
            set.externals()
                .iter()
                .map(|e| ("ExternalNetwork", key(&e.namespace, &e.name))),
        );
        touched.extend(set.namespaces().map(|n| ("Namespace", n.path.to_string())));
        touched.extend(
            loaded
                .services
                .iter()
                .map(|s| ("Service", key(&s.namespace, &s.name))),
        );
        self.edit_draft(&touched, |docs| {
            let ch = Self::merge(docs, &set, &loaded.services)?;
            let summary = format!(
                "{} added, {} changed, {} unchanged",
                ch.added.len(),
                ch.changed.len(),
                ch.unchanged.len()
            );
            Ok((ch, (caller.name.clone(), "apply", summary)))
        })
    }

    /// Edits the draft with `edit` (which also says what to audit), again from the new
    /// draft when another edit got there first, unless that edit changed one of the
    /// `touched` documents: then this one is refused, naming it.
    fn edit_draft<T>(
        &self,
        touched: &[(&str, String)],
        edit: impl Fn(&mut Documents) -> Result<(T, (String, &'static str, String)), ConsoleError>,
    ) -> Result<T, ConsoleError> {
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            let (base, stamp) = self.store.draft_base()?;
            let mut docs = base.clone();
            let (out, (who, action, detail)) = edit(&mut docs)?;
            match self.store.set_draft(&docs, stamp, (&who, action, &detail)) {
                Ok(()) => return Ok(out),
                Err(crate::store::StoreError::Conflict) => {
                    let (now, _) = self.store.draft_base()?;
                    if let Some((kind, k)) = touched
                        .iter()
                        .find(|(kind, k)| document(&base, kind, k) != document(&now, kind, k))
                    {
                        return Err(ConsoleError::Conflict(format!(
                            "{kind} {k} was changed by another edit of the draft (or a commit) while this {action} was prepared; nothing was changed: look at `segmeshctl diff` and try again"
                        )));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ConsoleError::Conflict(format!(
            "the draft kept changing under other edits ({ATTEMPTS} attempts); nothing was changed: try again"
        )))
    }

    /// Merges loaded documents into `docs` (by identity); what changed.
    fn merge(
        docs: &mut Documents,
        set: &PolicySet,
        services: &[segmesh_policy::Service],
    ) -> Result<Changes, ConsoleError> {
        let mut ch = Changes::default();
        let mut note = |k: String, old: Option<bool>| match old {
            None => ch.added.push(k),
            Some(true) => ch.unchanged.push(k),
            Some(false) => ch.changed.push(k),
        };
        for p in set.policies() {
            let k = key(&p.namespace, &p.name);
            note(
                format!("NetworkPolicy {k}"),
                docs.policies.get(&k).map(|o| same(o, p)),
            );
            docs.policies.insert(k, p.clone());
        }
        for e in set.externals() {
            let k = key(&e.namespace, &e.name);
            note(
                format!("ExternalNetwork {k}"),
                docs.externals.get(&k).map(|o| same(o, e)),
            );
            docs.externals.insert(k, e.clone());
        }
        for n in set.namespaces() {
            let k = n.path.to_string();
            note(
                format!("Namespace {k}"),
                docs.namespaces.get(&k).map(|o| same(o, n)),
            );
            docs.namespaces.insert(k, n.clone());
        }
        for s in services {
            let k = key(&s.namespace, &s.name);
            note(
                format!("Service {k}"),
                docs.services.get(&k).map(|o| same(o, s)),
            );
            docs.services.insert(k, s.clone());
        }
        // An address and port lead to one Service, across everything in the draft.
        let mut taken = std::collections::HashMap::new();
        for s in docs.services.values() {
            for ip in &s.addresses {
                for p in &s.ports {
                    if let Some(other) = taken.insert((*ip, p.protocol, p.port), s.qualified_name())
                    {
                        return Err(ConsoleError::Conflict(format!(
                            "{ip} {}/{} belongs to both Service {other} and Service {}",
                            p.protocol.as_str(),
                            p.port,
                            s.qualified_name()
                        )));
                    }
                }
            }
        }
        Ok(ch)
    }

    /// Removes a document from the draft.
    pub fn delete(
        &self,
        caller: &Caller,
        kind: &str,
        namespace: &NamespacePath,
        name: &str,
    ) -> Result<(), ConsoleError> {
        if !caller.can_edit(namespace) {
            return Err(ConsoleError::Forbidden(format!(
                "{} may not edit {namespace}",
                caller.name
            )));
        }
        let k = key(namespace, name);
        self.edit_draft(&[(kind, k.clone())], |docs| {
            let removed = match kind {
                "NetworkPolicy" => docs.policies.remove(&k).is_some(),
                "ExternalNetwork" => docs.externals.remove(&k).is_some(),
                "Service" => docs.services.remove(&k).is_some(),
                _ => false,
            };
            if !removed {
                return Err(ConsoleError::NotFound {
                    kind: kind.into(),
                    namespace: namespace.to_string(),
                    name: name.into(),
                });
            }
            Ok(((), (caller.name.clone(), "delete", format!("{kind} {k}"))))
        })
    }

    /// The draft against what is live.
    pub fn diff(&self, caller: &Caller) -> Result<Changes, ConsoleError> {
        let live = self.store.live()?.map(|v| v.documents).unwrap_or_default();
        let Some(draft) = self.store.draft()? else {
            return Ok(Changes::default());
        };
        let mut ch = Changes::default();
        fn cmp<T: serde::Serialize>(
            kind: &str,
            live: &std::collections::BTreeMap<String, T>,
            draft: &std::collections::BTreeMap<String, T>,
            ch: &mut Changes,
            visible: &dyn Fn(&str) -> bool,
        ) {
            for (k, d) in draft {
                if !visible(k) {
                    continue;
                }
                match live.get(k) {
                    None => ch.added.push(format!("{kind} {k}")),
                    Some(l) if same(l, d) => ch.unchanged.push(format!("{kind} {k}")),
                    Some(_) => ch.changed.push(format!("{kind} {k}")),
                }
            }
            for k in live.keys() {
                if visible(k) && !draft.contains_key(k) {
                    ch.removed.push(format!("{kind} {k}"));
                }
            }
        }
        let visible = |k: &str| {
            let ns = k.rsplit_once(':').map_or(k, |(ns, _)| ns);
            ns.parse::<NamespacePath>()
                .is_ok_and(|ns| caller.can_view(&ns))
        };
        cmp(
            "NetworkPolicy",
            &live.policies,
            &draft.policies,
            &mut ch,
            &visible,
        );
        cmp(
            "ExternalNetwork",
            &live.externals,
            &draft.externals,
            &mut ch,
            &visible,
        );
        cmp(
            "Namespace",
            &live.namespaces,
            &draft.namespaces,
            &mut ch,
            &visible,
        );
        cmp(
            "Service",
            &live.services,
            &draft.services,
            &mut ch,
            &visible,
        );
        Ok(ch)
    }

    /// Publishes the draft. It publishes everyone's pending changes, so it needs editor
    /// rights on the root namespace.
    pub fn commit(&self, caller: &Caller) -> Result<u64, ConsoleError> {
        if !(caller.role == Role::Editor && caller.namespace.is_root()) {
            return Err(ConsoleError::Forbidden(format!(
                "{} may not commit: it needs editor rights on /",
                caller.name
            )));
        }
        Ok(self
            .store
            .commit((&caller.name, "commit", "draft published"))?)
    }

    /// Republishes version `to` (default: the one before the live one).
    pub fn rollback(&self, caller: &Caller, to: Option<u64>) -> Result<u64, ConsoleError> {
        if !(caller.role == Role::Editor && caller.namespace.is_root()) {
            return Err(ConsoleError::Forbidden(format!(
                "{} may not roll back: it needs editor rights on /",
                caller.name
            )));
        }
        let live = self.store.live()?.map_or(0, |v| v.version);
        let to = to.unwrap_or(live.saturating_sub(1));
        Ok(self
            .store
            .rollback(to, (&caller.name, "rollback", &format!("to version {to}")))?)
    }

    /// What the enforcer of PU `namespace:name` needs (see [`segmesh_api::Snapshot`]).
    pub fn snapshot_for(
        &self,
        namespace: &NamespacePath,
    ) -> Result<segmesh_api::Snapshot, ConsoleError> {
        // Read the revision first: a change racing this read yields a newer revision on
        // the next poll, never a stale snapshot under a new revision.
        let revision = self.revision()?;
        // Everything a snapshot holds moves the revision (commits, rollbacks, registry
        // changes, the cluster's changes), so the state read for this revision serves
        // every snapshot of it. (Read after the revision, it may be newer than it: the
        // next revision's watchers then read again, never the other way round.)
        // One reader fills it while the others wait for that read (watchers woken
        // together would otherwise all miss at once).
        let (version, docs, pus) = {
            let mut state = self.snapshot_state.lock().expect("lock poisoned");
            match state.as_ref().filter(|s| s.revision == revision) {
                Some(s) => (s.version, s.docs.clone(), s.pus.clone()),
                None => {
                    let live = self.store.live()?;
                    let (version, docs) =
                        live.map_or((0, Documents::default()), |v| (v.version, v.documents));
                    let fresh = SnapshotState {
                        revision,
                        version,
                        docs: std::sync::Arc::new(docs),
                        pus: std::sync::Arc::new(self.store.pus()?),
                    };
                    let out = (version, fresh.docs.clone(), fresh.pus.clone());
                    *state = Some(fresh);
                    out
                }
            }
        };
        let ancestors = namespace.self_and_ancestors();
        let services = services_of(self.all_services(&docs).iter(), &pus);
        Ok(segmesh_api::Snapshot {
            revision,
            version,
            policies: docs
                .policies
                .values()
                .filter(|p| p.namespace.covers(namespace, p.propagate))
                .cloned()
                .collect(),
            externals: docs
                .externals
                .values()
                .filter(|e| e.namespace.is_ancestor_or_self(namespace))
                .cloned()
                .collect(),
            namespaces: docs
                .namespaces
                .values()
                .filter(|n| ancestors.contains(&n.path))
                .cloned()
                .collect(),
            registry: pus
                .iter()
                .map(|p| segmesh_api::RegistryEntry {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    ips: p.ips.clone(),
                })
                .collect(),
            services,
        })
    }

    /// The live Services the caller may view, resolved as enforcers get them.
    pub fn services(
        &self,
        caller: &Caller,
    ) -> Result<Vec<segmesh_api::ServiceEntry>, ConsoleError> {
        let docs = self.store.live()?.map(|v| v.documents).unwrap_or_default();
        let pus = self.store.pus()?;
        Ok(services_of(
            self.all_services(&docs)
                .iter()
                .filter(|s| caller.can_view(&s.namespace)),
            &pus,
        ))
    }

    /// Who may fetch snapshots of `namespace`: a bootstrap token or an API token whose
    /// subtree covers it.
    pub fn may_watch(&self, token: &str, namespace: &NamespacePath) -> Result<(), ConsoleError> {
        let rec = self
            .store
            .token(&hash_token(token))?
            .ok_or(ConsoleError::Unauthenticated)?;
        let scope: NamespacePath = rec.namespace.parse()?;
        if scope.is_ancestor_or_self(namespace) {
            Ok(())
        } else {
            Err(ConsoleError::Forbidden(format!(
                "token {} is for {scope}, not {namespace}",
                rec.name
            )))
        }
    }

    /// Deletes a registered PU: it leaves every enforcer's registry with the next push,
    /// and its renewals are refused. Needs editor rights on its namespace.
    pub fn delete_pu(
        &self,
        caller: &Caller,
        namespace: &NamespacePath,
        name: &str,
    ) -> Result<(), ConsoleError> {
        if !caller.can_edit(namespace) {
            return Err(ConsoleError::Forbidden(format!(
                "{} may not edit {namespace}",
                caller.name
            )));
        }
        let detail = format!("ProcessingUnit {namespace}:{name}");
        if self
            .store
            .delete_pu(namespace.as_str(), name, (&caller.name, "delete", &detail))?
        {
            Ok(())
        } else {
            Err(ConsoleError::NotFound {
                kind: "ProcessingUnit".into(),
                namespace: namespace.to_string(),
                name: name.into(),
            })
        }
    }

    /// Stores the flow records the enforcer of `pu` reports, `pu` taken from its
    /// certificate (the server accepts reports only with one): each record is stamped
    /// with it as the reporter, and only records about `pu` itself (its end of the
    /// flow: the source of an outgoing flow, the destination of an incoming one) are
    /// kept. Returns (stored, refused).
    pub fn store_flows(
        &self,
        pu: &str,
        records: Vec<segmesh_api::FlowRecord>,
    ) -> Result<(usize, usize), ConsoleError> {
        let received_at =
            humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let total = records.len();
        let own = |r: &segmesh_api::FlowRecord| {
            let end = match r.direction.as_str() {
                "outgoing" => &r.source,
                _ => &r.destination,
            };
            end.pu.as_deref() == Some(pu)
        };
        let records: Vec<segmesh_api::FlowRecord> = records.into_iter().filter(own).collect();
        let n = records.len();
        let stored: Vec<StoredFlow> = records
            .into_iter()
            .map(|record| StoredFlow {
                seq: 0,
                reporter: pu.to_owned(),
                received_at: received_at.clone(),
                record,
            })
            .collect();
        self.store
            .add_flows(&stored, FLOWS_KEPT, FLOWS_KEPT_PER_PU)?;
        Ok((n, total - n))
    }

    /// Flow records the caller may see (reported by PUs in its subtree), oldest first,
    /// filtered.
    pub fn flows(
        &self,
        caller: &Caller,
        filter: &FlowFilter,
    ) -> Result<Vec<StoredFlow>, ConsoleError> {
        let since = filter
            .since
            .map(|d| std::time::SystemTime::now() - d)
            .map(|t| humantime::format_rfc3339_millis(t).to_string());
        let mut out: Vec<StoredFlow> = self
            .store
            .flows()?
            .into_iter()
            .filter(|f| {
                let visible = f
                    .reporter
                    .rsplit_once(':')
                    .and_then(|(ns, _)| ns.parse::<NamespacePath>().ok())
                    .is_some_and(|ns| caller.can_view(&ns));
                let r = &f.record;
                let pu_matches = filter.pu.as_ref().is_none_or(|pu| {
                    let is = |e: &segmesh_api::FlowEndpoint| {
                        e.pu.as_deref().is_some_and(|p| {
                            p == pu || p.rsplit_once(':').is_some_and(|(_, n)| n == pu)
                        })
                    };
                    is(&r.source) || is(&r.destination)
                });
                // RFC 3339 UTC timestamps of one format order as strings.
                let recent = since.as_ref().is_none_or(|s| r.time.as_str() >= s.as_str());
                visible
                    && pu_matches
                    && recent
                    && filter.before.is_none_or(|b| f.seq < b)
                    && filter.verdict.as_ref().is_none_or(|v| &r.verdict == v)
            })
            .collect();
        if let Some(limit) = filter.limit {
            let skip = out.len().saturating_sub(limit);
            out.drain(..skip);
        }
        Ok(out)
    }

    /// The live version and its documents as a policy set.
    pub fn live(&self) -> Result<Option<(Version, PolicySet)>, ConsoleError> {
        let Some(v) = self.store.live()? else {
            return Ok(None);
        };
        let d = &v.documents;
        let set = PolicySet::new(
            d.policies.values().cloned().collect(),
            d.externals.values().cloned().collect(),
            d.namespaces.values().cloned().collect(),
        )
        .map_err(|e| ConsoleError::Forbidden(format!("stored version is inconsistent: {e}")))?;
        Ok(Some((v, set)))
    }
}

#[cfg(test)]
mod tests;
