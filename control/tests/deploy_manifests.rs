//! The Kubernetes manifests of `deploy/kubernetes/` and what `segmeshctl inject` makes of
//! `examples/kubernetes/shop.yaml`:
//! - every document read into the Kubernetes API's own types (k8s-openapi) and written
//!   back unchanged, so no field is misspelt, misplaced or of the wrong type;
//! - `kubectl apply --dry-run=client` on each, against a small fake API server that
//!   answers API discovery and "not found" for every object (kubectl needs a server to
//!   map kinds to resources even for a client dry run; with no server's OpenAPI
//!   document here, kubectl's own schema validation is off and the round trip above
//!   stands in for it).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The documents of a YAML stream, as JSON.
fn documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|d| serde_json::to_value(serde_norway::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// `doc` read as its kind's API type and written back.
fn round_trip(doc: &Value) -> Value {
    use k8s_openapi::api::{
        admissionregistration::v1 as adm, apps::v1 as apps, core::v1 as core, rbac::v1 as rbac,
    };
    fn rt<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Value {
        let typed: T =
            serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc:#}"));
        serde_json::to_value(typed).unwrap()
    }
    match doc["kind"].as_str().unwrap_or_default() {
        "Namespace" => rt::<core::Namespace>(doc),
        "ServiceAccount" => rt::<core::ServiceAccount>(doc),
        "Service" => rt::<core::Service>(doc),
        "Secret" => rt::<core::Secret>(doc),
        "PersistentVolumeClaim" => rt::<core::PersistentVolumeClaim>(doc),
        "Deployment" => rt::<apps::Deployment>(doc),
        "StatefulSet" => rt::<apps::StatefulSet>(doc),
        "ClusterRole" => rt::<rbac::ClusterRole>(doc),
        "ClusterRoleBinding" => rt::<rbac::ClusterRoleBinding>(doc),
        "MutatingWebhookConfiguration" => rt::<adm::MutatingWebhookConfiguration>(doc),
        other => panic!("no API type for kind {other}: {doc:#}"),
    }
}

/// The first place where `back` (the round trip) lost or changed something of `doc`.
/// Fields the API types add (`apiVersion` and `kind` of embedded objects) are fine.
fn lost(doc: &Value, back: &Value, at: String) -> Option<String> {
    match (doc, back) {
        (Value::Object(d), Value::Object(b)) => d.iter().find_map(|(k, v)| match b.get(k) {
            None => Some(format!("{at}.{k}")),
            Some(bv) => lost(v, bv, format!("{at}.{k}")),
        }),
        (Value::Array(d), Value::Array(b)) if d.len() == b.len() => d
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| lost(x, y, format!("{at}[{i}]"))),
        _ if doc == back => None,
        _ => Some(at),
    }
}

/// The files to check: (name, text).
fn manifests() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "the deploy manifests: {files:?}");
    for f in files {
        out.push((
            f.display().to_string(),
            std::fs::read_to_string(&f).unwrap(),
        ));
    }
    let shop = std::fs::read_to_string(root().join("examples/kubernetes/shop.yaml")).unwrap();
    let (injected, reports) =
        segmesh_control::inject::inject_stream(&shop, &Default::default()).unwrap();
    assert!(reports.iter().any(|r| r.outcome == "injected"));
    out.push((
        "segmeshctl inject examples/kubernetes/shop.yaml".into(),
        injected,
    ));
    out
}

#[test]
fn manifests_are_what_the_api_types_say() {
    // The check itself: a misspelt field is found.
    let typo = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                      "spec": {"replica": 3, "selector": {}, "template": {}}});
    assert_eq!(
        lost(&typo, &round_trip(&typo), String::new()).as_deref(),
        Some(".spec.replica")
    );
    for (name, text) in manifests() {
        let docs = documents(&text);
        assert!(!docs.is_empty(), "{name}");
        for doc in docs {
            let back = round_trip(&doc);
            if let Some(path) = lost(&doc, &back, String::new()) {
                panic!(
                    "{name}: `{path}` is not a field of the API's type, or not of its type: {doc:#}"
                );
            }
        }
    }
}

/// API discovery (the legacy shape every kubectl reads), for the kinds the manifests use.
fn discovery(path: &str) -> Option<Value> {
    let res = |name: &str, kind: &str, namespaced: bool| {
        json!({"name": name, "singularName": kind.to_lowercase(), "namespaced": namespaced, "kind": kind,
               "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
    };
    let list = |gv: &str, resources: Vec<Value>| json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources});
    let group = |name: &str| {
        json!({"name": name, "versions": [{"groupVersion": format!("{name}/v1"), "version": "v1"}],
               "preferredVersion": {"groupVersion": format!("{name}/v1"), "version": "v1"}})
    };
    Some(match path {
        "/version" => {
            json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0", "platform": "linux/amd64"})
        }
        "/api" => json!({"kind": "APIVersions", "versions": ["v1"],
                         "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            group("apps"), group("rbac.authorization.k8s.io"),
            group("admissionregistration.k8s.io"), group("discovery.k8s.io")]}),
        "/api/v1" => list(
            "v1",
            vec![
                res("namespaces", "Namespace", false),
                res("serviceaccounts", "ServiceAccount", true),
                res("services", "Service", true),
                res("secrets", "Secret", true),
                res("configmaps", "ConfigMap", true),
                res("persistentvolumeclaims", "PersistentVolumeClaim", true),
                res("pods", "Pod", true),
            ],
        ),
        "/apis/apps/v1" => list(
            "apps/v1",
            vec![
                res("deployments", "Deployment", true),
                res("statefulsets", "StatefulSet", true),
                res("daemonsets", "DaemonSet", true),
            ],
        ),
        "/apis/rbac.authorization.k8s.io/v1" => list(
            "rbac.authorization.k8s.io/v1",
            vec![
                res("clusterroles", "ClusterRole", false),
                res("clusterrolebindings", "ClusterRoleBinding", false),
            ],
        ),
        "/apis/admissionregistration.k8s.io/v1" => list(
            "admissionregistration.k8s.io/v1",
            vec![res(
                "mutatingwebhookconfigurations",
                "MutatingWebhookConfiguration",
                false,
            )],
        ),
        "/apis/discovery.k8s.io/v1" => list(
            "discovery.k8s.io/v1",
            vec![res("endpointslices", "EndpointSlice", true)],
        ),
        _ => return None,
    })
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match discovery(req.uri().path()) {
        Some(v) => (200, v),
        // Every object is new: apply creates it.
        None => (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "not found", "reason": "NotFound", "code": 404}),
        ),
    };
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap())
}

#[test]
fn kubectl_dry_run_accepts_the_manifests() {
    let kubectl = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output();
    assert!(
        kubectl.is_ok_and(|o| o.status.success()),
        "kubectl is needed (scripts/install-deps installs Debian's kubernetes-client)"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr: SocketAddr = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(answer))
                        .await;
                });
            }
        });
        addr
    });
    let dir = std::env::temp_dir().join(format!("segmesh-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{addr}'}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    for (i, (name, text)) in manifests().into_iter().enumerate() {
        let file = dir.join(format!("{i}.yaml"));
        std::fs::write(&file, &text).unwrap();
        let out = std::process::Command::new("kubectl")
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", &dir)
            .args(["apply", "--dry-run=client", "--validate=false", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "kubectl apply --dry-run=client {name}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let docs = documents(&text).len();
        assert_eq!(
            stdout.lines().filter(|l| l.contains("dry run")).count(),
            docs,
            "{name}: {stdout}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
