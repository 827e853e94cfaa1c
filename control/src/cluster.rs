//! The console follows a Kubernetes cluster: it watches Services, EndpointSlices and
//! Pods through the API (kube-rs), turns each Service into a segmesh Service (namespace
//! `/k8s/<namespace>`, the namespace injected pods register in; its cluster IPs, its
//! ports with the target ports its EndpointSlices name, its ready endpoints by address)
//! and keeps each Pod's addresses, labels and service account, so a registering pod is
//! certified with what the cluster says of it: its labels (as the bootstrap token
//! allows), `@k8s:ns=<namespace>` and `@k8s:sa=<service account>`, never what it claims.
//!
//! Nobody applies these: they are live as the cluster changes them (the snapshot
//! revision moves with them), beside the versioned documents, which win where both name
//! the same address and port. A broken watch resumes from its resource version; an
//! expired one ("resource version too old", 410) lists again (kube-runtime's watcher);
//! and every `resync` the watches start over with a full list, which repairs any drift.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use segmesh_policy::{Endpoints, NamespacePath, Protocol, Service, ServicePort};

/// The segmesh namespace of a Kubernetes namespace's pods and Services.
pub fn namespace_of(k8s_namespace: &str) -> String {
    format!("/k8s/{k8s_namespace}")
}

/// What the cluster says of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
}

impl PodInfo {
    /// The tags the console certifies for this pod beside its allowed labels.
    pub fn cluster_tags(&self, k8s_namespace: &str) -> Vec<String> {
        vec![
            format!("@k8s:ns={k8s_namespace}"),
            format!("@k8s:sa={}", self.service_account),
        ]
    }
}

/// The cluster as the console last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub services: Vec<Service>,
    /// By (Kubernetes namespace, pod name).
    pub pods: HashMap<(String, String), PodInfo>,
}

/// The view, shared by the follower (which writes it) and the console (which reads it).
/// `generation` counts changes; the console adds it to the store's revision.
pub struct Cluster {
    view: RwLock<View>,
    generation: tokio::sync::watch::Sender<u64>,
    following: std::sync::atomic::AtomicBool,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            view: RwLock::new(View::default()),
            generation: tokio::sync::watch::channel(0).0,
            following: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Cluster {
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Whether a follower runs (then registrations of `/k8s/...` PUs must match a pod).
    pub fn is_following(&self) -> bool {
        self.following.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn services(&self) -> Vec<Service> {
        self.view.read().expect("lock poisoned").services.clone()
    }

    pub fn pod(&self, k8s_namespace: &str, name: &str) -> Option<PodInfo> {
        self.view
            .read()
            .expect("lock poisoned")
            .pods
            .get(&(k8s_namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Replaces the view; the generation moves only when something changed.
    pub fn set(&self, view: View) {
        let mut v = self.view.write().expect("lock poisoned");
        if *v != view {
            *v = view;
            drop(v);
            self.generation.send_modify(|g| *g += 1);
        }
    }
}

/// The segmesh Services of the cluster's Services, from their EndpointSlices. Headless
/// and ExternalName Services have no virtual address and are left out, and so are
/// ports of protocols other than TCP and UDP.
pub fn build(services: &[KubeService], slices: &[EndpointSlice], pods: &[Pod]) -> View {
    let mut out = Vec::new();
    for s in services {
        let (Some(ns), Some(name)) = (&s.metadata.namespace, &s.metadata.name) else {
            continue;
        };
        let Some(spec) = &s.spec else { continue };
        let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
        if ips.is_empty() {
            ips.extend(spec.cluster_ip.clone());
        }
        let addresses: Vec<IpAddr> = ips
            .iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .collect();
        if addresses.is_empty() || spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let Ok(namespace) = namespace_of(ns).parse::<NamespacePath>() else {
            continue;
        };
        let mine: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|e| {
                e.metadata.namespace.as_deref() == Some(ns.as_str())
                    && e.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        == Some(name)
            })
            .collect();
        let mut ports = Vec::new();
        for p in spec.ports.iter().flatten() {
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => continue,
            };
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            // The endpoints' port of the same name (a named targetPort is resolved per
            // pod by the cluster), else a numeric targetPort, else the port itself.
            let sliced = mine
                .iter()
                .flat_map(|e| e.ports.iter().flatten())
                .find(|ep| ep.name == p.name && ep.protocol == p.protocol)
                .and_then(|ep| ep.port)
                .and_then(|n| u16::try_from(n).ok());
            let numeric = match &p.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                    u16::try_from(*n).ok()
                }
                _ => None,
            };
            let target = sliced.or(numeric).unwrap_or(port);
            if ports
                .iter()
                .any(|o: &ServicePort| (o.protocol, o.port) == (protocol, port))
            {
                continue;
            }
            ports.push(ServicePort {
                protocol,
                port,
                target,
            });
        }
        if ports.is_empty() {
            continue;
        }
        let mut endpoints: Vec<IpAddr> = Vec::new();
        for e in &mine {
            for ep in &e.endpoints {
                // Not ready: left out (absent means ready).
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                for a in &ep.addresses {
                    if let Ok(ip) = a.parse::<IpAddr>() {
                        let ip = ip.to_canonical();
                        if !endpoints.contains(&ip) {
                            endpoints.push(ip);
                        }
                    }
                }
            }
        }
        out.push(Service {
            name: name.clone(),
            namespace,
            addresses,
            ports,
            endpoints: Endpoints::Addresses(endpoints),
        });
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let pods = pods
        .iter()
        .filter_map(|p| {
            let ns = p.metadata.namespace.clone()?;
            let name = p.metadata.name.clone()?;
            let status = p.status.as_ref();
            let mut ips: Vec<IpAddr> = status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.parse().ok())
                .collect();
            if ips.is_empty() {
                ips.extend(
                    status
                        .and_then(|s| s.pod_ip.as_ref())
                        .and_then(|i| i.parse::<IpAddr>().ok()),
                );
            }
            let labels = p.metadata.labels.clone().unwrap_or_default();
            let service_account = p
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into());
            Some((
                (ns, name),
                PodInfo {
                    ips: ips.into_iter().map(|i| i.to_canonical()).collect(),
                    labels,
                    service_account,
                },
            ))
        })
        .collect();
    View {
        services: out,
        pods,
    }
}

/// Follows the cluster until the task is dropped: the three watches feed stores, and
/// every change (gathered for `settle`) rebuilds the view. Every `resync` the watches
/// start over (a full list).
pub async fn follow(client: kube::Client, cluster: Arc<Cluster>, resync: Duration) {
    cluster
        .following
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let settle = Duration::from_millis(50);
    loop {
        let (services, w1) = reflector::store::<KubeService>();
        let (slices, w2) = reflector::store::<EndpointSlice>();
        let (pods, w3) = reflector::store::<Pod>();
        let cfg = watcher::Config::default();
        let s1 = watcher(kube::Api::<KubeService>::all(client.clone()), cfg.clone())
            .default_backoff()
            .reflect(w1)
            .map(|e| e.map(|_| ()));
        let s2 = watcher(kube::Api::<EndpointSlice>::all(client.clone()), cfg.clone())
            .default_backoff()
            .reflect(w2)
            .map(|e| e.map(|_| ()));
        let s3 = watcher(kube::Api::<Pod>::all(client.clone()), cfg)
            .default_backoff()
            .reflect(w3)
            .map(|e| e.map(|_| ()));
        let mut events = Box::pin(futures::stream::select(futures::stream::select(s1, s2), s3));
        let until = tokio::time::Instant::now() + resync;
        loop {
            let next = tokio::time::timeout_at(until, events.next()).await;
            match next {
                Err(_) => break,
                Ok(None) => {
                    tracing::warn!("the cluster's watches ended; starting over");
                    break;
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "cluster watch (retrying)");
                    continue;
                }
                Ok(Some(Ok(()))) => {}
            }
            // Gather what arrives together, then rebuild once (the stores hold only
            // complete lists after an initial list or relist).
            let _ = tokio::time::timeout(settle, async {
                while let Some(Ok(())) = events.next().await {}
            })
            .await;
            let view = build(&owned(&services), &owned(&slices), &owned(&pods));
            cluster.set(view);
        }
    }
}

fn owned<K>(s: &reflector::Store<K>) -> Vec<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    s.state().iter().map(|a| (**a).clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    /// Headless and ExternalName Services have no address to follow; SCTP ports are left
    /// out; a numeric targetPort is used without a slice; dual-stack addresses both
    /// count; not-ready endpoints are left out.
    #[test]
    fn services_from_the_cluster() {
        let services: Vec<KubeService> = vec![
            from_json(
                serde_json::json!({"metadata": {"name": "dns", "namespace": "kube-system"},
                "spec": {"clusterIPs": ["10.96.0.10", "fd00:96::10"], "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                    {"name": "sig", "port": 9, "protocol": "SCTP"}]}}),
            ),
            from_json(
                serde_json::json!({"metadata": {"name": "headless", "namespace": "shop"},
                "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
            ),
            from_json(
                serde_json::json!({"metadata": {"name": "ext", "namespace": "shop"},
                "spec": {"type": "ExternalName", "externalName": "example.com", "ports": [{"port": 80}]}}),
            ),
        ];
        let slices: Vec<EndpointSlice> = vec![from_json(serde_json::json!({
            "metadata": {"name": "dns-1", "namespace": "kube-system", "labels": {"kubernetes.io/service-name": "dns"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.2"]}, {"addresses": ["10.0.0.3"], "conditions": {"ready": false}}]
        }))];
        let pods: Vec<Pod> = vec![from_json(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
            "status": {"podIPs": [{"ip": "10.0.0.7"}, {"ip": "fd00::7"}]}
        }))];
        let v = build(&services, &slices, &pods);
        assert_eq!(v.services.len(), 1);
        let dns = &v.services[0];
        assert_eq!(dns.qualified_name(), "/k8s/kube-system:dns");
        assert_eq!(dns.addresses.len(), 2);
        assert_eq!(
            dns.ports,
            vec![
                ServicePort {
                    protocol: Protocol::Udp,
                    port: 53,
                    target: 5353
                },
                ServicePort {
                    protocol: Protocol::Tcp,
                    port: 53,
                    target: 53
                },
            ]
        );
        assert_eq!(
            dns.endpoints,
            Endpoints::Addresses(vec!["10.0.0.2".parse().unwrap()])
        );
        let web = &v.pods[&("shop".to_owned(), "web-1".to_owned())];
        assert_eq!(web.ips.len(), 2);
        assert_eq!(web.service_account, "default");
        assert_eq!(
            web.cluster_tags("shop"),
            vec!["@k8s:ns=shop", "@k8s:sa=default"]
        );
        // The generation moves only on a change.
        let c = Cluster::default();
        c.set(v.clone());
        c.set(v);
        assert_eq!(c.generation(), 1);
    }
}
