//! Services: clients call a Service's virtual address and port, the enforcers send each
//! connection to one of its endpoints through the mesh tunnel, decided there like any
//! PU → PU flow. web → api's Service (two api endpoints), api → db's Service, web →
//! db's Service refused by policy, a UDP Service, and one api endpoint's enforcer
//! killed: new connections and sessions go to the other endpoint at once.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::console::Lab;
use common::*;
use segmesh_testkit::{netns_enabled, wait_until};

const SERVICES: &str = "kind: Service\nname: api\nnamespace: /acme/shop\n\
addresses: [10.97.0.10, 'fd97::10']\nports: [{port: 80, targetPort: 8080}]\nselector: [app=api]\n---\n\
kind: Service\nname: db\nnamespace: /acme/shop\n\
addresses: [10.97.0.20]\nports: [{port: 5432}]\nselector: [app=db]\n---\n\
kind: Service\nname: empty\nnamespace: /acme/shop\n\
addresses: [10.97.0.30]\nports: [{port: 80}]\nselector: [app=nothing]\n---\n\
kind: Service\nname: api-udp\nnamespace: /acme/shop\n\
addresses: [10.97.0.10]\nports: [{port: 53, targetPort: 5353, protocol: udp}]\nselector: [app=api]\n---\n\
kind: NetworkPolicy\nname: web-to-api-udp\nnamespace: /acme/shop\naction: Allow\nmode: Bidirectional\n\
subject: [[app=web]]\nobject: [[app=api]]\nports: [udp/5353]\n---\n\
kind: Service\nname: outside\nnamespace: /acme/shop\n\
addresses: [10.97.0.40]\nports: [{port: 80, targetPort: 8443}]\nendpoints: [CONSOLE_IP]\n";

#[test]
fn netns_services_spread_skip_dead_endpoints_and_follow_policy() {
    if !netns_enabled() {
        return;
    }
    let mut lab = Lab::new("services", &["console", "web", "api", "api2", "db"], &[]);
    lab.boot = lab
        .ctl_ok(&[
            "token",
            "--name",
            "shop",
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
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/three-tier/policies.yaml"
    );
    lab.ctl_ok(&["apply", "-f", example]);
    let console_ip = lab.host("console").ip4.to_string();
    lab.publish(
        "services.yaml",
        &SERVICES.replace("CONSOLE_IP", &console_ip),
    );
    let seen: Vec<(&str, Arc<AtomicUsize>)> = ["api", "api2", "db"]
        .into_iter()
        .map(|n| (n, Arc::new(AtomicUsize::new(0))))
        .collect();
    for (name, app) in [
        ("web", "app=web"),
        ("api", "app=api"),
        ("api2", "app=api"),
        ("db", "app=db"),
    ] {
        let h = lab.host(name);
        capture(&h);
        // The Service range is routed like a cluster's (the enforcer captures it first).
        h.exec_ok(&["ip", "route", "add", "10.97.0.0/16", "dev", "eth0"]);
        h.exec_ok(&["ip", "-6", "route", "add", "fd97::/64", "dev", "eth0"]);
        let boot = lab.boot.clone();
        lab.start_enforcer(name, &[app, "env=prod"], &boot, true);
    }
    for (name, s) in &seen {
        let h = lab.host(name);
        let port = if *name == "db" { 5432 } else { 8080 };
        greet(&h, SocketAddr::new(h.ip4.into(), port), s.clone());
    }
    let udp_seen: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    for (name, s) in ["api", "api2"].into_iter().zip(&udp_seen) {
        let h = lab.host(name);
        in_ns(&h, udp_echo(SocketAddr::new(h.ip4.into(), 5353), s.clone()));
    }
    // Every enforcer sees the four PUs and the Services' endpoints.
    for name in ["web", "api"] {
        wait_until(
            &format!("{name} sees everyone"),
            Duration::from_secs(10),
            || lab.config(name)["registry"].as_u64() == Some(8),
        );
    }
    let listed = lab.ctl_ok(&["get", "services"]);
    assert!(
        listed.contains("/acme/shop:api  addresses 10.97.0.10,fd97::10  ports tcp/80->8080")
            && listed.contains("(/acme/shop:api)")
            && listed.contains("(/acme/shop:api2)")
            && listed.contains(
                "/acme/shop:empty  addresses 10.97.0.30  ports tcp/80->80  endpoints none"
            ),
        "{listed}"
    );

    let vip = |ip: &str, port: u16| SocketAddr::new(ip.parse().unwrap(), port);
    let hosts: std::collections::HashMap<&str, segmesh_testkit::Host> = ["web", "api"]
        .into_iter()
        .map(|n| (n, lab.host(n)))
        .collect();
    let from = |name: &str, to: SocketAddr| in_ns(&hosts[name], attempt(to)).join().unwrap();
    // web → api's Service: both endpoints used over 20 connections, over v4 and v6.
    for i in 0..20 {
        let to = if i % 2 == 0 {
            vip("10.97.0.10", 80)
        } else {
            vip("fd97::10", 80)
        };
        assert_eq!(from("web", to), Attempt::Greeted, "connection {i} to {to}");
    }
    let (a, b) = (
        seen[0].1.load(Ordering::SeqCst),
        seen[1].1.load(Ordering::SeqCst),
    );
    assert_eq!(a + b, 20);
    assert!(a >= 5 && b >= 5, "both endpoints used: api {a}, api2 {b}");
    // api → db's Service; web → db's Service refused by policy (db answers nobody but
    // api on 5432).
    assert_eq!(from("api", vip("10.97.0.20", 5432)), Attempt::Greeted);
    refused_fast(from("web", vip("10.97.0.20", 5432)));
    assert_eq!(seen[2].1.load(Ordering::SeqCst), 1);
    // A Service without endpoints: refused at once.
    refused_fast(from("web", vip("10.97.0.30", 80)));
    // A Service whose endpoint is outside the mesh: an external flow to it, decided
    // against the external networks its address falls in (none allows web to reach
    // the console's port: refused).
    refused_fast(from("web", vip("10.97.0.40", 80)));
    // A UDP Service: answered from the Service's address, by both endpoints in turn.
    let ask_dns = || {
        in_ns(&hosts["web"], ask(vip("10.97.0.10", 53), b"query"))
            .join()
            .unwrap()
    };
    for i in 0..4 {
        assert_eq!(
            ask_dns(),
            Some((b"query".to_vec(), vip("10.97.0.10", 53))),
            "UDP session {i}"
        );
    }
    let (ua, ub) = (
        udp_seen[0].load(Ordering::SeqCst),
        udp_seen[1].load(Ordering::SeqCst),
    );
    assert!(ua >= 1 && ub >= 1 && ua + ub == 4, "api {ua}, api2 {ub}");

    // One api endpoint's enforcer dies: every new connection goes to the other, none
    // waits for the dead one.
    lab.stop_enforcer("api");
    let before = seen[1].1.load(Ordering::SeqCst);
    for i in 0..10 {
        let start = Instant::now();
        assert_eq!(
            from("web", vip("10.97.0.10", 80)),
            Attempt::Greeted,
            "connection {i} after api's enforcer died"
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "connection {i} took {:?}",
            start.elapsed()
        );
    }
    assert_eq!(seen[1].1.load(Ordering::SeqCst), before + 10);
    let before = udp_seen[1].load(Ordering::SeqCst);
    for i in 0..3 {
        assert_eq!(
            ask_dns(),
            Some((b"query".to_vec(), vip("10.97.0.10", 53))),
            "UDP session {i} after api's enforcer died"
        );
    }
    assert_eq!(udp_seen[1].load(Ordering::SeqCst), before + 3);

    // The records name the Service and the endpoint each flow went to.
    wait_until("web's records", Duration::from_secs(10), || {
        lab.log("web")
            .iter()
            .filter(|r| r["destination"]["service"].is_string())
            .count()
            >= 3
    });
    let records = lab.log("web");
    let refused_db = records
        .iter()
        .find(|r| r["destination"]["service"] == "/acme/shop:db")
        .unwrap_or_else(|| panic!("no record of web → db's Service: {records:#?}"));
    assert_eq!(refused_db["verdict"], "reject", "{refused_db}");
    assert_eq!(
        refused_db["destination"]["pu"], "/acme/shop:db",
        "{refused_db}"
    );
    assert_eq!(refused_db["destination"]["port"], 5432, "{refused_db}");
    assert!(
        !refused_db["policies"].as_array().unwrap().is_empty() || refused_db["reason"] == "default",
        "the deciding policy: {refused_db}"
    );
    let outside = records
        .iter()
        .find(|r| r["destination"]["service"] == "/acme/shop:outside")
        .unwrap_or_else(|| panic!("no record of the outside Service: {records:#?}"));
    assert_eq!(outside["destination"]["ip"], console_ip, "{outside}");
    assert_eq!(outside["destination"]["port"], 8443, "{outside}");
    assert!(outside["destination"]["pu"].is_null(), "{outside}");
    assert_eq!(
        outside["destination"]["external"],
        serde_json::json!(["/acme:internet"]),
        "{outside}"
    );
    assert_eq!(outside["verdict"], "reject", "{outside}");
    let empty = records
        .iter()
        .find(|r| r["destination"]["service"] == "/acme/shop:empty")
        .unwrap_or_else(|| panic!("no record of the empty Service: {records:#?}"));
    assert_eq!(empty["reason"], "no-endpoint", "{empty}");
}
