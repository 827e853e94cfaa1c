//! The console as a process, driven by `segmeshctl` over HTTPS, as an operator would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

struct Console {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(tag: &str) -> Console {
    let dir =
        std::env::temp_dir().join(format!("segmesh-console-api-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_segmesh-control"))
        .args([
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let c = Console {
        child,
        dir,
        url: format!("https://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(c.dir.join("admin.token").exists()
        && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
    {
        assert!(Instant::now() < deadline, "the console did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    c
}

impl Console {
    fn ctl(&self, token: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_segmeshctl"))
            .args(args)
            .env("SEGMESH_CONSOLE", &self.url)
            .env("SEGMESH_TOKEN", token)
            .env("SEGMESH_CA", self.dir.join("ca/bundle.crt"))
            .output()
            .unwrap()
    }
    fn admin(&self) -> String {
        format!("@{}", self.dir.join("admin.token").display())
    }
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier")
}

#[test]
fn apply_diff_commit_rollback_over_https() {
    let c = start("flow");
    let admin = c.admin();
    let o = c.ctl(&admin, &["apply", "-f", examples().to_str().unwrap()]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        out(&o).contains("+ NetworkPolicy /acme/shop:web-to-api"),
        "{}",
        out(&o)
    );
    let o = c.ctl(&admin, &["diff"]);
    assert!(out(&o).contains("24 added"), "{}", out(&o));
    assert!(out(&o).contains("+ Service /acme/shop:api"), "{}", out(&o));
    let o = c.ctl(&admin, &["commit"]);
    assert!(out(&o).contains("published version 1"), "{}", out(&o));
    let o = c.ctl(&admin, &["get", "policies"]);
    assert!(
        out(&o).contains("/acme/shop:api-to-db  Allow Bidirectional"),
        "{}",
        out(&o)
    );

    // Delete one, commit, roll back: it is back.
    assert!(
        c.ctl(&admin, &["delete", "policy", "/acme/shop", "api-to-db"])
            .status
            .success()
    );
    assert!(out(&c.ctl(&admin, &["diff"])).contains("- NetworkPolicy /acme/shop:api-to-db"));
    assert!(out(&c.ctl(&admin, &["commit"])).contains("version 2"));
    assert!(!out(&c.ctl(&admin, &["get", "policies"])).contains("api-to-db"));
    assert!(out(&c.ctl(&admin, &["rollback"])).contains("version 3"));
    assert!(out(&c.ctl(&admin, &["get", "policies"])).contains("api-to-db"));

    let audit = out(&c.ctl(&admin, &["audit"]));
    assert!(
        audit.contains("console token admin: Editor on /"),
        "{audit}"
    );
    for action in ["apply", "commit", "delete", "rollback"] {
        assert!(
            audit.contains(&format!("admin {action}")),
            "{action} missing from:\n{audit}"
        );
    }
}

#[test]
fn a_bad_document_in_a_multi_file_apply_changes_nothing() {
    let c = start("bad");
    let admin = c.admin();
    let bad = c.dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(examples().join("policies.yaml"), bad.join("a.yaml")).unwrap();
    std::fs::write(
        bad.join("b.yaml"),
        "kind: ExternalNetwork\nname: x\nentries: [\"googleapis.*\"]\n",
    )
    .unwrap();
    let o = c.ctl(&admin, &["apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    let want = format!("{}:3:11: field `entries[0]`", bad.join("b.yaml").display());
    assert!(out(&o).contains(&want), "{}", out(&o));
    assert!(
        out(&c.ctl(&admin, &["diff"])).contains("0 added, 0 changed, 0 removed"),
        "nothing was applied"
    );
}

#[test]
fn tokens_and_roles() {
    let c = start("roles");
    let admin = c.admin();
    let token = |name: &str, role: &str, ns: &str| {
        let o = c.ctl(
            &admin,
            &["token", "--name", name, "--role", role, "--namespace", ns],
        );
        assert!(o.status.success(), "{}", out(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let viewer = token("viewer", "viewer", "/");
    let shop = token("shop", "editor", "/acme/shop");
    let p = c.dir.join("p.yaml");
    std::fs::write(&p, "kind: NetworkPolicy\nname: p\nnamespace: /acme/shop\naction: Allow\nmode: Bidirectional\nsubject: [[a=b]]\nobject: [[c=d]]\n").unwrap();
    let q = c.dir.join("q.yaml");
    std::fs::write(&q, "kind: NetworkPolicy\nname: q\nnamespace: /acme/other\naction: Allow\nmode: Bidirectional\nsubject: [[a=b]]\nobject: [[c=d]]\n").unwrap();

    let o = c.ctl(&viewer, &["apply", "-f", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("403"), "{}", out(&o));
    assert!(
        c.ctl(&shop, &["apply", "-f", p.to_str().unwrap()])
            .status
            .success()
    );
    let o = c.ctl(&shop, &["apply", "-f", q.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("/acme/other"), "{}", out(&o));
    assert_eq!(
        c.ctl(&shop, &["commit"]).status.code(),
        Some(1),
        "commit needs editor rights on /"
    );
    assert_eq!(c.ctl("smt_not-a-token", &["diff"]).status.code(), Some(1));
    assert!(out(&c.ctl(&viewer, &["diff"])).contains("+ NetworkPolicy /acme/shop:p"));
}

#[test]
fn enforcer_registration_over_https() {
    use segmesh_identity::{KeyAlgorithm, WorkloadIdentity, WorkloadKey};
    let c = start("register");
    let admin = c.admin();
    let o = c.ctl(
        &admin,
        &[
            "token",
            "--name",
            "shop-nodes",
            "--role",
            "enforcer",
            "--namespace",
            "/acme/shop",
            "--allow-tag",
            "app=*",
            "--allow-tag",
            "env=prod",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    let strict = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    // This test registers from 127.0.0.1 addresses it does not have: a token that
    // allows it.
    let o = c.ctl(
        &admin,
        &[
            "token",
            "--name",
            "shop-nat",
            "--role",
            "enforcer",
            "--namespace",
            "/acme/shop",
            "--allow-tag",
            "app=*",
            "--allow-tag",
            "env=prod",
            "--any-source",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    let boot = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    // A bootstrap token does not administer.
    assert_eq!(c.ctl(&boot, &["diff"]).status.code(), Some(1));

    let ca = c.dir.join("ca/bundle.crt");
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let body = serde_json::json!({
        "name": "web", "namespace": "/acme/shop", "tags": ["app=web", "env=prod", "team=root"],
        "ips": ["10.0.0.7"], "csr": key.csr_pem("web").unwrap(),
    });
    // The attack: claiming another address than the one registering. Refused.
    let elsewhere =
        segmesh_control::client::Client::new(&c.url, &strict, ca.to_str().unwrap()).unwrap();
    let e = elsewhere
        .call("POST", "/v1/enforcers/register", Some(body.clone()))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("registers from one of its own addresses"),
        "{e}"
    );
    let client = segmesh_control::client::Client::new(&c.url, &boot, ca.to_str().unwrap()).unwrap();
    let r = client
        .call("POST", "/v1/enforcers/register", Some(body.clone()))
        .unwrap();
    assert_eq!(r["dropped"], serde_json::json!(["team=root"]), "{r}");
    let chain = segmesh_identity::ca::certs_from_pem(r["chain"].as_str().unwrap()).unwrap();
    let id = WorkloadIdentity::from_cert(&chain[0]).unwrap();
    assert_eq!(id.name, "web");
    assert!(
        id.tags.contains(&"app=web".to_owned()) && !id.tags.iter().any(|t| t.starts_with("team=")),
        "{:?}",
        id.tags
    );
    // The certificate chains to the console's bundle (what every enforcer trusts).
    let o = Command::new("openssl")
        .args(["verify", "-CAfile", ca.to_str().unwrap()])
        .arg({
            let p = c.dir.join("web.crt");
            std::fs::write(&p, r["chain"].as_str().unwrap()).unwrap();
            p
        })
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));

    // A wrong bootstrap token gets no certificate.
    let bad =
        segmesh_control::client::Client::new(&c.url, "smt_wrong", ca.to_str().unwrap()).unwrap();
    match bad.call("POST", "/v1/enforcers/register", Some(body)) {
        Err(segmesh_control::client::ClientError::Status { status, .. }) => assert_eq!(status, 401),
        other => panic!("expected 401, got {other:?}"),
    }
    let pus = client_admin(&c)
        .call("GET", "/v1/processingunits", None)
        .unwrap();
    assert_eq!(pus.as_array().unwrap().len(), 1);
    assert_eq!(pus[0]["ips"][0], "10.0.0.7");
}

fn client_admin(c: &Console) -> segmesh_control::client::Client {
    let token = std::fs::read_to_string(c.dir.join("admin.token")).unwrap();
    segmesh_control::client::Client::new(
        &c.url,
        token.trim(),
        c.dir.join("ca/bundle.crt").to_str().unwrap(),
    )
    .unwrap()
}

#[test]
fn snapshots_and_long_poll() {
    use segmesh_identity::{KeyAlgorithm, WorkloadKey};
    let c = start("snapshot");
    let admin = c.admin();
    assert!(
        c.ctl(&admin, &["apply", "-f", examples().to_str().unwrap()])
            .status
            .success()
    );
    assert!(c.ctl(&admin, &["commit"]).status.success());
    let o = c.ctl(
        &admin,
        &[
            "token",
            "--name",
            "shop",
            "--role",
            "enforcer",
            "--namespace",
            "/acme/shop",
            "--allow-tag",
            "app=*",
            "--any-source",
        ],
    );
    let boot = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let ca = c.dir.join("ca/bundle.crt");
    let enforcer =
        segmesh_control::client::Client::new(&c.url, &boot, ca.to_str().unwrap()).unwrap();
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let reg = serde_json::json!({"name": "web", "namespace": "/acme/shop", "tags": ["app=web"], "ips": ["10.0.0.7"], "csr": key.csr_pem("web").unwrap()});
    enforcer
        .call("POST", "/v1/enforcers/register", Some(reg))
        .unwrap();

    let s = enforcer
        .call("GET", "/v1/snapshot?pu=/acme/shop:web&since=0", None)
        .unwrap();
    let snap: segmesh_api::Snapshot = serde_json::from_value(s).unwrap();
    assert_eq!(
        (snap.version, snap.revision),
        (1, 2),
        "one commit, one registration"
    );
    let names: Vec<String> = snap.policies.iter().map(|p| p.qualified_name()).collect();
    assert!(
        names.contains(&"/acme:dns".to_owned())
            && names.contains(&"/acme/shop:web-to-api".to_owned()),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("/acme/lab")),
        "another team's policies are not sent: {names:?}"
    );
    assert_eq!(snap.externals.len(), 4);
    assert_eq!(snap.registry.len(), 1);
    assert_eq!(
        snap.registry[0].ips,
        vec!["10.0.0.7".parse::<std::net::IpAddr>().unwrap()]
    );

    // Long-poll: a watcher at the current revision returns right after the next commit.
    let since = snap.revision;
    let watcher = std::thread::spawn(move || {
        let t = Instant::now();
        let v = enforcer
            .call(
                "GET",
                &format!("/v1/snapshot?pu=/acme/shop:web&since={since}&wait=20"),
                None,
            )
            .unwrap();
        (v, Instant::now(), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    let p = c.dir.join("extra.yaml");
    std::fs::write(&p, "kind: NetworkPolicy\nname: extra\nnamespace: /acme/shop\naction: Reject\nmode: Outgoing\nsubject: [[app=web]]\nobject: [[app=db]]\n").unwrap();
    assert!(
        c.ctl(&admin, &["apply", "-f", p.to_str().unwrap()])
            .status
            .success()
    );
    let committed = Instant::now();
    assert!(c.ctl(&admin, &["commit"]).status.success());
    let (v, returned, waited) = watcher.join().unwrap();
    assert!(
        waited >= Duration::from_millis(400),
        "the watcher waited for the change"
    );
    let latency = returned.saturating_duration_since(committed);
    eprintln!(
        "commit -> long-poll answer: {latency:?} (includes segmeshctl's own start and request)"
    );
    assert!(latency < Duration::from_secs(5), "{latency:?}");
    assert_eq!(v["version"], 2);
    assert!(
        v["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "extra")
    );

    // Tokens for other namespaces may not watch this one.
    let o = c.ctl(
        &admin,
        &[
            "token",
            "--name",
            "other",
            "--role",
            "viewer",
            "--namespace",
            "/acme/other",
        ],
    );
    let other = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let cl = segmesh_control::client::Client::new(&c.url, &other, ca.to_str().unwrap()).unwrap();
    assert!(matches!(
        cl.call("GET", "/v1/snapshot?pu=/acme/shop:web", None),
        Err(segmesh_control::client::ClientError::Status { status: 403, .. })
    ));
}

#[test]
fn test_and_explain_against_live_state() {
    let c = start("live");
    let admin = c.admin();
    let cases = examples().join("cases.yaml");
    // Nothing committed yet: the example's cases fail against an empty live state.
    let o = c.ctl(&admin, &["test", "-f", cases.to_str().unwrap(), "--live"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        c.ctl(
            &admin,
            &[
                "apply",
                "-f",
                examples().join("policies.yaml").to_str().unwrap()
            ]
        )
        .status
        .success()
    );
    // Applied but not committed: still the old live state.
    assert_eq!(
        c.ctl(&admin, &["test", "-f", cases.to_str().unwrap(), "--live"])
            .status
            .code(),
        Some(1)
    );
    assert!(c.ctl(&admin, &["commit"]).status.success());
    let o = c.ctl(&admin, &["test", "-f", cases.to_str().unwrap(), "--live"]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        out(&o).contains("45 passed, 0 failed") && out(&o).contains("using live version 1"),
        "{}",
        out(&o)
    );
    let o = c.ctl(
        &admin,
        &[
            "explain",
            "--live",
            "--from",
            "app=web,env=prod",
            "--to",
            "app=api,env=prod",
            "--port",
            "tcp/8089",
            "--namespace",
            "/acme/shop",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        out(&o).contains("/acme/shop:api-debug-port-closed"),
        "{}",
        out(&o)
    );
    assert!(out(&o).contains("flow: REJECT"), "{}", out(&o));
    // --live without the console's address is invalid input.
    let o = Command::new(env!("CARGO_BIN_EXE_segmeshctl"))
        .args(["test", "-f", cases.to_str().unwrap(), "--live"])
        .env_remove("SEGMESH_CONSOLE")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
}

#[test]
fn the_admission_webhook_answers_over_https() {
    let c = start("admission");
    // The API server sends no bearer token; any client works.
    let api_server = segmesh_control::client::Client::new(
        &c.url,
        "",
        c.dir.join("ca/bundle.crt").to_str().unwrap(),
    )
    .unwrap();
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "e911857d-c318-11e8-bbad-025000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "api-0", "labels": {"app": "api"}},
                "spec": {"containers": [{"name": "api", "image": "shop/api:1"}]}
            }
        }
    });
    let answer = api_server
        .call("POST", "/v1/admission", Some(review))
        .unwrap();
    let r = &answer["response"];
    assert_eq!(r["uid"], "e911857d-c318-11e8-bbad-025000000001");
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");
    assert!(r["patch"].as_str().is_some_and(|p| !p.is_empty()));
    let bad = api_server.call(
        "POST",
        "/v1/admission",
        Some(serde_json::json!({"kind": "x"})),
    );
    assert!(bad.is_err(), "not an AdmissionReview: 400");
}

/// The attack: a viewer (or any token) reporting flows in a PU's name. Only the PU's
/// enforcer, with its certificate, may; the refusal comes before the body is read.
#[test]
fn only_enforcer_certificates_report_flows() {
    let c = start("flow-auth");
    let admin = c.admin();
    let o = c.ctl(
        &admin,
        &[
            "token",
            "--name",
            "v",
            "--role",
            "viewer",
            "--namespace",
            "/",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    let viewer = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let ca = c.dir.join("ca/bundle.crt");
    for token in [viewer, admin] {
        let client =
            segmesh_control::client::Client::new(&c.url, &token, ca.to_str().unwrap()).unwrap();
        let e = client
            .call(
                "POST",
                "/v1/flows?pu=/acme/shop:web",
                Some(serde_json::json!([])),
            )
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("only the enforcer of /acme/shop:web"),
            "{e}"
        );
    }
}

/// The attack: an unauthenticated client announces a 9 MB body (and sends a little of
/// it), to make the console read and buffer it. The console answers 401 from the
/// headers alone, without waiting for the body, on every authenticated endpoint and on
/// registration.
#[test]
fn an_unauthenticated_body_is_not_read() {
    let c = start("no-body");
    let ca = segmesh_identity::ca::certs_from_pem(
        &std::fs::read_to_string(c.dir.join("ca/bundle.crt")).unwrap(),
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in ca {
        roots.add(cert).unwrap();
    }
    let cfg = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(segmesh_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let addr: std::net::SocketAddr = c.url.trim_start_matches("https://").parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for path in ["/v1/apply", "/v1/enforcers/register", "/v1/tokens"] {
        let cfg = cfg.clone();
        let status = rt.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            let mut tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .unwrap();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: console\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                9 << 20
            );
            tls.write_all(head.as_bytes()).await.unwrap();
            tls.write_all(&[b' '; 1024]).await.unwrap();
            tls.flush().await.unwrap();
            let mut b = vec![0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(3), tls.read(&mut b))
                .await
                .expect("an answer without the body")
                .unwrap();
            String::from_utf8_lossy(&b[..n]).into_owned()
        });
        assert!(status.starts_with("HTTP/1.1 401"), "{path}: {status}");
    }
}
