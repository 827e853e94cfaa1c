//! What the enforcer enforces: its PU, the compiled policies, and the registry of the
//! PUs it may meet, built whole and swapped atomically.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use segmesh_identity::TlsConfigs;

use segmesh_policy::{Engine, NamespacePath, PolicySet, PreparedPu, Pu, Source, Tag, TagSet};

use crate::config::{ConfigError, LocalConfig, RegistryEntry, collect_yaml};

/// The PU registered at an address (no tags: a peer's tags come only from its
/// certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredPu {
    pub name: String,
    pub namespace: String,
}

impl RegisteredPu {
    pub fn qualified(&self) -> String {
        format!("{}:{}", self.namespace, self.name)
    }
}

/// A Service's port as the enforcer follows it: where to send a connection made to
/// one of the Service's addresses on that port.
#[derive(Debug)]
pub struct ServiceTarget {
    /// `<namespace>:<name>`.
    pub name: String,
    /// The port on the endpoint.
    pub target: u16,
    pub endpoints: Vec<Endpoint>,
    /// Round robin: where the next connection starts looking.
    next: std::sync::atomic::AtomicUsize,
}

/// One endpoint of a Service: a PU (through the mesh tunnel) or an address outside
/// the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub pu: Option<RegisteredPu>,
}

impl ServiceTarget {
    pub fn new(name: String, target: u16, endpoints: Vec<Endpoint>) -> ServiceTarget {
        ServiceTarget {
            name,
            target,
            endpoints,
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The endpoints in the order this connection tries them: round robin over
    /// connections, so load spreads and a failing endpoint is followed by the next.
    pub fn order(&self) -> Vec<Endpoint> {
        let n = self.endpoints.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
        (0..n)
            .map(|i| self.endpoints[(start + i) % n].clone())
            .collect()
    }
}

/// Services by virtual address, protocol and port.
pub type Services = HashMap<(IpAddr, segmesh_policy::Protocol, u16), Arc<ServiceTarget>>;

/// The Services the console pushed, keyed for lookup; endpoint PUs as the console named
/// them (the registry says the same of their addresses).
fn services_of(entries: &[segmesh_api::ServiceEntry]) -> Services {
    let mut out = Services::new();
    for s in entries {
        let endpoints: Vec<Endpoint> = s
            .endpoints
            .iter()
            .map(|e| Endpoint {
                ip: e.ip.to_canonical(),
                pu: e.pu.as_deref().and_then(|q| {
                    let (ns, name) = q.rsplit_once(':')?;
                    Some(RegisteredPu {
                        name: name.to_owned(),
                        namespace: ns.to_owned(),
                    })
                }),
            })
            .collect();
        for p in &s.ports {
            let target = Arc::new(ServiceTarget::new(
                s.name.clone(),
                p.target,
                endpoints.clone(),
            ));
            for ip in &s.addresses {
                out.insert((ip.to_canonical(), p.protocol, p.port), target.clone());
            }
        }
    }
    out
}

/// Services of the local configuration's policy files: endpoints listed by address (a
/// selector needs the PUs' certified tags, which only the console knows).
fn local_services(
    services: &[segmesh_policy::Service],
    registry: &HashMap<IpAddr, RegisteredPu>,
) -> Result<Services, ConfigError> {
    let mut entries = Vec::new();
    for s in services {
        let segmesh_policy::Endpoints::Addresses(ips) = &s.endpoints else {
            return Err(ConfigError::Pu(format!(
                "Service {}: a selector needs the console (a local configuration knows no PU's tags); list `endpoints` by address",
                s.qualified_name()
            )));
        };
        entries.push(segmesh_api::ServiceEntry {
            name: s.qualified_name(),
            addresses: s.addresses.clone(),
            ports: s.ports.clone(),
            endpoints: ips
                .iter()
                .map(|ip| segmesh_api::ServiceEndpoint {
                    ip: *ip,
                    pu: registry.get(&ip.to_canonical()).map(|r| r.qualified()),
                })
                .collect(),
        });
    }
    Ok(services_of(&entries))
}

pub struct Snapshot {
    /// A fingerprint of the inputs (file mode) or the console's revision, shown by
    /// `/config`.
    pub version: String,
    /// Where it came from: `file`, `console`, `cache` (the console's last snapshot, read
    /// from disk), `none` (fail closed).
    pub source: &'static str,
    pub pu: Pu,
    pub pu_name: String,
    pub engine: Engine,
    pub prepared: PreparedPu,
    pub registry: HashMap<IpAddr, RegisteredPu>,
    /// Addresses skipped because several PUs claim them.
    pub registry_conflicts: Vec<String>,
    pub services: Services,
    /// The local configuration (file mode).
    pub config: Option<LocalConfig>,
    fail_closed: bool,
    pub policy_count: usize,
    /// Our TLS configurations (mesh tunnel), when the configuration names an identity.
    pub tls: Option<Arc<TlsConfigs>>,
    /// A hash of the identity files the TLS configurations came from.
    tls_fingerprint: u64,
}

impl Snapshot {
    /// Rejects everything: what the enforcer enforces before any valid configuration.
    pub fn fail_closed() -> Snapshot {
        let engine = Engine::compile(PolicySet::default());
        let pu = Pu::with_automatic_tags(NamespacePath::root(), TagSet::new());
        let prepared = engine.prepare_pu(&pu);
        Snapshot {
            version: "none".into(),
            source: "none",
            pu,
            pu_name: String::new(),
            engine,
            prepared,
            registry: HashMap::new(),
            registry_conflicts: Vec::new(),
            services: Services::new(),
            config: None,
            fail_closed: true,
            policy_count: 0,
            tls: None,
            tls_fingerprint: 0,
        }
    }

    pub fn is_fail_closed(&self) -> bool {
        self.fail_closed
    }

    /// From the console's snapshot for our PU (tags: those our certificate carries).
    pub fn from_console(
        pu_name: &str,
        namespace: &str,
        tags: &[String],
        snap: &segmesh_api::Snapshot,
        tls: Option<Arc<TlsConfigs>>,
        source: &'static str,
    ) -> Result<Snapshot, ConfigError> {
        let pu = pu_of(
            pu_name,
            namespace,
            tags.iter().filter(|t| !t.starts_with('$')),
        )?;
        let set = PolicySet::new(
            snap.policies.clone(),
            snap.externals.clone(),
            snap.namespaces.clone(),
        )
        .map_err(|e| ConfigError::Pu(format!("the console's snapshot: {e}")))?;
        let policy_count = set.policies().len();
        let (registry, registry_conflicts) = registry_of(&snap.registry);
        let engine = Engine::compile(set);
        let prepared = engine.prepare_pu(&pu);
        Ok(Snapshot {
            version: format!(
                "revision {} (policy version {})",
                snap.revision, snap.version
            ),
            source,
            pu,
            pu_name: pu_name.to_owned(),
            engine,
            prepared,
            registry,
            registry_conflicts,
            services: services_of(&snap.services),
            config: None,
            fail_closed: false,
            policy_count,
            tls,
            tls_fingerprint: 0,
        })
    }

    /// Loads the configuration file and everything it names, or nothing. TLS
    /// configurations of `previous` are kept when the identity files did not change, so
    /// resumption survives unrelated reloads.
    pub fn load(path: &Path, previous: Option<&Snapshot>) -> Result<Snapshot, ConfigError> {
        let cfg = LocalConfig::load(path)?;
        let pu = pu_of(&cfg.pu.name, &cfg.pu.namespace, cfg.pu.tags.iter())?;

        let mut files = Vec::new();
        for p in &cfg.policies {
            if p.is_dir() {
                collect_yaml(p, &mut files);
            } else {
                files.push(p.clone());
            }
        }
        let texts = files
            .iter()
            .map(|f| {
                std::fs::read_to_string(f)
                    .map(|t| (f.display().to_string(), t))
                    .map_err(|e| ConfigError::Read(f.clone(), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sources: Vec<Source<'_>> = texts
            .iter()
            .map(|(n, t)| Source { name: n, text: t })
            .collect();
        let loaded = segmesh_policy::load(&sources)?;
        let policy_count = loaded.set.policies().len();

        let (registry, registry_conflicts) = registry_of(&cfg.registry);
        let services = local_services(&loaded.services, &registry)?;
        // Contents only (not paths), so the same configuration has the same version.
        let mut fingerprint = std::collections::hash_map::DefaultHasher::new();
        for (_, t) in &texts {
            std::hash::Hash::hash(t, &mut fingerprint);
        }
        std::hash::Hash::hash(
            &std::fs::read_to_string(path).unwrap_or_default(),
            &mut fingerprint,
        );
        let version = format!("{:016x}", std::hash::Hasher::finish(&fingerprint));

        let (tls, tls_fingerprint) = match &cfg.identity {
            None => (None, 0),
            Some(files) => {
                let read = |p: &Path| {
                    std::fs::read_to_string(p).map_err(|e| ConfigError::Read(p.to_owned(), e))
                };
                let (cert, key, bundle) =
                    (read(&files.cert)?, read(&files.key)?, read(&files.bundle)?);
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::hash::Hash::hash(&(&cert, &key, &bundle), &mut h);
                let fp = std::hash::Hasher::finish(&h);
                match previous.filter(|p| p.tls_fingerprint == fp && p.tls.is_some()) {
                    Some(p) => (p.tls.clone(), fp),
                    None => {
                        let chain = segmesh_identity::ca::certs_from_pem(&cert)?;
                        let own = segmesh_identity::WorkloadIdentity::from_cert(&chain[0])?;
                        if own.name != cfg.pu.name || own.namespace != pu.namespace.as_str() {
                            return Err(ConfigError::IdentityMismatch {
                                expected: format!("{}:{}", pu.namespace, cfg.pu.name),
                                found: own.spiffe_id().to_string(),
                            });
                        }
                        let sessions = segmesh_identity::Sessions::new()?;
                        let mut configs = TlsConfigs::from_pem(
                            &cert,
                            &key,
                            &bundle,
                            &own.trust_domain,
                            &sessions,
                        )?;
                        if !cfg.tunnel_resumption {
                            let mut client = (*configs.client).clone();
                            client.resumption = rustls::client::Resumption::disabled();
                            configs.client = Arc::new(client);
                        }
                        (Some(Arc::new(configs)), fp)
                    }
                }
            }
        };

        let engine = Engine::compile(loaded.set);
        let prepared = engine.prepare_pu(&pu);
        Ok(Snapshot {
            version,
            source: "file",
            pu,
            pu_name: cfg.pu.name.clone(),
            engine,
            prepared,
            registry,
            registry_conflicts,
            services,
            config: Some(cfg),
            fail_closed: false,
            policy_count,
            tls,
            tls_fingerprint,
        })
    }

    /// `<namespace>:<name>` of our PU.
    pub fn pu_qualified(&self) -> String {
        format!("{}:{}", self.pu.namespace, self.pu_name)
    }

    /// The external networks visible from our PU that an address outside the mesh falls
    /// in on `port`: by the address itself, and by each name our PU resolved to it
    /// (domain entries); with the first name that matched a network.
    pub fn resolve(
        &self,
        ip: IpAddr,
        names: &[String],
        port: segmesh_policy::FlowPort,
    ) -> (Vec<u32>, Option<String>) {
        let mut ids = self.engine.resolve_address(
            &self.prepared,
            &segmesh_policy::Address {
                ip: Some(ip),
                domain: None,
            },
            port,
        );
        let mut domain = None;
        for n in names {
            let by_name = self.engine.resolve_address(
                &self.prepared,
                &segmesh_policy::Address {
                    ip: None,
                    domain: Some(n.clone()),
                },
                port,
            );
            if !by_name.is_empty() && domain.is_none() {
                domain = Some(n.clone());
            }
            ids.extend(by_name);
        }
        ids.sort_unstable();
        ids.dedup();
        (ids, domain)
    }
}

/// Our PU: its name, namespace and tags, plus the automatic tags.
fn pu_of<'a>(
    name: &str,
    namespace: &str,
    tags: impl Iterator<Item = &'a String>,
) -> Result<Pu, ConfigError> {
    let namespace: NamespacePath = namespace
        .parse()
        .map_err(|e| ConfigError::Pu(format!("{e}")))?;
    let tags: Vec<String> = tags.cloned().collect();
    let mut tags = TagSet::parse(&tags).map_err(|e| ConfigError::Pu(format!("{e}")))?;
    if let Ok(t) = Tag::new("$name", name) {
        tags.insert(t);
    }
    Ok(Pu::with_automatic_tags(namespace, tags))
}

/// The registry by address; an address registered twice is an error.
/// The registry by address. An address two PUs claim is given to neither (who is
/// there cannot be known; one bad entry must not stop the enforcer from taking
/// snapshots): it is skipped, and named in the returned conflicts (sorted, so every
/// enforcer skips the same).
fn registry_of(entries: &[RegistryEntry]) -> (HashMap<IpAddr, RegisteredPu>, Vec<String>) {
    let mut registry: HashMap<IpAddr, RegisteredPu> = HashMap::new();
    let mut conflicts = std::collections::BTreeMap::<IpAddr, Vec<String>>::new();
    for r in entries {
        let pu = RegisteredPu {
            name: r.name.clone(),
            namespace: r.namespace.clone(),
        };
        for ip in &r.ips {
            let ip = ip.to_canonical();
            if let Some(c) = conflicts.get_mut(&ip) {
                c.push(pu.qualified());
                continue;
            }
            match registry.get(&ip) {
                Some(prev) if *prev != pu => {
                    let prev = registry.remove(&ip).expect("just found");
                    conflicts.insert(ip, vec![prev.qualified(), pu.qualified()]);
                }
                Some(_) => {}
                None => {
                    registry.insert(ip, pu.clone());
                }
            }
        }
    }
    let conflicts = conflicts
        .into_iter()
        .map(|(ip, mut who)| {
            who.sort();
            who.dedup();
            format!("{ip} claimed by {}", who.join(" and "))
        })
        .collect();
    (registry, conflicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, ips: &[&str]) -> RegistryEntry {
        RegistryEntry {
            name: name.into(),
            namespace: "/acme".into(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        }
    }

    /// An address two PUs claim (also as v4-mapped v6) goes to neither and is named, the
    /// rest of the registry stands; the result does not depend on the entries' order.
    #[test]
    fn conflicting_registry_entries_are_skipped() {
        let entries = vec![
            entry("web", &["10.0.0.2", "fd00::2"]),
            entry("evil", &["::ffff:10.0.0.2", "10.0.0.9"]),
            entry("api", &["10.0.0.3"]),
            entry("mallory", &["10.0.0.2"]),
        ];
        let (reg, conflicts) = registry_of(&entries);
        assert!(!reg.contains_key(&"10.0.0.2".parse::<IpAddr>().unwrap()));
        assert_eq!(reg[&"fd00::2".parse::<IpAddr>().unwrap()].name, "web");
        assert_eq!(reg[&"10.0.0.9".parse::<IpAddr>().unwrap()].name, "evil");
        assert_eq!(reg[&"10.0.0.3".parse::<IpAddr>().unwrap()].name, "api");
        assert_eq!(
            conflicts,
            vec!["10.0.0.2 claimed by /acme:evil and /acme:mallory and /acme:web"]
        );
        let mut reversed = entries.clone();
        reversed.reverse();
        assert_eq!(registry_of(&reversed), (reg, conflicts));
    }
}
