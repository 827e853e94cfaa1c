//! Nothing gets around the enforcer (the parts of complete mediation that exist so far):
//! a neighbour cannot use a pod as a relay, a process that merely runs as the proxy uid
//! is captured, the enforcer's ports are reserved, and its admin port cannot be taken
//! over on the other address family.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use segmesh_testkit::{Host, Topology, netns_enabled, wait_until};

/// Allows everything in and out, so that only capture and the enforcer's own checks can
/// stop a relay.
fn permissive(dir: &Scratch) -> std::path::PathBuf {
    std::fs::write(
        dir.0.join("policies.yaml"),
        r#"
kind: ExternalNetwork
name: everyone
namespace: /lab
entries: [0.0.0.0/0, "::/0"]
---
kind: NetworkPolicy
name: all-in
namespace: /lab
action: Allow
mode: Incoming
subject: [[ext:name=everyone]]
object: [[app=work]]
ports: [tcp/1-65535]
log: true
---
kind: NetworkPolicy
name: all-out
namespace: /lab
action: Allow
mode: Outgoing
subject: [[app=work]]
object: [[ext:name=everyone]]
ports: [tcp/7000]
log: true
"#,
    )
    .unwrap();
    let path = dir.0.join("enforcer.yaml");
    std::fs::write(
        &path,
        "pu: {name: work, namespace: /lab, tags: [app=work]}\npolicies: [policies.yaml]\nflow_log: flows.jsonl\n",
    )
    .unwrap();
    path
}

/// `work` captured, its enforcer started with [`permissive`] policies: the scratch
/// directory (its flow records).
fn permissive_enforcer(topo: &Topology, tag: &str) -> Scratch {
    let dir = Scratch::new(tag);
    let config = permissive(&dir);
    capture(topo.host("work"));
    start_enforcer(topo, "work", &config);
    dir
}

/// The relay lab: `work` (captured, [`permissive_enforcer`]), its neighbour `nbr` and
/// `beyond`, a host a relay would reach.
fn relay_lab(tag: &str) -> (Topology, Host, Host, Host, Scratch) {
    let topo = Topology::new(&["work", "nbr", "beyond"]);
    let (work, nbr, beyond) = (
        topo.host("work").clone(),
        topo.host("nbr").clone(),
        topo.host("beyond").clone(),
    );
    let dir = permissive_enforcer(&topo, tag);
    (topo, work, nbr, beyond, dir)
}

/// A hand-made capture rule (as older rules or an operator's mistake might make) that
/// diverts TCP for `to`, an address not the pod's own, to the enforcer's inbound port.
fn divert_to_enforcer(work: &Host, to: std::net::IpAddr) {
    let (tables, on_ip) = if to.is_ipv6() {
        ("ip6tables", "::")
    } else {
        ("iptables", "0.0.0.0")
    };
    work.exec_ok(&[
        tables,
        "-w",
        "-t",
        "mangle",
        "-I",
        "SEGMESH_INBOUND",
        "1",
        "-p",
        "tcp",
        "-d",
        &to.to_string(),
        "-j",
        "TPROXY",
        "--on-port",
        "15006",
        "--on-ip",
        on_ip,
        "--tproxy-mark",
        "0x539/0xffffffff",
    ]);
}

/// A connection attempt that gives up after 3 s (a relay that drops packets never
/// answers).
async fn short_attempt(to: SocketAddr) -> Attempt {
    match tokio::time::timeout(Duration::from_secs(3), attempt(to)).await {
        Ok(a) => a,
        Err(_) => Attempt::Other("no answer".into()),
    }
}

#[test]
fn netns_mediation_a_pod_is_no_relay() {
    if !netns_enabled() {
        return;
    }
    let (_topo, work, nbr, beyond, dir) = relay_lab("relay");
    let seen = Arc::new(AtomicUsize::new(0));
    let target = SocketAddr::new(beyond.ip4.into(), 7000);
    let _ = greet(&beyond, target, seen.clone());
    // The control: beyond answers when reached directly.
    wait_until("beyond listens", Duration::from_secs(10), || {
        in_ns(&nbr, short_attempt(target)).join().unwrap() == Attempt::Greeted
    });
    assert_eq!(seen.swap(0, Ordering::SeqCst), 1);

    // The neighbour routes beyond's address through the pod.
    let via = work.ip4.to_string();
    nbr.exec_ok(&[
        "ip",
        "route",
        "replace",
        &format!("{}/32", beyond.ip4),
        "via",
        &via,
    ]);
    let relayed = in_ns(&nbr, short_attempt(target)).join().unwrap();
    assert_ne!(relayed, Attempt::Greeted, "the pod relayed the connection");
    assert_eq!(seen.load(Ordering::SeqCst), 0, "nothing reached beyond");
    // The same over IPv6.
    let target6 = SocketAddr::new(beyond.ip6.into(), 7000);
    let _ = greet(&beyond, target6, seen.clone());
    let via6 = work.ip6.to_string();
    let route6 = format!("{}/128", beyond.ip6);
    nbr.exec_ok(&["ip", "-6", "route", "replace", &route6, "via", &via6]);
    let relayed6 = in_ns(&nbr, short_attempt(target6)).join().unwrap();
    assert_ne!(relayed6, Attempt::Greeted, "the pod relayed over IPv6");
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "nothing reached beyond over IPv6"
    );

    // Even if capture diverted it (older rules, a hand-made rule), the enforcer refuses
    // a connection for an address that is not the pod's own, and records it.
    divert_to_enforcer(&work, beyond.ip4.into());
    refused_fast(in_ns(&nbr, short_attempt(target)).join().unwrap());
    assert_eq!(seen.load(Ordering::SeqCst), 0, "nothing reached beyond");
    wait_until("the refusal's record", Duration::from_secs(10), || {
        flow_records(&dir)
            .iter()
            .any(|r| r["reason"] == "not-local")
    });
    let records = flow_records(&dir);
    let r = records.iter().find(|r| r["reason"] == "not-local").unwrap();
    assert_eq!(r["verdict"], "reject", "{r}");
    assert_eq!(r["destination"]["ip"], beyond.ip4.to_string(), "{r}");
    assert_eq!(r["source"]["ip"], nbr.ip4.to_string(), "{r}");
}

/// The enforcer keeps its namespace's list of addresses (`proxy/src/local.rs`) instead of
/// listing them per connection: an address the pod had, and the enforcer saw as its own,
/// must stop being its own the moment it is taken off, or the pod relays to whoever has
/// it now. IPv4, then IPv6.
#[test]
fn netns_mediation_an_address_taken_off_the_pod_is_no_longer_its_own() {
    if !netns_enabled() {
        return;
    }
    let (_topo, work, nbr, beyond, dir) = relay_lab("taken-off");
    // The pod's own server (both families), on the port a relay would reach beyond on.
    let seen_pod = Arc::new(AtomicUsize::new(0));
    let any = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 7000);
    let _w = greet(&work, any, seen_pod.clone());
    for v6 in [false, true] {
        let taken = ip(&beyond, v6);
        let target = SocketAddr::new(taken, 7000);
        let seen_beyond = Arc::new(AtomicUsize::new(0));
        let _b = greet(&beyond, target, seen_beyond.clone());

        // The pod gets beyond's address as a second address of its own; the neighbour
        // routes it through the pod.
        let (family, host_route) = if v6 {
            ("-6", format!("{taken}/128"))
        } else {
            ("-4", format!("{taken}/32"))
        };
        // `nodad`: beyond has the address on the same link.
        let mut add = vec!["ip", family, "addr", "add", &host_route, "dev", "eth0"];
        if v6 {
            add.push("nodad");
        }
        work.exec_ok(&add);
        let via = ip(&work, v6).to_string();
        nbr.exec_ok(&["ip", family, "route", "replace", &host_route, "via", &via]);
        // While it is the pod's, the enforcer takes it as its own (its list now holds
        // it) and the pod's server answers.
        assert_eq!(
            in_ns(&nbr, short_attempt(target)).join().unwrap(),
            Attempt::Greeted,
            "{taken} while the pod's"
        );
        assert_eq!(seen_pod.swap(0, Ordering::SeqCst), 1);
        assert_eq!(seen_beyond.load(Ordering::SeqCst), 0);

        // Taken off; a hand-made rule keeps diverting it to the enforcer (as in
        // `netns_mediation_a_pod_is_no_relay`).
        work.exec_ok(&["ip", family, "addr", "del", &host_route, "dev", "eth0"]);
        divert_to_enforcer(&work, taken);
        // At once, with no wait: refused as not the pod's, and nothing reaches beyond.
        refused_fast(in_ns(&nbr, short_attempt(target)).join().unwrap());
        assert_eq!(
            seen_beyond.load(Ordering::SeqCst),
            0,
            "the pod relayed to {taken}, an address it no longer has"
        );
        assert_eq!(seen_pod.load(Ordering::SeqCst), 0);
        wait_until("the refusal's record", Duration::from_secs(10), || {
            flow_records(&dir)
                .iter()
                .any(|r| r["reason"] == "not-local" && r["destination"]["ip"] == taken.to_string())
        });
    }
}

#[test]
fn netns_mediation_the_proxy_uid_alone_is_captured() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["work", "ext"]);
    let (work, ext) = (topo.host("work").clone(), topo.host("ext").clone());
    let dir = permissive_enforcer(&topo, "uid");
    let seen = Arc::new(AtomicUsize::new(0));
    for port in [7000, 7001] {
        let _ = greet(&ext, SocketAddr::new(ext.ip4.into(), port), seen.clone());
    }

    // A process running as uid 1337 without the enforcer's mark: captured and decided
    // like any other (7001 is not allowed: refused; 7000 is: relayed by the enforcer).
    let as_proxy_uid = |port: u16| {
        let script = format!("exec 3<>/dev/tcp/{}/{port} && head -c 6 <&3", ext.ip4);
        work.command("setpriv")
            .args([
                "--reuid=1337",
                "--regid=1337",
                "--clear-groups",
                "bash",
                "-c",
                &script,
            ])
            .output()
            .unwrap()
    };
    let refused = as_proxy_uid(7001);
    assert!(!refused.status.success(), "uid 1337 got past the enforcer");
    assert_eq!(seen.load(Ordering::SeqCst), 0, "nothing reached ext:7001");
    let allowed = as_proxy_uid(7000);
    assert_eq!(String::from_utf8_lossy(&allowed.stdout), "hello\n");
    wait_until("both records", Duration::from_secs(10), || {
        let r = flow_records(&dir);
        r.iter().any(|r| r["destination"]["port"] == 7001)
            && r.iter().any(|r| r["destination"]["port"] == 7000)
    });
    let records = flow_records(&dir);
    let at = |port: u16| {
        records
            .iter()
            .find(|r| r["destination"]["port"] == port)
            .unwrap()
            .clone()
    };
    assert_eq!(at(7001)["verdict"], "reject");
    assert_eq!(at(7001)["reason"], "default");
    assert_eq!(at(7000)["verdict"], "allow");
    assert_eq!(at(7000)["policies"], serde_json::json!(["/lab:all-out"]));

    // The enforcer's ports are reserved (no ephemeral port lands on them), and its admin
    // port is held on both families.
    let reserved = work.exec_ok(&["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"]);
    assert_eq!(reserved.trim(), "15001,15006,15008,15020");
    let taken = work
        .thread(|| std::net::TcpListener::bind("[::]:15020").map(|_| ()))
        .join()
        .unwrap();
    assert_eq!(
        taken.unwrap_err().kind(),
        std::io::ErrorKind::AddrInUse,
        "a workload could take the admin port over IPv6"
    );
}

/// Echo requests of one family that reached `h` (a counting rule inserted first).
fn echo_counter(h: &segmesh_testkit::Host, v6: bool) -> impl Fn() -> u64 + use<> {
    let (tool, rule): (&str, &[&str]) = if v6 {
        ("ip6tables", &["-p", "ipv6-icmp", "--icmpv6-type", "128"])
    } else {
        ("iptables", &["-p", "icmp", "--icmp-type", "8"])
    };
    let mut args = vec![tool, "-w", "-I", "INPUT"];
    args.extend(rule);
    args.extend(["-j", "ACCEPT"]);
    h.exec_ok(&args);
    let h = h.clone();
    move || {
        let out = h.exec_ok(&[tool, "-w", "-L", "INPUT", "-v", "-x", "-n"]);
        // The first rule's packet count (the counting rule was inserted first).
        out.lines()
            .nth(2)
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    }
}

fn ping(from: &segmesh_testkit::Host, to: std::net::IpAddr) -> bool {
    from.exec(&["ping", "-c", "1", "-W", "1", &to.to_string()])
        .status
        .success()
}

/// ICMP (and every protocol but TCP and UDP) is dropped both ways for a captured
/// workload, v4 and v6, while IPv6 neighbour discovery keeps TCP over v6 working.
#[test]
fn netns_mediation_icmp_is_dropped_both_ways() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["work", "ext", "other"]);
    let (work, ext, other) = (
        topo.host("work").clone(),
        topo.host("ext").clone(),
        topo.host("other").clone(),
    );
    let _dir = permissive_enforcer(&topo, "icmp");
    for v6 in [false, true] {
        // The control: ext and other ping each other.
        assert!(ping(&ext, ip(&other, v6)), "ext reaches other (v6: {v6})");
        let arrived = echo_counter(&ext, v6);
        assert!(!ping(&work, ip(&ext, v6)), "work pinged ext (v6: {v6})");
        assert_eq!(
            arrived(),
            0,
            "an echo request from work reached ext (v6: {v6})"
        );
        assert!(!ping(&ext, ip(&work, v6)), "ext pinged work (v6: {v6})");
    }
    // TCP over both families still works (neighbour discovery is not dropped).
    let seen = Arc::new(AtomicUsize::new(0));
    for v6 in [false, true] {
        let to = SocketAddr::new(ip(&ext, v6), 7000);
        let _ = greet(&ext, to, seen.clone());
        wait_until("an allowed connection", Duration::from_secs(10), || {
            in_ns(&work, short_attempt(to)).join().unwrap() == Attempt::Greeted
        });
    }
}

/// Quarantine means nobody: under an emergency reject-all, TCP, UDP and ICMP over both
/// families to an external host and to a host behind another router get nothing
/// through; every attempt is recorded with the deciding policy.
#[test]
fn netns_mediation_quarantine_means_nobody() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["work", "ext", "gw", "far"]);
    let (work, ext, gw, far) = (
        topo.host("work").clone(),
        topo.host("ext").clone(),
        topo.host("gw").clone(),
        topo.host("far").clone(),
    );
    let dir = Scratch::new("quarantine");
    std::fs::write(
        dir.0.join("policies.yaml"),
        r#"
kind: ExternalNetwork
name: everyone
namespace: /lab
entries: [0.0.0.0/0, "::/0"]
---
kind: NetworkPolicy
name: all-out
namespace: /lab
action: Allow
mode: Outgoing
subject: [[app=work]]
object: [[ext:name=everyone]]
---
kind: NetworkPolicy
name: quarantine
namespace: /lab
action: Reject
mode: Outgoing
subject: [[state=quarantined]]
object: [[$identity=processingunit, $namespace=*], [$identity=externalnetwork]]
tier: emergency
log: true
"#,
    )
    .unwrap();
    let config = dir.0.join("enforcer.yaml");
    std::fs::write(
        &config,
        "pu: {name: work, namespace: /lab, tags: [app=work, state=quarantined]}\npolicies: [policies.yaml]\nflow_log: flows.jsonl\n",
    )
    .unwrap();
    // `far` is reached through `gw` (a host behind the pod's link).
    for (h, via) in [(&work, &gw), (&ext, &gw)] {
        h.exec_ok(&[
            "ip",
            "route",
            "replace",
            &format!("{}/32", far.ip4),
            "via",
            &via.ip4.to_string(),
        ]);
        h.exec_ok(&[
            "ip",
            "-6",
            "route",
            "replace",
            &format!("{}/128", far.ip6),
            "via",
            &via.ip6.to_string(),
        ]);
    }
    gw.exec_ok(&[
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
    ]);
    capture(&work);
    start_enforcer(&topo, "work", &config);
    let seen = Arc::new(AtomicUsize::new(0));
    for (h, v6) in [(&ext, false), (&ext, true), (&far, false), (&far, true)] {
        let _ = greet(h, SocketAddr::new(ip(h, v6), 7000), seen.clone());
    }
    let udp_seen = Arc::new(AtomicUsize::new(0));
    for (h, v6) in [(&ext, false), (&ext, true), (&far, false), (&far, true)] {
        let _ = in_ns(
            h,
            udp_echo(SocketAddr::new(ip(h, v6), 7000), udp_seen.clone()),
        );
    }
    // The control: ext reaches far through gw.
    wait_until("far answers through gw", Duration::from_secs(10), || {
        in_ns(&ext, short_attempt(SocketAddr::new(far.ip4.into(), 7000)))
            .join()
            .unwrap()
            == Attempt::Greeted
    });
    let control = seen.swap(0, Ordering::SeqCst);
    assert!(control >= 1);

    for (h, v6) in [(&ext, false), (&ext, true), (&far, false), (&far, true)] {
        let to = SocketAddr::new(ip(h, v6), 7000);
        refused_fast(in_ns(&work, attempt(to)).join().unwrap());
        let answered = in_ns(&work, ask(to, b"leak")).join().unwrap().is_some();
        assert!(!answered, "a UDP answer from {to}");
        assert!(!ping(&work, ip(h, v6)), "a ping reached {}", ip(h, v6));
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "a TCP connection got through"
    );
    assert_eq!(udp_seen.load(Ordering::SeqCst), 0, "a datagram got through");
    wait_until("every attempt's record", Duration::from_secs(10), || {
        let r = flow_records(&dir);
        r.iter().filter(|r| r["protocol"].is_null()).count() >= 4
            && r.iter().filter(|r| r["protocol"] == "udp").count() >= 4
            && r.iter().filter(|r| r["protocol"] == "icmp").count() >= 4
    });
    for r in flow_records(&dir) {
        assert_eq!(r["verdict"], "reject", "{r}");
        assert_eq!(r["policies"], serde_json::json!(["/lab:quarantine"]), "{r}");
        assert_eq!(r["tier"], "emergency", "{r}");
    }
}

/// An `icmp` policy lets echo through, per peer and direction (v4 and v6), and the
/// decisions are recorded; echo no policy allows stays dropped.
#[test]
fn netns_mediation_echo_is_decided_by_policy() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["work", "ext", "other"]);
    let (work, ext, other) = (
        topo.host("work").clone(),
        topo.host("ext").clone(),
        topo.host("other").clone(),
    );
    let dir = Scratch::new("echo");
    std::fs::write(
        dir.0.join("policies.yaml"),
        format!(
            r#"
kind: ExternalNetwork
name: monitoring
namespace: /lab
entries: ["{}", "{}"]
---
kind: NetworkPolicy
name: ping-monitoring
namespace: /lab
action: Allow
mode: Outgoing
subject: [[app=work]]
object: [[ext:name=monitoring]]
ports: [icmp]
log: true
---
kind: NetworkPolicy
name: monitoring-pings
namespace: /lab
action: Allow
mode: Incoming
subject: [[ext:name=monitoring]]
object: [[app=work]]
ports: [icmp]
log: true
"#,
            ext.ip4, ext.ip6
        ),
    )
    .unwrap();
    let config = dir.0.join("enforcer.yaml");
    std::fs::write(
        &config,
        "pu: {name: work, namespace: /lab, tags: [app=work]}\npolicies: [policies.yaml]\nflow_log: flows.jsonl\n",
    )
    .unwrap();
    capture(&work);
    start_enforcer(&topo, "work", &config);
    for v6 in [false, true] {
        assert!(
            ping(&work, ip(&ext, v6)),
            "work pings monitoring (v6: {v6})"
        );
        assert!(
            ping(&ext, ip(&work, v6)),
            "monitoring pings work (v6: {v6})"
        );
        let arrived = echo_counter(&other, v6);
        assert!(!ping(&work, ip(&other, v6)), "work pinged other (v6: {v6})");
        assert_eq!(arrived(), 0, "an echo request reached other (v6: {v6})");
        assert!(!ping(&other, ip(&work, v6)), "other pinged work (v6: {v6})");
    }
    wait_until("the echo records", Duration::from_secs(10), || {
        flow_records(&dir)
            .iter()
            .filter(|r| r["protocol"] == "icmp")
            .count()
            >= 8
    });
    let records = flow_records(&dir);
    let find = |dir: &str, verdict: &str, policy: Option<&str>| {
        records.iter().any(|r| {
            r["protocol"] == "icmp"
                && r["direction"] == dir
                && r["verdict"] == verdict
                && policy.is_none_or(|p| r["policies"] == serde_json::json!([p]))
        })
    };
    assert!(
        find("outgoing", "allow", Some("/lab:ping-monitoring")),
        "{records:#?}"
    );
    assert!(
        find("incoming", "allow", Some("/lab:monitoring-pings")),
        "{records:#?}"
    );
    assert!(find("outgoing", "reject", None), "{records:#?}");
    assert!(find("incoming", "reject", None), "{records:#?}");
}
