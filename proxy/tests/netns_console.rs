//! Enforcers in console mode against a real console process: web, api and db each in
//! their own namespace with capture rules and an enforcer started with only the
//! console's address, a bootstrap token and the PU's name, namespace and claimed tags;
//! the console in a namespace of its own; policies applied and committed with
//! `segmeshctl`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use common::console::Lab;
use common::*;
use segmesh_testkit::{netns_enabled, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PUS: [(&str, &str); 3] = [("web", "app=web"), ("api", "app=api"), ("db", "app=db")];
const PUSH_LIMIT: Duration = Duration::from_secs(10);

/// The console, the three-tier policies committed, three enforcers registered and
/// seeing each other, greeters on api:8080 and db:5432.
fn lab(tag: &str) -> Lab {
    let mut lab = Lab::new(tag, &["console", "web", "api", "db"], &[]);
    lab.boot = lab
        .ctl_ok(&[
            "token",
            "--name",
            "shop-enforcers",
            "--role",
            "enforcer",
            "--namespace",
            "/acme/shop",
            "--allow-tag",
            "app=*",
            "--allow-tag",
            "env=prod",
        ])
        .trim()
        .to_owned();
    assert!(lab.boot.starts_with("smt_"), "a token: {}", lab.boot);
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/three-tier/policies.yaml"
    );
    lab.ctl_ok(&["apply", "-f", example]);
    lab.ctl_ok(&["commit"]);
    for (name, app) in PUS {
        capture(&lab.host(name));
        let boot = lab.boot.clone();
        lab.start_enforcer(name, &[app, "env=prod"], &boot, true);
    }
    for (name, _) in PUS {
        wait_until(&format!("{name} sees the three PUs"), PUSH_LIMIT, || {
            lab.config(name)["registry"].as_u64() == Some(6)
        });
    }
    for (name, port) in [("api", 8080u16), ("db", 5432)] {
        let h = lab.host(name);
        let addr = SocketAddr::new(h.ip4.into(), port);
        greet(&h, addr, Arc::new(AtomicUsize::new(0)));
    }
    lab
}

fn target(lab: &Lab, name: &str, port: u16) -> SocketAddr {
    SocketAddr::new(lab.host(name).ip4.into(), port)
}

fn try_from(lab: &Lab, from: &str, to: SocketAddr) -> Attempt {
    in_ns(&lab.host(from), attempt(to)).join().unwrap()
}

/// Polls until `from` → `to` gives `want` (greeted or refused); returns how long it took.
fn time_until(lab: &Lab, from: &str, to: SocketAddr, greeted: bool) -> Duration {
    let start = Instant::now();
    loop {
        let a = try_from(lab, from, to);
        let now = matches!(a, Attempt::Greeted);
        if now == greeted && (greeted || matches!(a, Attempt::Refused(_))) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < PUSH_LIMIT,
            "{from} → {to}: still {a:?} after {PUSH_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

const CUT: &str = "kind: NetworkPolicy\n\
name: cut-web-api\n\
namespace: /acme/shop\n\
action: Reject\n\
mode: Bidirectional\n\
subject: [[app=web]]\n\
object: [[app=api]]\n\
ports: [tcp/8080]\n";

#[test]
fn netns_console_commit_and_rollback_reach_enforcers_and_close_open_connections() {
    if !netns_enabled() {
        return;
    }
    let lab = lab("console-push");
    let api = target(&lab, "api", 8080);
    assert_eq!(try_from(&lab, "web", api), Attempt::Greeted);
    refused_fast(try_from(&lab, "web", target(&lab, "db", 5432)));

    // A long-lived allowed connection, open while the policy that rejects it lands.
    let web = lab.host("web");
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let long = in_ns(&web, async move {
        let mut s = TcpStream::connect(api).await.unwrap();
        let mut b = [0u8; 6];
        s.read_exact(&mut b).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut e = [0u8; 4];
        s.read_exact(&mut e).await.unwrap();
        opened_tx.send(()).unwrap();
        // Until the enforcers close it: EOF or reset, nothing else.
        let r = tokio::time::timeout(Duration::from_secs(30), s.read(&mut e)).await;
        (Instant::now(), format!("{r:?}"))
    });
    opened_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let p = lab.dir.0.join("cut.yaml");
    std::fs::write(&p, CUT).unwrap();
    lab.ctl_ok(&["apply", "-f", p.to_str().unwrap()]);
    let before = Instant::now();
    lab.ctl_ok(&["commit"]);
    let committed = Instant::now();
    let refused_after = time_until(&lab, "web", api, false);
    let (closed_at, how) = long.join().unwrap();
    let closed_after = closed_at.saturating_duration_since(committed);
    assert!(
        how.contains("Ok(Ok(0))") || how.contains("ConnectionReset"),
        "the open connection ended by EOF or reset, not {how}"
    );
    eprintln!(
        "commit took {:?}; new verdict {refused_after:?} after it; open connection closed {closed_after:?} after it",
        committed - before
    );
    assert!(closed_after < PUSH_LIMIT);
    // The enforcers say why: close reason `policy`, naming the policy.
    wait_until("a record of the closed connection", PUSH_LIMIT, || {
        ["web", "api"].iter().any(|n| {
            lab.log(n).iter().any(|r| {
                r["close_reason"] == "policy"
                    && r["closed_by"]
                        .as_array()
                        .is_some_and(|b| b.iter().any(|p| p == "/acme/shop:cut-web-api"))
            })
        })
    });

    lab.ctl_ok(&["rollback"]);
    let allowed_after = time_until(&lab, "web", api, true);
    eprintln!("rollback: the old verdict is back {allowed_after:?} after it");

    // A reject at the server only: web's enforcer still allows and sends the flow over
    // a tunnel connection it established before the commit; api decides with the
    // snapshot of the moment the request arrives.
    let reused_before = metric(&web, "segmesh_tunnel_connections_total{result=\"reused\"}");
    let api_version = lab.config("api")["version"].clone();
    lab.publish(
        "server-cut.yaml",
        &CUT.replace("cut-web-api", "api-refuses-web")
            .replace("Bidirectional", "Incoming"),
    );
    wait_until("api takes the commit", PUSH_LIMIT, || {
        lab.config("api")["version"] != api_version
    });
    // The very next flow: over a connection made before the commit, and refused.
    refused_fast(try_from(&lab, "web", api));
    wait_until("web's record of the server's refusal", PUSH_LIMIT, || {
        lab.log("web").iter().any(|r| {
            r["destination"]["port"] == 8080
                && r["rejected_by"] == "server"
                && r["peer_reason"] == "policy"
        })
    });
    assert!(
        metric(&web, "segmesh_tunnel_connections_total{result=\"reused\"}") > reused_before,
        "the refused flow came over a tunnel connection made before the commit"
    );
    lab.ctl_ok(&["rollback"]);
    time_until(&lab, "web", api, true);

    // Deleting a PU takes it out of every registry with the next push.
    lab.ctl_ok(&["delete", "pu", "/acme/shop", "db"]);
    wait_until("web drops db from its registry", PUSH_LIMIT, || {
        lab.config("web")["registry"].as_u64() == Some(4)
    });
    let pus = lab.ctl_ok(&["get", "pus"]);
    assert!(
        pus.contains("/acme/shop:web") && !pus.contains("/acme/shop:db"),
        "{pus}"
    );

    // The enforcers' flow records reached the console.
    wait_until("records at the console", PUSH_LIMIT, || {
        let out = lab.ctl_ok(&["flows", "--pu", "web", "--verdict", "reject", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v.as_array().is_some_and(|a| {
            a.iter().any(|f| {
                f["record"]["destination"]["port"] == 5432 && f["reporter"] == "/acme/shop:web"
            })
        })
    });
    let table = lab.ctl_ok(&["flows", "--since", "10m"]);
    assert!(
        table.contains("reject") && table.contains("flow records"),
        "{table}"
    );
}

#[test]
fn netns_console_down_enforcers_keep_and_restart_from_their_cache() {
    if !netns_enabled() {
        return;
    }
    let mut lab = lab("console-down");
    let api = target(&lab, "api", 8080);
    let db = target(&lab, "db", 5432);
    assert_eq!(try_from(&lab, "web", api), Attempt::Greeted);
    assert_eq!(try_from(&lab, "api", db), Attempt::Greeted);

    lab.stop_console();
    // Still enforcing the last snapshot.
    assert_eq!(try_from(&lab, "web", api), Attempt::Greeted);
    refused_fast(try_from(&lab, "web", db));

    // Restarted while the console is down: the cached snapshot and identity.
    lab.stop_enforcer("web");
    let boot = lab.boot.clone();
    lab.start_enforcer("web", &["app=web", "env=prod"], &boot, true);
    assert_eq!(lab.config("web")["source"], "cache");
    assert_eq!(try_from(&lab, "web", api), Attempt::Greeted);
    refused_fast(try_from(&lab, "web", db));

    // The console back: the enforcers catch up with a change made since.
    lab.start_console();
    lab.publish("cut.yaml", CUT);
    let t = time_until(&lab, "web", api, false);
    eprintln!("after the console's return: new verdict {t:?} after the commit");
    wait_until("web is on the console's snapshot", PUSH_LIMIT, || {
        lab.config("web")["source"] == "console"
    });
    assert_eq!(try_from(&lab, "api", db), Attempt::Greeted);
}

#[test]
fn netns_console_certifies_only_recorded_tags_and_refuses_bad_tokens() {
    if !netns_enabled() {
        return;
    }
    let mut lab = Lab::new("console-tokens", &["console", "web"], &[]);
    let boot = lab.shop_token_on(0);
    lab.publish(
        "p.yaml",
        concat!(
            "kind: NetworkPolicy\nname: any\nnamespace: /acme\naction: Allow\nmode: Outgoing\n",
            "subject: [[app=web]]\nobject: [[ext:name=net]]\n---\n",
            "kind: ExternalNetwork\nname: net\nnamespace: /acme\nentries: [0.0.0.0/0]\n"
        ),
    );
    capture(&lab.host("web"));

    // A bad bootstrap token: no certificate, nothing enforced but rejection.
    lab.start_enforcer("web", &["app=web"], "smt_not-a-token", false);
    let web = lab.host("web");
    wait_until("the enforcer answers", Duration::from_secs(20), || {
        http_get(&web, "/healthz").0 == 200
    });
    wait_until("a refused registration", Duration::from_secs(20), || {
        metric(&web, "segmesh_console_requests_total{result=\"error\"}") >= 2.0
    });
    assert_eq!(
        http_get(&web, "/ready").0,
        503,
        "not ready: nothing to enforce"
    );
    assert!(!lab.dir.0.join("web-state/identity.crt").exists());
    refused_fast(try_from(&lab, "web", target(&lab, "console", 9)));
    assert!(lab.ctl_ok(&["get", "pus"]).trim().is_empty());
    lab.stop_enforcer("web");

    // A good token; claimed tags beyond what it allows are not certified.
    lab.start_enforcer("web", &["app=web", "role=admin"], &boot, true);
    let pem = std::fs::read_to_string(lab.dir.0.join("web-state/identity.crt")).unwrap();
    let chain = segmesh_identity::ca::certs_from_pem(&pem).unwrap();
    let id = segmesh_identity::WorkloadIdentity::from_cert(&chain[0]).unwrap();
    assert!(id.tags.contains(&"app=web".to_string()), "{:?}", id.tags);
    assert!(!id.tags.iter().any(|t| t == "role=admin"), "{:?}", id.tags);
    let tags = lab.config("web")["tags"].clone();
    assert!(
        !tags.as_array().unwrap().iter().any(|t| t == "role=admin"),
        "the enforcer decides with the certified tags: {tags}"
    );
    let pus = lab.ctl_ok(&["get", "pus"]);
    assert!(
        pus.contains("app=web") && !pus.contains("role=admin"),
        "{pus}"
    );
}

#[test]
fn netns_console_renews_certificates_and_stops_after_the_pu_is_deleted() {
    if !netns_enabled() {
        return;
    }
    // Short certificates: renewed every 4 s.
    let mut lab = Lab::new("console-renew", &["console", "web"], &["--cert-ttl", "6s"]);
    let boot = lab.shop_token_on(0);
    lab.publish(
        "p.yaml",
        "kind: NetworkPolicy\nname: none\nnamespace: /acme/shop\naction: Reject\nmode: Outgoing\nsubject: [[app=web]]\nobject: [[app=nothing]]\n",
    );
    capture(&lab.host("web"));
    lab.start_enforcer("web", &["app=web"], &boot, true);
    let not_after = || lab.not_after("web");
    let first = not_after().expect("a certificate");
    wait_until("a renewal", Duration::from_secs(15), || {
        not_after().is_some_and(|t| t > first)
    });
    let web = lab.host("web");
    assert_eq!(http_get(&web, "/ready").0, 200);

    // The bootstrap token revoked: the enforcer watches, reports and renews with its
    // certificate, so it keeps up.
    assert!(lab.ctl_ok(&["revoke", "b"]).contains("revoked 1"));
    let version = lab.config("web")["version"].clone();
    lab.publish(
        "p2.yaml",
        "kind: NetworkPolicy\nname: none-2\nnamespace: /acme/shop\naction: Reject\nmode: Outgoing\nsubject: [[app=web]]\nobject: [[app=nothing]]\n",
    );
    wait_until("web takes the commit", PUSH_LIMIT, || {
        lab.config("web")["version"] != version
    });
    let second = not_after().unwrap();
    wait_until(
        "a renewal without the token",
        Duration::from_secs(15),
        || not_after().is_some_and(|t| t > second),
    );

    // Deleted: the next renewal is refused and the enforcer stops asking.
    lab.ctl_ok(&["delete", "pu", "/acme/shop", "web"]);
    let errors = || metric(&web, "segmesh_console_requests_total{result=\"error\"}");
    wait_until("a refused renewal", Duration::from_secs(15), || {
        errors() >= 1.0
    });
    let last = not_after();
    let refused = errors();
    // Two more renewal periods: no new certificate, no new attempt, not re-registered.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(not_after(), last, "no certificate after the deletion");
    assert_eq!(errors(), refused, "renewals stopped after the refusal");
    assert!(lab.ctl_ok(&["get", "pus"]).trim().is_empty());
}

/// The attack: a second PU claims web's address. Its registration is refused (from its
/// own address; and even with a token that allows any source), so web keeps its place
/// in every registry and keeps taking commits. Then web's enforcer stops: its lease
/// lapses, web leaves the registry, and a new PU may take the address.
#[test]
fn netns_console_an_address_belongs_to_one_live_pu_until_its_lease_lapses() {
    if !netns_enabled() {
        return;
    }
    let mut lab = Lab::new(
        "lease",
        &["console", "web", "api", "mallory", "eve"],
        &["--pu-lease", "3s"],
    );
    let token = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "token",
            "--name",
            name,
            "--role",
            "enforcer",
            "--namespace",
            "/acme/shop",
            "--allow-tag",
            "app=*",
        ];
        args.extend_from_slice(extra);
        lab.ctl_ok(&args).trim().to_owned()
    };
    let boot = token("shop", &[]);
    let nat = token("shop-nat", &["--any-source"]);
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/three-tier/policies.yaml"
    );
    lab.ctl_ok(&["apply", "-f", example]);
    lab.ctl_ok(&["commit"]);
    for (name, app) in [("web", "app=web"), ("api", "app=api")] {
        capture(&lab.host(name));
        lab.start_enforcer(name, &[app], &boot, true);
    }
    let web_ip = lab.host("web").ip4.to_string();
    // mallory claims web's address from its own address; eve too, with a token that
    // allows registering from any address.
    for (n, t) in [("mallory", &boot), ("eve", &nat)] {
        let h = lab.host(n);
        let token_file = lab.dir.0.join(format!("{n}.token"));
        std::fs::write(&token_file, t).unwrap();
        let mut cmd = h.enforcer_command(std::path::Path::new(env!("CARGO_BIN_EXE_segmesh-proxy")));
        cmd.args([
            "--console",
            &lab.url(),
            "--console-ca",
            lab.dir.0.join("console-ca.crt").to_str().unwrap(),
            "--bootstrap-token",
            &format!("@{}", token_file.display()),
            "--name",
            n,
            "--namespace",
            "/acme/shop",
            "--tag",
            "app=web",
            "--ip",
            &web_ip,
            "--state-dir",
            lab.dir.0.join(format!("{n}-state")).to_str().unwrap(),
        ]);
        lab.topo.spawn(cmd);
    }
    // Each tried and was refused (the enforcers keep retrying; none is registered).
    for n in ["mallory", "eve"] {
        let h = lab.host(n);
        wait_until(
            &format!("{n}'s refused registration"),
            Duration::from_secs(20),
            || metric(&h, "segmesh_console_requests_total{result=\"error\"}") >= 1.0,
        );
    }
    let pus = lab.ctl_ok(&["get", "pus"]);
    assert!(!pus.contains("mallory") && !pus.contains("eve"), "{pus}");
    assert!(
        pus.contains(&format!("/acme/shop:web  ips {web_ip}")),
        "{pus}"
    );
    // web keeps taking commits.
    let version = lab.config("web")["version"].clone();
    lab.publish(
        "p.yaml",
        "kind: NetworkPolicy\nname: more\nnamespace: /acme/shop\naction: Reject\nmode: Outgoing\nsubject: [[app=web]]\nobject: [[app=nothing]]\n",
    );
    wait_until("web takes the commit", PUSH_LIMIT, || {
        lab.config("web")["version"] != version
    });
    assert_eq!(
        lab.config("web")["registry_conflicts"],
        serde_json::json!([])
    );

    // web's enforcer stops: its lease lapses (3 s) and web leaves the registry; now the
    // NAT-token claim of its address succeeds.
    lab.stop_enforcer("web");
    wait_until("web's lease lapses", Duration::from_secs(20), || {
        !lab.ctl_ok(&["get", "pus"]).contains("/acme/shop:web ")
    });
    wait_until(
        "the address taken by a new PU",
        Duration::from_secs(40),
        || {
            lab.ctl_ok(&["get", "pus"])
                .contains(&format!("/acme/shop:eve  ips {web_ip}"))
        },
    );
}
