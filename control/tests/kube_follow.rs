//! The console following a cluster, against a small fake Kubernetes API server that
//! answers list and watch the way the API does (API concepts, "Efficient detection of
//! changes": a list carries `metadata.resourceVersion`; `?watch=true&resourceVersion=N`
//! streams `{"type": "ADDED"|"MODIFIED"|"DELETED"|"ERROR", "object": …}` lines of what
//! changed after N; an expired version is answered with an ERROR event holding a 410
//! `Status`). Services, EndpointSlices and Pods are listed, then watched; the test
//! changes them, drops every watch, and expires the resource version.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use segmesh_control::console::{Console, ConsoleError, Registration};
use segmesh_control::store::{RedbStore, Role};
use segmesh_identity::{Ca, KeyAlgorithm, WorkloadKey};
use segmesh_policy::NamespacePath;
use serde_json::{Value, json};

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const PODS: &str = "/api/v1/pods";

fn kind_of(resource: &str) -> (&'static str, &'static str) {
    match resource {
        SERVICES => ("v1", "Service"),
        SLICES => ("discovery.k8s.io/v1", "EndpointSlice"),
        _ => ("v1", "Pod"),
    }
}

struct Event {
    rv: u64,
    resource: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(String, String, String), Value>,
    history: Vec<Event>,
}

/// The fake API server's data, shared with the test.
struct Fake {
    state: Mutex<State>,
    /// A new event (its resource version).
    tx: tokio::sync::broadcast::Sender<u64>,
    /// Bumped to drop every open watch.
    drop_watches: tokio::sync::watch::Sender<u64>,
    /// The next watch is answered "resource version too old".
    expire_next: AtomicBool,
    watches: std::sync::atomic::AtomicUsize,
    lists: std::sync::atomic::AtomicUsize,
}

impl Fake {
    fn new() -> Arc<Fake> {
        Arc::new(Fake {
            state: Mutex::new(State::default()),
            tx: tokio::sync::broadcast::channel(1024).0,
            drop_watches: tokio::sync::watch::channel(0).0,
            expire_next: AtomicBool::new(false),
            watches: Default::default(),
            lists: Default::default(),
        })
    }

    fn put(&self, resource: &str, mut object: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let (api, kind) = kind_of(resource);
        object["apiVersion"] = json!(api);
        object["kind"] = json!(kind);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = (
            resource.to_owned(),
            object["metadata"]["namespace"].as_str().unwrap().to_owned(),
            object["metadata"]["name"].as_str().unwrap().to_owned(),
        );
        let kind = if s.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects.insert(key, object.clone());
        s.history.push(Event {
            rv,
            resource: resource.to_owned(),
            kind,
            object,
        });
        let _ = self.tx.send(rv);
    }

    fn delete(&self, resource: &str, ns: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        let Some(mut object) =
            s.objects
                .remove(&(resource.to_owned(), ns.to_owned(), name.to_owned()))
        else {
            return;
        };
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.history.push(Event {
            rv,
            resource: resource.to_owned(),
            kind: "DELETED",
            object,
        });
        let _ = self.tx.send(rv);
    }

    /// The events of `resource` after `since`, as watch lines.
    fn after(&self, resource: &str, since: u64) -> (Vec<String>, u64) {
        let s = self.state.lock().unwrap();
        let lines = s
            .history
            .iter()
            .filter(|e| e.rv > since && e.resource == resource)
            .map(|e| format!("{}\n", json!({"type": e.kind, "object": e.object})))
            .collect();
        (lines, s.rv)
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(status: u16, v: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

async fn handle(req: Request<Incoming>, fake: Arc<Fake>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if ![SERVICES, SLICES, PODS].contains(&path.as_str()) {
        return Ok(full(
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
        ));
    }
    if query.get("watch").map(String::as_str) != Some("true") {
        fake.lists.fetch_add(1, Ordering::SeqCst);
        let s = fake.state.lock().unwrap();
        let (api, kind) = kind_of(&path);
        let items: Vec<&Value> = s
            .objects
            .iter()
            .filter(|((r, _, _), _)| *r == path)
            .map(|(_, v)| v)
            .collect();
        return Ok(full(
            200,
            json!({"apiVersion": api, "kind": format!("{kind}List"), "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
        ));
    }
    fake.watches.fetch_add(1, Ordering::SeqCst);
    if fake.expire_next.swap(false, Ordering::SeqCst) {
        let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version: 1 (99)", "reason": "Expired", "code": 410}});
        return Ok(full(200, status));
    }
    let mut since: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let mut events = fake.tx.subscribe();
    let mut dropped = fake.drop_watches.subscribe();
    dropped.borrow_and_update();
    let feed = fake.clone();
    tokio::spawn(async move {
        let limit = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (lines, now) = feed.after(&path, since);
            since = now;
            for l in lines {
                if tx.send(Bytes::from(l)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                r = events.recv() => if let Err(tokio::sync::broadcast::error::RecvError::Closed) = r { return },
                _ = dropped.changed() => return,
                _ = tokio::time::sleep_until(limit) => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Ok(Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap())
}

async fn serve(fake: Arc<Fake>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let fake = fake.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| handle(r, fake.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

fn pod(name: &str, ip: &str, app: &str, sa: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
        "spec": {"serviceAccountName": sa, "containers": [{"name": app, "image": "shop/app:1"}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn service(name: &str, ip: &str, port: u16, target: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": target}]}
    })
}

fn slice(name: &str, service: &str, port: u16, ready: &[(&str, bool)]) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": ready.iter().map(|(ip, r)| json!({"addresses": [ip], "conditions": {"ready": r}})).collect::<Vec<_>>()
    })
}

/// The Services enforcers of `/k8s/shop` get: (name, addresses, port → target, endpoints).
fn pushed(c: &Console<RedbStore>) -> Vec<(String, String, String, Vec<String>)> {
    c.snapshot_for(&"/k8s/shop".parse().unwrap())
        .unwrap()
        .services
        .into_iter()
        .map(|s| {
            (
                s.name,
                s.addresses
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                s.ports
                    .iter()
                    .map(|p| format!("{}->{}", p.port, p.target))
                    .collect::<Vec<_>>()
                    .join(","),
                s.endpoints.iter().map(|e| e.ip.to_string()).collect(),
            )
        })
        .collect()
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_follows_services_endpoints_and_pods() {
    let fake = Fake::new();
    fake.put(PODS, pod("api-1", "10.0.0.11", "api", "api"));
    fake.put(PODS, pod("api-2", "10.0.0.12", "api", "api"));
    fake.put(SERVICES, service("api", "10.96.0.10", 80, "http"));
    fake.put(
        SLICES,
        slice(
            "api-x1",
            "api",
            8080,
            &[
                ("10.0.0.11", true),
                ("10.0.0.12", true),
                ("10.0.0.13", false),
            ],
        ),
    );
    let addr = serve(fake.clone()).await;
    let dir = std::env::temp_dir().join(format!("segmesh-kube-follow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let console = Arc::new(Console::new(RedbStore::open(&dir).unwrap()));
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    segmesh_identity::tls::install_default_provider();
    let client = kube::Client::try_from(config).unwrap();
    let follower = tokio::spawn(segmesh_control::cluster::follow(
        client,
        console.cluster.clone(),
        Duration::from_secs(600),
    ));

    // Listed: the Service with its ready endpoints and the slice's target port.
    let want = |eps: &[&str]| {
        vec![(
            "/k8s/shop:api".to_owned(),
            "10.96.0.10".to_owned(),
            "80->8080".to_owned(),
            eps.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )]
    };
    until("the listed Service", || {
        pushed(&console) == want(&["10.0.0.11", "10.0.0.12"])
    })
    .await;
    let revision = console.revision().unwrap();

    // A watch event: an endpoint no longer ready.
    fake.put(
        SLICES,
        slice(
            "api-x1",
            "api",
            8080,
            &[("10.0.0.11", true), ("10.0.0.12", false)],
        ),
    );
    until("the watched change", || {
        pushed(&console) == want(&["10.0.0.11"])
    })
    .await;
    assert!(
        console.revision().unwrap() > revision,
        "enforcers are woken"
    );

    // Every watch dropped: they resume from their resource version, nothing is listed
    // again, and what changed meanwhile arrives.
    let lists = fake.lists.load(Ordering::SeqCst);
    fake.drop_watches.send_modify(|n| *n += 1);
    fake.put(SERVICES, service("db", "10.96.0.20", 5432, "5432"));
    until("the Service added while the watches were down", || {
        pushed(&console)
            .iter()
            .any(|s| s.0 == "/k8s/shop:db" && s.2 == "5432->5432")
    })
    .await;
    assert_eq!(
        fake.lists.load(Ordering::SeqCst),
        lists,
        "resumed, not relisted"
    );

    // "Resource version too old": the watcher lists again, and the deletion it missed
    // is repaired.
    fake.expire_next.store(true, Ordering::SeqCst);
    fake.drop_watches.send_modify(|n| *n += 1);
    fake.delete(SERVICES, "shop", "db");
    until("the relist after a 410", || {
        fake.lists.load(Ordering::SeqCst) > lists
            && !pushed(&console).iter().any(|s| s.0 == "/k8s/shop:db")
    })
    .await;

    // A pod registers: certified with what the cluster says (its labels as the token
    // allows, its namespace and service account), never its claims; only from its own
    // address; a name the cluster does not know is refused.
    let ca = Ca::new_root("segmesh.local", KeyAlgorithm::EcdsaP256).unwrap();
    let admin = console
        .create_token(None, "admin", Role::Editor, &NamespacePath::root())
        .unwrap();
    let admin = console.authenticate(&admin).unwrap();
    let boot = console
        .create_bootstrap_token(&admin, "pods", &"/k8s".parse().unwrap(), &["app=*".into()])
        .unwrap();
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let req = |name: &str, ip: &str, tags: &[&str]| Registration {
        name: name.into(),
        namespace: "/k8s/shop".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ips: vec![ip.parse().unwrap()],
        csr: key.csr_pem(name).unwrap(),
        renew: false,
    };
    let issued = console
        .register(
            &boot,
            &ca,
            &req("api-1", "10.0.0.11", &["app=db", "role=admin"]),
        )
        .unwrap();
    assert!(
        issued.tags.contains(&"app=api".to_owned()),
        "{:?}",
        issued.tags
    );
    assert!(issued.tags.contains(&"@k8s:ns=shop".to_owned()));
    assert!(issued.tags.contains(&"@k8s:sa=api".to_owned()));
    assert!(!issued.tags.contains(&"app=db".to_owned()));
    assert_eq!(issued.dropped, vec!["app=db", "role=admin"]);
    assert!(matches!(
        console.register(&boot, &ca, &req("api-2", "10.0.0.99", &[])),
        Err(ConsoleError::Forbidden(_))
    ));
    assert!(matches!(
        console.register(&boot, &ca, &req("ghost", "10.0.0.50", &[])),
        Err(ConsoleError::Forbidden(_))
    ));
    // A watched label change: the pod's next registration is certified with it.
    let mut relabelled = pod("api-2", "10.0.0.12", "api", "api");
    relabelled["metadata"]["labels"]["tier"] = json!("gold");
    fake.put(PODS, relabelled);
    let boot2 = console
        .create_bootstrap_token(
            &admin,
            "pods-tier",
            &"/k8s".parse().unwrap(),
            &["app=*".into(), "tier=*".into()],
        )
        .unwrap();
    until("the relabelled pod", || {
        console
            .cluster
            .pod("shop", "api-2")
            .is_some_and(|p| p.labels.get("tier").map(String::as_str) == Some("gold"))
    })
    .await;
    let issued = console
        .register(&boot2, &ca, &req("api-2", "10.0.0.12", &[]))
        .unwrap();
    assert!(
        issued.tags.contains(&"tier=gold".to_owned()),
        "{:?}",
        issued.tags
    );
    // Relabelled again: the certificate renewal carries the cluster's labels as they
    // are now (through the token that registered the pod).
    let mut relabelled = pod("api-2", "10.0.0.12", "api", "api");
    relabelled["metadata"]["labels"]["tier"] = json!("platinum");
    fake.put(PODS, relabelled);
    until("the relabelled pod again", || {
        console
            .cluster
            .pod("shop", "api-2")
            .is_some_and(|p| p.labels.get("tier").map(String::as_str) == Some("platinum"))
    })
    .await;
    let chain = segmesh_identity::ca::certs_from_pem(&issued.chain).unwrap();
    let holder = segmesh_identity::WorkloadIdentity::from_cert(&chain[0]).unwrap();
    let renewed = console
        .renew_by_certificate(
            &holder,
            &ca,
            &Registration {
                renew: true,
                ..req("api-2", "10.0.0.12", &[])
            },
        )
        .unwrap();
    assert!(
        renewed.tags.contains(&"tier=platinum".to_owned()),
        "{:?}",
        renewed.tags
    );
    assert!(!renewed.tags.contains(&"tier=gold".to_owned()));
    assert!(renewed.tags.contains(&"@k8s:sa=api".to_owned()));
    // The registered pod is its Service's endpoint as a PU.
    let snap = console.snapshot_for(&"/k8s/shop".parse().unwrap()).unwrap();
    assert_eq!(
        snap.services[0].endpoints[0].pu.as_deref(),
        Some("/k8s/shop:api-1")
    );
    follower.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The console binary with `--kubeconfig`: it follows the cluster the file names, and
/// `segmeshctl get services` shows the cluster's Services with their endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segmesh_control_follows_the_cluster_of_a_kubeconfig() {
    let fake = Fake::new();
    fake.put(SERVICES, service("api", "10.96.0.10", 80, "8080"));
    fake.put(SLICES, slice("api-x1", "api", 8080, &[("10.0.0.11", true)]));
    let addr = serve(fake.clone()).await;
    let dir = std::env::temp_dir().join(format!("segmesh-kube-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{addr}'}}}}]\n\
             users: [{{name: fake, user: {{token: not-checked}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = dir.join("data");
    let mut console = std::process::Command::new(env!("CARGO_BIN_EXE_segmesh-control"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let get = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_segmeshctl"))
            .args(["get", "services"])
            .env("SEGMESH_CONSOLE", format!("https://127.0.0.1:{port}"))
            .env(
                "SEGMESH_TOKEN",
                format!("@{}", data.join("admin.token").display()),
            )
            .env("SEGMESH_CA", data.join("ca/bundle.crt"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = String::new();
    while !out
        .contains("/k8s/shop:api  addresses 10.96.0.10  ports tcp/80->8080  endpoints 10.0.0.11")
    {
        if Instant::now() > deadline {
            let _ = console.kill();
            panic!("segmeshctl get services: {out}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = get();
    }
    let _ = console.kill();
    let _ = console.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
