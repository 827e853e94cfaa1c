use super::*;

const DEPLOYMENT: &str = r#"# The shop's frontend.
apiVersion: v1
kind: Service
metadata:
  name: web   # keep this comment
spec:
  selector: {app: web}
  ports: [{port: 443}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels:
        app: web
        env: prod
    spec:
      initContainers:
        - name: migrate
          image: shop/migrate:1.4
      containers:
        - name: web
          image: shop/web:2.1
          ports: [{containerPort: 443}]
        - name: log-shipper
          image: fluent/fluent-bit:3.0
      volumes:
        - name: config
          configMap: {name: web-config}
---
# A ConfigMap, untouched.
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config}
data:
  greeting: hello
"#;

fn opts() -> Options {
    Options {
        console: "https://console.segmesh:8443".into(),
        ..Options::default()
    }
}

fn docs(text: &str) -> Vec<serde_json::Value> {
    split_documents(text)
        .into_iter()
        .map(|d| {
            let y: serde_norway::Value =
                serde_norway::from_str(d.trim_start_matches("---\n")).unwrap();
            serde_json::to_value(y).unwrap()
        })
        .collect()
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

fn env<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap()
}

#[test]
fn a_deployment_gets_the_init_container_and_the_sidecar_and_the_rest_is_untouched() {
    let (out, reports) = inject_stream(DEPLOYMENT, &opts()).unwrap();
    assert_eq!(
        reports,
        vec![Report {
            kind: "Deployment".into(),
            name: "web".into(),
            outcome: "injected"
        }]
    );
    let parts = split_documents(&out);
    let before = split_documents(DEPLOYMENT);
    assert_eq!(parts.len(), 3);
    assert_eq!(
        parts[0], before[0],
        "the Service is copied byte for byte, comments included"
    );
    assert_eq!(parts[2], before[2], "the ConfigMap too");
    let d = &docs(&out)[1];
    let t = &d["spec"]["template"];
    assert_eq!(
        names(&t["spec"]["initContainers"]),
        ["migrate", "segmesh-init"]
    );
    assert_eq!(
        names(&t["spec"]["containers"]),
        ["web", "log-shipper", "segmesh-proxy"]
    );
    assert_eq!(
        names(&t["spec"]["volumes"]),
        ["config", "segmesh-state", "segmesh-console-ca"]
    );
    assert_eq!(d["spec"]["replicas"], 3, "other fields stay");
    let init = &t["spec"]["initContainers"][1];
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    let proxy = &t["spec"]["containers"][2];
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(env(proxy, "SEGMESH_TAGS")["value"], "app=web,env=prod");
    assert_eq!(env(proxy, "SEGMESH_NAMESPACE")["value"], "/k8s/shop");
    assert_eq!(
        env(proxy, "SEGMESH_CONSOLE")["value"],
        "https://console.segmesh:8443"
    );
    assert_eq!(
        env(proxy, "SEGMESH_PU_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env(proxy, "SEGMESH_BOOTSTRAP_TOKEN")["valueFrom"]["secretKeyRef"]["name"],
        "segmesh-bootstrap"
    );
    assert_eq!(proxy["readinessProbe"]["httpGet"]["port"], 15020);
    assert_eq!(t["metadata"]["annotations"][INJECTED_ANNOTATION], "true");
    let status: Value = serde_json::from_str(
        t["metadata"]["annotations"][STATUS_ANNOTATION]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status["containers"], json!(["segmesh-proxy"]));
    // Key order of the changed document is kept.
    let keys: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("apiVersion: apps/v1"))
        .take(3)
        .collect();
    assert_eq!(keys[1], "kind: Deployment");

    // Idempotent: a second run changes nothing.
    let (again, reports) = inject_stream(&out, &opts()).unwrap();
    assert_eq!(again, out);
    assert_eq!(reports[0].outcome, "already injected");
}

#[test]
fn statefulsets_cronjobs_lists_and_opt_outs() {
    let text = r#"apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers: [{name: postgres, image: "postgres:16"}]
  volumeClaimTemplates:
    - metadata: {name: data}
      spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report}
spec:
  schedule: "0 * * * *"
  jobTemplate:
    spec:
      template:
        metadata: {labels: {app: report}}
        spec:
          restartPolicy: OnFailure
          containers: [{name: report, image: "shop/report:1"}]
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Pod
    metadata: {name: debug, labels: {app: debug}}
    spec:
      containers: [{name: sh, image: busybox}]
  - apiVersion: v1
    kind: Pod
    metadata:
      name: legacy
      annotations: {segmesh.io/inject: "false"}
    spec:
      containers: [{name: app, image: legacy}]
---
# opted out, copied as is
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: node-agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata:
      labels: {app: agent}
      annotations: {segmesh.io/inject: "false"}
    spec:
      hostNetwork: true
      containers: [{name: agent, image: agent}]
"#;
    let (out, reports) = inject_stream(text, &opts()).unwrap();
    let outcomes: Vec<(&str, &str)> = reports
        .iter()
        .map(|r| (r.name.as_str(), r.outcome))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("db", "injected"),
            ("report", "injected"),
            ("debug", "injected"),
            ("legacy", "opted out"),
            ("node-agent", "opted out"),
        ]
    );
    let d = docs(&out);
    assert_eq!(
        names(&d[0]["spec"]["template"]["spec"]["containers"]),
        ["postgres", "segmesh-proxy"]
    );
    assert_eq!(
        d[0]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "data"
    );
    let cron = &d[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(names(&cron["initContainers"]), ["segmesh-init"]);
    assert_eq!(cron["restartPolicy"], "OnFailure");
    assert_eq!(
        names(&d[2]["items"][0]["spec"]["containers"]),
        ["sh", "segmesh-proxy"]
    );
    assert_eq!(names(&d[2]["items"][1]["spec"]["containers"]), ["app"]);
    assert_eq!(split_documents(&out)[3], split_documents(text)[3]);
    let (again, _) = inject_stream(&out, &opts()).unwrap();
    assert_eq!(again, out, "idempotent");
}

#[test]
fn a_broken_document_is_reported_by_position() {
    let err = inject_stream("kind: Pod\n---\nkind: [unclosed\n", &opts()).unwrap_err();
    assert!(err.to_string().starts_with("document 2:"), "{err}");
}

/// Applies RFC 6902 `add` operations (all the webhook emits).
fn apply_patch(doc: &mut Value, ops: &[Value]) {
    for op in ops {
        assert!(op["op"] == "add" || op["op"] == "replace", "{op}");
        let path: Vec<String> = op["path"].as_str().unwrap()[1..]
            .split('/')
            .map(|p| p.replace("~1", "/").replace("~0", "~"))
            .collect();
        let (last, parents) = path.split_last().unwrap();
        let mut target = &mut *doc;
        for p in parents {
            target = match p.parse::<usize>() {
                Ok(i) if target.is_array() => &mut target[i],
                _ => &mut target[p.as_str()],
            };
        }
        if last == "-" {
            target.as_array_mut().unwrap().push(op["value"].clone());
        } else {
            target[last.as_str()] = op["value"].clone();
        }
    }
}

#[test]
fn the_webhook_answers_an_admission_review_with_the_same_injection() {
    // The shape of https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/#request
    let review_request = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "web-7d9f8b6c5-x2x4q",
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "uid": "r", "groups": ["system:serviceaccounts"]},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "web-7d9f8b6c5-x2x4q", "namespace": "shop", "labels": {"app": "web", "pod-template-hash": "7d9f8b6c5"}},
                "spec": {"containers": [{"name": "web", "image": "shop/web:2.1"}]}
            },
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    });
    let answer = review(&review_request, &opts()).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let r = &answer["response"];
    assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");
    use base64::Engine as _;
    let ops: Vec<Value> = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let mut pod = review_request["request"]["object"].clone();
    apply_patch(&mut pod, &ops);
    // The same result as `segmeshctl inject` on that pod.
    let (text, _) = inject_stream(
        &serde_norway::to_string(&review_request["request"]["object"]).unwrap(),
        &opts(),
    )
    .unwrap();
    assert_eq!(pod, docs(&text)[0]);
    assert_eq!(names(&pod["spec"]["containers"]), ["web", "segmesh-proxy"]);

    // An injected pod is allowed without a patch.
    let mut again = review_request.clone();
    again["request"]["object"] = pod;
    let r = review(&again, &opts()).unwrap();
    assert_eq!(r["response"]["allowed"], true);
    assert!(r["response"]["patch"].is_null());
    assert!(review(&json!({"kind": "Other"}), &opts()).is_err());
}

/// A workload container running as the enforcer's uid would leave the pod with the
/// enforcer's exemption: `inject` and the webhook refuse it, naming the container; a
/// container overriding a pod-level 1337 with its own uid is fine.
#[test]
fn pods_running_as_the_proxy_uid_are_refused() {
    let manifest = |pod_uid: &str, container_uid: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: sneaky}}\nspec:\n  {pod_uid}\n  containers:\n  - name: app\n    image: x\n    {container_uid}\n"
        )
    };
    for (pod, container) in [
        ("securityContext: {runAsUser: 1337}", ""),
        ("", "securityContext: {runAsUser: 1337}"),
    ] {
        let text = manifest(pod, container);
        let err = inject_stream(&text, &opts()).unwrap_err().to_string();
        assert!(
            err.contains("Pod sneaky: container `app` runs as uid 1337"),
            "{err}"
        );
    }
    let fine = manifest(
        "securityContext: {runAsUser: 1337}",
        "securityContext: {runAsUser: 1000}",
    );
    let (out, reports) = inject_stream(&fine, &opts()).unwrap();
    assert_eq!(reports[0].outcome, "injected");
    assert!(out.contains("segmesh-proxy"));

    let object: Value =
        serde_norway::from_str(&manifest("", "securityContext: {runAsUser: 1337}")).unwrap();
    let review_request = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "namespace": "shop", "object": object}
    });
    let r = &review(&review_request, &opts()).unwrap()["response"];
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 403);
    assert!(r["patch"].is_null());
    assert!(
        r["status"]["message"]
            .as_str()
            .unwrap()
            .contains("`app` runs as uid 1337"),
        "{r}"
    );
}

const PROBED: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: api
  namespace: shop
  labels: {app: api}
spec:
  containers:
    - name: api
      image: shop/api:1
      ports: [{name: http, containerPort: 8080}]
      readinessProbe:
        httpGet: {path: /ready, port: http, httpHeaders: [{name: X-Probe, value: "1"}]}
        periodSeconds: 3
      livenessProbe:
        tcpSocket: {port: 8080}
        failureThreshold: 5
      startupProbe:
        httpGet: {path: /up, port: 8443, scheme: HTTPS}
    - name: sidekick
      image: shop/sidekick:1
      livenessProbe:
        exec: {command: [true]}
"#;

/// HTTP and TCP probes of the pod go to the enforcer's admin port, timing kept, the
/// originals handed to the enforcer; HTTPS and exec probes stay; the webhook's patch
/// does the same; `segmesh.io/rewrite-probes: "false"` leaves them all.
#[test]
fn probes_are_rewritten_to_the_admin_port() {
    let (text, _) = inject_stream(PROBED, &opts()).unwrap();
    let pod = &docs(&text)[0];
    let api = &pod["spec"]["containers"][0];
    assert_eq!(
        api["readinessProbe"],
        json!({"httpGet": {"path": "/app-health/api/readiness", "port": 15020, "scheme": "HTTP"}, "periodSeconds": 3})
    );
    assert_eq!(
        api["livenessProbe"],
        json!({"httpGet": {"path": "/app-health/api/liveness", "port": 15020, "scheme": "HTTP"}, "failureThreshold": 5})
    );
    assert_eq!(
        api["startupProbe"]["httpGet"]["scheme"], "HTTPS",
        "HTTPS stays"
    );
    assert!(pod["spec"]["containers"][1]["livenessProbe"]["exec"].is_object());
    let proxy = &pod["spec"]["containers"][2];
    let probes: segmesh_api::AppProbes =
        serde_json::from_str(env(proxy, "SEGMESH_APP_PROBES")["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        probes,
        [
            (
                "/app-health/api/liveness".to_owned(),
                segmesh_api::AppProbe::TcpSocket { port: 8080 }
            ),
            (
                "/app-health/api/readiness".to_owned(),
                segmesh_api::AppProbe::HttpGet {
                    port: 8080,
                    path: "/ready".into(),
                    headers: vec![("X-Probe".into(), "1".into())]
                }
            ),
        ]
        .into_iter()
        .collect()
    );
    // The webhook: the same pod.
    let object = docs(PROBED)[0].clone();
    let request = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "namespace": "shop", "operation": "CREATE", "object": object.clone()}
    });
    let answer = review(&request, &opts()).unwrap();
    use base64::Engine as _;
    let ops: Vec<Value> = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(answer["response"]["patch"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let mut patched = object;
    apply_patch(&mut patched, &ops);
    assert_eq!(&patched, pod);
    // Opted out: the probes stay, the enforcer gets none.
    let out = PROBED.replace(
        "  labels: {app: api}\n",
        "  labels: {app: api}\n  annotations: {segmesh.io/rewrite-probes: \"false\"}\n",
    );
    let (text, _) = inject_stream(&out, &opts()).unwrap();
    let pod = &docs(&text)[0];
    assert_eq!(
        pod["spec"]["containers"][0]["livenessProbe"]["tcpSocket"]["port"],
        8080
    );
    let proxy = &pod["spec"]["containers"][2];
    assert!(
        !proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "SEGMESH_APP_PROBES")
    );
}
