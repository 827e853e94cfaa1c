//! Sidecar injection for Kubernetes: `segmeshctl inject` on manifests, and the
//! console's mutating admission webhook (`POST /v1/admission`) on Pods.
//!
//! A pod template gets, after its own init containers (their traffic is not captured:
//! no enforcer runs yet), the `segmesh-init` init container that installs the capture
//! rules (NET_ADMIN, NET_RAW), the `segmesh-proxy` sidecar (uid 1337, which the rules
//! exclude; the console's address, a bootstrap token from a Secret, the PU name from the
//! pod's name, tags from the pod's labels, readiness on the admin port), two volumes
//! (the state folder, the console's CA from a ConfigMap) and annotations recording what
//! was added. Pods annotated `segmesh.io/inject: "false"` and pods already injected are
//! left alone, so injecting twice changes nothing.
//!
//! Probes: the kubelet probes from the node's address, which default deny refuses. The
//! app containers' `httpGet` (HTTP) and `tcpSocket` probes of the pod itself are
//! rewritten to `httpGet` on the enforcer's admin port at
//! `/app-health/<container>/<readiness|liveness|startup>`, and the originals go to the
//! enforcer (`SEGMESH_APP_PROBES`), which makes them on loopback — the way Istio
//! rewrites probes — so probes pass without opening the app to the node. Timing fields
//! stay. HTTPS, `exec` and `grpc` probes, probes of another host, and named ports the
//! container does not declare are left as they are; `segmesh.io/rewrite-probes:
//! "false"` opts a pod out.
//!
//! Documents that are not workloads, or that are left alone, are copied byte for byte
//! (comments included); a changed document is written anew by the YAML library, which
//! keeps key order but not comments inside that document.

use serde_json::{Value, json};

/// `segmesh.io/inject: "false"` on a pod template: never inject.
pub const INJECT_ANNOTATION: &str = "segmesh.io/inject";
/// Set on an injected pod template.
pub const INJECTED_ANNOTATION: &str = "segmesh.io/injected";
/// What was added, as JSON.
pub const STATUS_ANNOTATION: &str = "segmesh.io/status";
/// `segmesh.io/rewrite-probes: "false"`: leave the pod's probes as they are.
pub const REWRITE_PROBES_ANNOTATION: &str = "segmesh.io/rewrite-probes";
/// The enforcer's admin port, where rewritten probes go.
pub const ADMIN_PORT: u16 = 15020;

const PROXY: &str = "segmesh-proxy";
const INIT: &str = "segmesh-init";
const STATE_VOLUME: &str = "segmesh-state";
const CA_VOLUME: &str = "segmesh-console-ca";

#[derive(Debug, Clone)]
pub struct Options {
    /// The image holding `segmesh-proxy` and `segmesh-iptables-init`.
    pub image: String,
    /// The console's API as seen from pods.
    pub console: String,
    /// The Secret (key `token`) holding the bootstrap token.
    pub token_secret: String,
    /// The ConfigMap (key `ca.crt`) holding the console's CA.
    pub ca_configmap: String,
    /// The segmesh namespace of the PUs; default `/k8s/<kubernetes namespace>`.
    pub namespace: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: format!("segmesh/segmesh:{}", env!("CARGO_PKG_VERSION")),
            console: "https://segmesh-console.segmesh-system.svc:8443".into(),
            token_secret: "segmesh-bootstrap".into(),
            ca_configmap: "segmesh-console-ca".into(),
            namespace: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("document {0}: {1}")]
    Yaml(usize, String),
    #[error("{0}")]
    Invalid(String),
}

/// What to add to one pod template.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub init: Value,
    pub proxy: Value,
    pub volumes: Vec<Value>,
    pub annotations: Vec<(String, String)>,
    /// Probes rewritten to the admin port: (container index, field, new probe).
    pub probes: Vec<(usize, &'static str, Value)>,
}

const PROBE_FIELDS: [(&str, &str); 3] = [
    ("readinessProbe", "readiness"),
    ("livenessProbe", "liveness"),
    ("startupProbe", "startup"),
];

/// A port of a probe: a number, or a name the container declares.
fn probe_port(port: &Value, container: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(name) => name.parse().ok().or_else(|| {
            container["ports"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == name.as_str())?["containerPort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
        }),
        _ => None,
    }
}

/// What the enforcer makes instead of `probe` (an `httpGet` over HTTP or a `tcpSocket`
/// of the pod itself), or None to leave it alone.
fn app_probe(probe: &Value, container: &Value) -> Option<segmesh_api::AppProbe> {
    if let Some(h) = probe.get("httpGet") {
        let scheme = h["scheme"].as_str().unwrap_or("HTTP");
        if !scheme.eq_ignore_ascii_case("HTTP") || h.get("host").is_some() {
            return None;
        }
        let headers = h["httpHeaders"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| {
                Some((
                    x["name"].as_str()?.to_owned(),
                    x["value"].as_str()?.to_owned(),
                ))
            })
            .collect();
        return Some(segmesh_api::AppProbe::HttpGet {
            port: probe_port(&h["port"], container)?,
            path: h["path"].as_str().unwrap_or("/").to_owned(),
            headers,
        });
    }
    if let Some(t) = probe.get("tcpSocket") {
        if t.get("host").is_some() {
            return None;
        }
        return Some(segmesh_api::AppProbe::TcpSocket {
            port: probe_port(&t["port"], container)?,
        });
    }
    None
}

/// The pod's probes the enforcer makes instead: the rewrites and the originals by path.
fn rewrite_probes(spec: &Value) -> (Vec<(usize, &'static str, Value)>, segmesh_api::AppProbes) {
    let mut rewrites = Vec::new();
    let mut originals = segmesh_api::AppProbes::new();
    for (i, c) in spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let name = c["name"].as_str().unwrap_or_default();
        for (field, kind) in PROBE_FIELDS {
            let Some(probe) = c.get(field).filter(|p| p.is_object()) else {
                continue;
            };
            let Some(original) = app_probe(probe, c) else {
                continue;
            };
            let path = segmesh_api::app_probe_path(name, kind);
            let mut new = probe.clone();
            if let Some(m) = new.as_object_mut() {
                m.remove("tcpSocket");
                m.insert(
                    "httpGet".into(),
                    json!({ "path": path, "port": ADMIN_PORT, "scheme": "HTTP" }),
                );
            }
            rewrites.push((i, field, new));
            originals.insert(path, original);
        }
    }
    (rewrites, originals)
}

/// Why a pod template is left alone, or what to add to it.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Inject(Box<Plan>),
    OptedOut,
    AlreadyInjected,
    /// A container of the pod runs as the enforcer's uid: the capture rules would let
    /// its connections out whenever they carry the enforcer's mark, so such a pod is not
    /// injected (and the webhook refuses it). Holds the container's name.
    RunsAsProxyUid(String),
}

/// The uid the sidecar runs as; the capture init exempts it (with the enforcer's mark).
pub const PROXY_UID: u64 = 1337;

/// The first container (or init container) that runs as [`PROXY_UID`]: its own
/// `securityContext.runAsUser`, else the pod's.
fn runs_as_proxy_uid(spec: &Value) -> Option<String> {
    let pod_uid = spec["securityContext"]["runAsUser"].as_u64();
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().into_iter().flatten())
        .find(|c| c["securityContext"]["runAsUser"].as_u64().or(pod_uid) == Some(PROXY_UID))
        .map(|c| c["name"].as_str().unwrap_or("?").to_owned())
}

fn annotations(meta: &Value) -> &serde_json::Map<String, Value> {
    static EMPTY: std::sync::OnceLock<serde_json::Map<String, Value>> = std::sync::OnceLock::new();
    meta["annotations"]
        .as_object()
        .unwrap_or_else(|| EMPTY.get_or_init(serde_json::Map::new))
}

/// Plans the injection of a pod template (`metadata` and `spec` of a Pod or a
/// template); `k8s_namespace` is the document's namespace, if it says.
pub fn plan(template: &Value, k8s_namespace: Option<&str>, opts: &Options) -> Decision {
    let meta = &template["metadata"];
    let spec = &template["spec"];
    let ann = annotations(meta);
    if ann.get(INJECT_ANNOTATION).and_then(Value::as_str) == Some("false") {
        return Decision::OptedOut;
    }
    let named = |list: &Value, name: &str| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|c| c["name"] == name))
    };
    if ann.contains_key(INJECTED_ANNOTATION)
        || named(&spec["containers"], PROXY)
        || named(&spec["initContainers"], INIT)
    {
        return Decision::AlreadyInjected;
    }
    if let Some(c) = runs_as_proxy_uid(spec) {
        return Decision::RunsAsProxyUid(c);
    }
    let mut tags: Vec<String> = meta["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|v| format!("{k}={v}")))
        .collect();
    tags.sort();
    let namespace = opts.namespace.clone().unwrap_or_else(|| {
        format!(
            "/k8s/{}",
            k8s_namespace
                .or(meta["namespace"].as_str())
                .unwrap_or("default")
        )
    });
    let (probes, originals) =
        if ann.get(REWRITE_PROBES_ANNOTATION).and_then(Value::as_str) == Some("false") {
            (Vec::new(), segmesh_api::AppProbes::new())
        } else {
            rewrite_probes(spec)
        };
    let init = json!({
        "name": INIT,
        "image": opts.image,
        "command": ["segmesh-iptables-init"],
        "args": ["--mode", "sidecar", "--proxy-uid", "1337"],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] }
        }
    });
    let proxy = json!({
        "name": PROXY,
        "image": opts.image,
        "command": ["segmesh-proxy"],
        "env": [
            { "name": "SEGMESH_CONSOLE", "value": opts.console },
            { "name": "SEGMESH_CONSOLE_CA", "value": "/etc/segmesh/console/ca.crt" },
            { "name": "SEGMESH_BOOTSTRAP_TOKEN",
              "valueFrom": { "secretKeyRef": { "name": opts.token_secret, "key": "token" } } },
            { "name": "SEGMESH_PU_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
            { "name": "SEGMESH_NAMESPACE", "value": namespace },
            { "name": "SEGMESH_TAGS", "value": tags.join(",") },
            { "name": "SEGMESH_STATE_DIR", "value": "/var/lib/segmesh" }
        ],
        "ports": [
            { "name": "segmesh-tunnel", "containerPort": 15008 },
            { "name": "segmesh-admin", "containerPort": 15020 }
        ],
        "readinessProbe": { "httpGet": { "path": "/ready", "port": 15020 }, "periodSeconds": 2 },
        "livenessProbe": { "httpGet": { "path": "/healthz", "port": 15020 }, "periodSeconds": 10 },
        "securityContext": {
            "runAsUser": 1337,
            "runAsGroup": 1337,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            // NET_BIND_SERVICE: UDP answers leave from the original destination, which
            // may be a port below 1024 (DNS). BPF (with NET_ADMIN): the kernel relay's
            // verdict program and maps; without it the enforcer splices.
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE", "BPF"], "drop": ["ALL"] }
        },
        "volumeMounts": [
            { "name": STATE_VOLUME, "mountPath": "/var/lib/segmesh" },
            { "name": CA_VOLUME, "mountPath": "/etc/segmesh/console", "readOnly": true }
        ]
    });
    let mut proxy = proxy;
    if !originals.is_empty() {
        if let Some(env) = proxy["env"].as_array_mut() {
            env.push(json!({
                "name": "SEGMESH_APP_PROBES",
                "value": serde_json::to_string(&originals).expect("probes serialize"),
            }));
        }
    }
    let volumes = vec![
        json!({ "name": STATE_VOLUME, "emptyDir": {} }),
        json!({ "name": CA_VOLUME, "configMap": { "name": opts.ca_configmap } }),
    ];
    let status = json!({
        "initContainers": [INIT],
        "containers": [PROXY],
        "volumes": [STATE_VOLUME, CA_VOLUME],
        "image": opts.image,
        "namespace": namespace,
        "probes": originals.keys().collect::<Vec<_>>(),
    });
    Decision::Inject(Box::new(Plan {
        init,
        proxy,
        volumes,
        annotations: vec![
            (INJECTED_ANNOTATION.into(), "true".into()),
            (STATUS_ANNOTATION.into(), status.to_string()),
        ],
        probes,
    }))
}

/// JSON Patch (RFC 6902) operations applying `plan` to a Pod.
pub fn patch(pod: &Value, plan: &Plan) -> Vec<Value> {
    let mut ops = Vec::new();
    let spec = &pod["spec"];
    for (i, field, probe) in &plan.probes {
        ops.push(json!({ "op": "replace", "path": format!("/spec/containers/{i}/{field}"), "value": probe }));
    }
    let mut list = |path: &str, present: bool, items: Vec<Value>| {
        if present {
            for i in items {
                ops.push(json!({ "op": "add", "path": format!("{path}/-"), "value": i }));
            }
        } else {
            ops.push(json!({ "op": "add", "path": path, "value": items }));
        }
    };
    list(
        "/spec/initContainers",
        spec["initContainers"].is_array(),
        vec![plan.init.clone()],
    );
    list(
        "/spec/containers",
        spec["containers"].is_array(),
        vec![plan.proxy.clone()],
    );
    list(
        "/spec/volumes",
        spec["volumes"].is_array(),
        plan.volumes.clone(),
    );
    if pod["metadata"]["annotations"].is_object() {
        for (k, v) in &plan.annotations {
            let key = k.replace('~', "~0").replace('/', "~1");
            ops.push(
                json!({ "op": "add", "path": format!("/metadata/annotations/{key}"), "value": v }),
            );
        }
    } else {
        let map: serde_json::Map<String, Value> = plan
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        ops.push(json!({ "op": "add", "path": "/metadata/annotations", "value": map }));
    }
    ops
}

/// The path (keys) from a document to its pod template, by kind.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    })
}

use serde_norway::Value as Yaml;

fn yaml(v: &Value) -> Yaml {
    serde_norway::to_value(v).expect("JSON values are YAML values")
}

fn get_mut<'a>(v: &'a mut Yaml, key: &str) -> &'a mut Yaml {
    let m = match v {
        Yaml::Mapping(m) => m,
        other => {
            *other = Yaml::Mapping(Default::default());
            match other {
                Yaml::Mapping(m) => m,
                _ => unreachable!(),
            }
        }
    };
    if !m.contains_key(key) {
        m.insert(Yaml::String(key.into()), Yaml::Null);
    }
    m.get_mut(key).expect("just inserted")
}

fn push(v: &mut Yaml, items: impl IntoIterator<Item = Yaml>) {
    if !matches!(v, Yaml::Sequence(_)) {
        *v = Yaml::Sequence(Vec::new());
    }
    if let Yaml::Sequence(s) = v {
        s.extend(items);
    }
}

/// Applies `plan` to a pod template in place.
fn apply_plan(template: &mut Yaml, plan: &Plan) {
    let spec = get_mut(template, "spec");
    if let Yaml::Sequence(containers) = get_mut(spec, "containers") {
        for (i, field, probe) in &plan.probes {
            if let Some(c) = containers.get_mut(*i) {
                *get_mut(c, field) = yaml(probe);
            }
        }
    }
    push(get_mut(spec, "initContainers"), [yaml(&plan.init)]);
    push(get_mut(spec, "containers"), [yaml(&plan.proxy)]);
    push(get_mut(spec, "volumes"), plan.volumes.iter().map(yaml));
    let ann = get_mut(get_mut(template, "metadata"), "annotations");
    for (k, v) in &plan.annotations {
        *get_mut(ann, k) = Yaml::String(v.clone());
    }
}

/// What happened to one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub kind: String,
    pub name: String,
    /// `injected`, `opted out`, `already injected`.
    pub outcome: &'static str,
}

/// Injects into one document (a workload or a `List`); true if it changed.
fn inject_value(
    doc: &mut Yaml,
    opts: &Options,
    reports: &mut Vec<Report>,
    refused: &mut Vec<String>,
) -> bool {
    let json: Value = serde_json::to_value(&*doc).unwrap_or_default();
    let kind = json["kind"].as_str().unwrap_or_default().to_owned();
    if kind == "List" || kind.ends_with("List") {
        let mut changed = false;
        if let Some(Yaml::Sequence(items)) = doc.get_mut("items") {
            for item in items {
                changed |= inject_value(item, opts, reports, refused);
            }
        }
        return changed;
    }
    let Some(path) = template_path(&kind) else {
        return false;
    };
    let name = json["metadata"]["name"].as_str().unwrap_or("?").to_owned();
    let ns = json["metadata"]["namespace"].as_str().map(str::to_owned);
    let mut t = &json;
    for k in path {
        t = &t[*k];
    }
    let outcome = match plan(t, ns.as_deref(), opts) {
        Decision::RunsAsProxyUid(c) => {
            refused.push(format!(
                "{kind} {name}: container `{c}` runs as uid {PROXY_UID}, the enforcer's; give it another runAsUser"
            ));
            "refused"
        }
        Decision::OptedOut => "opted out",
        Decision::AlreadyInjected => "already injected",
        Decision::Inject(p) => {
            let mut target = &mut *doc;
            for k in path {
                target = get_mut(target, k);
            }
            apply_plan(target, &p);
            "injected"
        }
    };
    reports.push(Report {
        kind,
        name,
        outcome,
    });
    outcome == "injected"
}

/// Splits a YAML stream into documents, keeping each one's exact text (separators
/// included) so unchanged documents can be copied byte for byte.
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let is_sep =
            line.starts_with("---") && line[3..].chars().next().is_none_or(char::is_whitespace);
        if is_sep && offset > start {
            docs.push(&text[start..offset]);
            start = offset;
        }
        offset += line.len();
    }
    if start < text.len() {
        docs.push(&text[start..]);
    }
    docs
}

/// Injects into every workload of a manifest stream; returns the new stream and what
/// happened to each workload.
pub fn inject_stream(text: &str, opts: &Options) -> Result<(String, Vec<Report>), InjectError> {
    let mut out = String::with_capacity(text.len() * 2);
    let mut reports = Vec::new();
    let mut refused = Vec::new();
    for (i, raw) in split_documents(text).into_iter().enumerate() {
        let body = raw
            .strip_prefix("---")
            .map(|r| r.split_once('\n').map_or("", |(_, b)| b))
            .unwrap_or(raw);
        let mut doc: Yaml = match serde_norway::from_str(body) {
            Ok(d) => d,
            Err(e) => return Err(InjectError::Yaml(i + 1, e.to_string())),
        };
        if !inject_value(&mut doc, opts, &mut reports, &mut refused) {
            out.push_str(raw);
            continue;
        }
        if raw.starts_with("---") {
            out.push_str("---\n");
        }
        out.push_str(
            &serde_norway::to_string(&doc).map_err(|e| InjectError::Yaml(i + 1, e.to_string()))?,
        );
    }
    // Nothing half-injected: one refused workload refuses the whole stream.
    if !refused.is_empty() {
        return Err(InjectError::Invalid(refused.join("\n")));
    }
    Ok((out, reports))
}

/// Answers an `admission.k8s.io/v1` AdmissionReview for a Pod: allowed, with a JSON
/// Patch when it injects.
pub fn review(request: &Value, opts: &Options) -> Result<Value, InjectError> {
    if request["apiVersion"] != "admission.k8s.io/v1" || request["kind"] != "AdmissionReview" {
        return Err(InjectError::Invalid(
            "expected an admission.k8s.io/v1 AdmissionReview".into(),
        ));
    }
    let req = &request["request"];
    let uid = req["uid"]
        .as_str()
        .ok_or_else(|| InjectError::Invalid("request.uid is missing".into()))?;
    let mut response = json!({ "uid": uid, "allowed": true });
    let pod = &req["object"];
    if req["kind"]["kind"] == "Pod" && pod.is_object() {
        match plan(pod, req["namespace"].as_str(), opts) {
            Decision::Inject(p) => {
                use base64::Engine as _;
                let ops = Value::Array(patch(pod, &p));
                response["patchType"] = json!("JSONPatch");
                response["patch"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(ops.to_string()));
            }
            Decision::RunsAsProxyUid(c) => {
                response["allowed"] = json!(false);
                response["status"] = json!({
                    "code": 403,
                    "message": format!(
                        "segmesh: container `{c}` runs as uid {PROXY_UID}, the enforcer's uid, which the capture rules exempt; give it another runAsUser (or opt out with {INJECT_ANNOTATION}: \"false\")"
                    ),
                });
            }
            Decision::OptedOut | Decision::AlreadyInjected => {}
        }
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

#[cfg(test)]
mod tests;
