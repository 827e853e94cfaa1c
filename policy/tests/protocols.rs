//! Protocols in ports: `udp/N`, `udp/N-M` and `icmp` (echo) beside `tcp/…`, in policies,
//! external networks and policy tests. Every row is decided by the compiled engine and
//! the naive evaluator, which must agree.

mod common;

use common::{P, decide_both, load_str};
use segmesh_policy::{Direction, Engine, FlowPort, Verdict, evaluate};

use Direction::{Incoming, Outgoing};
use Verdict::{Allow, Reject};

const POLICIES: &str = r#"
kind: ExternalNetwork
name: resolvers
namespace: /org
entries: [192.0.2.53]
ports: [udp/53, tcp/53]
---
kind: ExternalNetwork
name: internet
namespace: /org
entries: [0.0.0.0/0]
---
kind: NetworkPolicy
name: dns
namespace: /org
action: Allow
mode: Outgoing
subject: [[app=web]]
object: [[ext:name=resolvers]]
ports: [udp/53, tcp/53]
---
kind: NetworkPolicy
name: games
namespace: /org
action: Allow
mode: Bidirectional
subject: [[app=web]]
object: [[app=api]]
ports: [udp/7000-7010, tcp/8080]
---
kind: NetworkPolicy
name: ping-api
namespace: /org
action: Allow
mode: Bidirectional
subject: [[app=web]]
object: [[app=api]]
ports: [icmp]
---
kind: NetworkPolicy
name: ping-out
namespace: /org
action: Allow
mode: Outgoing
subject: [[app=web]]
object: [[ext:name=internet]]
ports: [icmp]
---
kind: NetworkPolicy
name: quarantine
namespace: /org
action: Reject
mode: Outgoing
subject: [[state=quarantined]]
object: [[$identity=processingunit], [$identity=externalnetwork]]
tier: emergency
---
kind: PolicyTest
cases:
  - {name: dns over udp, from: [app=web], to: {ip: 192.0.2.53}, port: udp/53, expect: allow, namespace: /org}
  - {name: dns over tcp, from: [app=web], to: {ip: 192.0.2.53}, port: tcp/53, expect: allow, namespace: /org}
  - {name: not udp/54, from: [app=web], to: {ip: 192.0.2.53}, port: udp/54, expect: reject, namespace: /org}
  - {name: udp range, from: [app=web], to: [app=api], port: udp/7005, expect: allow, namespace: /org}
  - {name: tcp is not udp, from: [app=web], to: [app=api], port: tcp/7005, expect: reject, namespace: /org}
  - {name: udp is not tcp, from: [app=web], to: [app=api], port: udp/8080, expect: reject, namespace: /org}
  - {name: ping a peer, from: [app=web], to: [app=api], port: icmp, expect: allow, namespace: /org}
  - {name: ping out, from: [app=web], to: {ip: 198.51.100.1}, port: icmp, expect: allow, namespace: /org}
  - {name: no ping back, from: [app=api], to: [app=web], port: icmp, expect: reject, namespace: /org}
"#;

#[test]
fn policy_tests_take_protocols() {
    let loaded = load_str(POLICIES);
    let engine = Engine::compile(loaded.set.clone());
    assert_eq!(loaded.tests.len(), 9);
    for case in &loaded.tests {
        let o = evaluate(&engine, case);
        assert_eq!(o.actual, case.expect, "{}: {o:?}", case.name);
    }
}

#[test]
fn each_protocol_is_decided_apart() {
    let engine = Engine::compile(load_str(POLICIES).set);
    let web: &[&str] = &["app=web"];
    let rows: &[(Direction, &[&str], P<'_>, FlowPort, Verdict)] = &[
        (Outgoing, web, P::Ip("192.0.2.53"), FlowPort::udp(53), Allow),
        (Outgoing, web, P::Ip("192.0.2.53"), FlowPort::tcp(53), Allow),
        (
            Outgoing,
            web,
            P::Ip("192.0.2.53"),
            FlowPort::udp(5353),
            Reject,
        ),
        (
            Outgoing,
            web,
            P::Pu("/org", &["app=api"]),
            FlowPort::udp(7000),
            Allow,
        ),
        (
            Outgoing,
            web,
            P::Pu("/org", &["app=api"]),
            FlowPort::udp(7011),
            Reject,
        ),
        (
            Outgoing,
            web,
            P::Pu("/org", &["app=api"]),
            FlowPort::tcp(7000),
            Reject,
        ),
        (
            Outgoing,
            web,
            P::Pu("/org", &["app=api"]),
            FlowPort::ICMP_ECHO,
            Allow,
        ),
        (
            Incoming,
            &["app=api"],
            P::Pu("/org", web),
            FlowPort::udp(7010),
            Allow,
        ),
        (
            Incoming,
            &["app=api"],
            P::Pu("/org", web),
            FlowPort::ICMP_ECHO,
            Allow,
        ),
        (
            Outgoing,
            web,
            P::Ip("198.51.100.1"),
            FlowPort::ICMP_ECHO,
            Allow,
        ),
        (
            Outgoing,
            web,
            P::Ip("198.51.100.1"),
            FlowPort::udp(53),
            Reject,
        ),
    ];
    for (dir, own, peer, port, want) in rows {
        let d = decide_both(&engine, *dir, "/org", own, *peer, *port);
        assert_eq!(d.verdict, *want, "{dir:?} {own:?} {port}");
    }
}

/// An emergency reject with no ports (`any`) covers every protocol.
#[test]
fn a_reject_everything_covers_udp_and_icmp() {
    let engine = Engine::compile(load_str(POLICIES).set);
    let q: &[&str] = &["app=web", "state=quarantined"];
    for port in [
        FlowPort::tcp(8080),
        FlowPort::udp(7000),
        FlowPort::udp(53),
        FlowPort::ICMP_ECHO,
    ] {
        for peer in [P::Pu("/org", &["app=api"]), P::Ip("192.0.2.53")] {
            let d = decide_both(&engine, Outgoing, "/org", q, peer, port);
            assert_eq!(d.verdict, Reject, "{port}");
        }
    }
}
