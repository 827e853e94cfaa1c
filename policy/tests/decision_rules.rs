//! One table row per rule of DESIGN.md's decision procedure and case evaluation. Every
//! row is decided by the compiled engine and the naive evaluator, which must agree.

mod common;

use common::{P, decide_both, load_str};
use segmesh_policy::{Decision, Direction, Engine, Reason, Tier, Verdict, evaluate};

use Direction::{Incoming, Outgoing};
use Verdict::{Allow, Reject};

/// Policies used by most rows. Namespaces: /org (policies propagate), /org/app,
/// /org/app/child, /org/other, /org/lab (discovery), /org/lab/strict (discovery off).
const BASE: &str = r#"
kind: Namespace
name: /org/lab
discovery: true
---
kind: Namespace
name: /org/lab/strict
discovery: false
---
kind: ExternalNetwork
name: internet
namespace: /org
tags: [zone=public]
entries: [0.0.0.0/0, "::/0"]
---
kind: ExternalNetwork
name: partner
namespace: /org
tags: [zone=partner]
entries: [203.0.113.0/24, "*.partner.example"]
ports: [tcp/443]
---
kind: ExternalNetwork
name: app-only
namespace: /org/app
tags: [zone=private]
entries: [192.0.2.0/24]
---
kind: NetworkPolicy
name: out-only
namespace: /org/app
action: Allow
mode: Outgoing
subject: [[role=client]]
object: [[role=server]]
ports: [tcp/1000]
---
kind: NetworkPolicy
name: in-only
namespace: /org/app
action: Allow
mode: Incoming
subject: [[role=client]]
object: [[role=server]]
ports: [tcp/1001]
---
kind: NetworkPolicy
name: both
namespace: /org/app
action: Allow
mode: Bidirectional
subject: [[role=client, env=prod], [role=batch]]
object: [[role=server]]
ports: [tcp/1002, tcp/2000-2010]
encrypt: false
---
kind: NetworkPolicy
name: any-port
namespace: /org/app
action: Allow
mode: Bidirectional
subject: [[role=admin]]
object: [[role=*]]
---
kind: NetworkPolicy
name: reject-2005
namespace: /org/app
action: Reject
mode: Incoming
subject: [[$identity=processingunit]]
object: [[role=server]]
ports: [tcp/2005]
---
kind: NetworkPolicy
name: emergency-block
namespace: /org
tier: emergency
action: Reject
mode: Bidirectional
subject: [[bad=true]]
object: [[role=*]]
---
kind: NetworkPolicy
name: infra-allow
namespace: /org
tier: infrastructure
action: Allow
mode: Bidirectional
subject: [[role=monitor]]
object: [[role=server]]
encrypt: false
log: true
---
kind: NetworkPolicy
name: app-reject-monitor
namespace: /org/app
action: Reject
mode: Bidirectional
subject: [[role=monitor]]
object: [[role=server]]
---
kind: NetworkPolicy
name: monitor-encrypted
namespace: /org
tier: infrastructure
action: Allow
mode: Bidirectional
subject: [[role=monitor, secure=yes]]
object: [[role=server]]
---
kind: NetworkPolicy
name: staged-reject
namespace: /org
tier: emergency
action: Reject
mode: Bidirectional
subject: [[role=client]]
object: [[role=server]]
ports: [tcp/1002]
enforce: false
---
kind: NetworkPolicy
name: staged-allow
namespace: /org/app
action: Allow
mode: Bidirectional
subject: [[role=client]]
object: [[role=db]]
enforce: false
---
kind: NetworkPolicy
name: here-only
namespace: /org
propagate: false
action: Allow
mode: Bidirectional
subject: [[role=root-client]]
object: [[role=root-server]]
---
kind: NetworkPolicy
name: child-policy
namespace: /org/app/child
action: Allow
mode: Bidirectional
subject: [[role=kid]]
object: [[role=kid]]
---
kind: NetworkPolicy
name: to-other-namespace
namespace: /org/app/child
action: Allow
mode: Outgoing
subject: [[role=kid]]
object: [[role=partner, $namespace=/org/other]]
---
kind: NetworkPolicy
name: to-any-namespace
namespace: /org/app/child
action: Allow
mode: Outgoing
subject: [[role=kid]]
object: [[role=anyone, $namespace=*]]
---
kind: NetworkPolicy
name: to-internet
namespace: /org/app
action: Allow
mode: Outgoing
subject: [[role=client]]
object: [[ext:name=internet]]
ports: [tcp/80]
---
kind: NetworkPolicy
name: to-partner
namespace: /org/app
action: Allow
mode: Outgoing
subject: [[role=client]]
object: [[zone=partner]]
---
kind: NetworkPolicy
name: to-private
namespace: /org
action: Allow
mode: Outgoing
subject: [[role=client]]
object: [[zone=private]]
---
kind: NetworkPolicy
name: from-anywhere
namespace: /org/app
action: Allow
mode: Incoming
subject: [[$identity=externalnetwork]]
object: [[role=public]]
---
kind: NetworkPolicy
name: bidi-to-any
namespace: /org/app
action: Allow
mode: Bidirectional
subject: [[role=bidi]]
object: [[$identity=processingunit], [zone=public]]
---
kind: NetworkPolicy
name: by-namespace-tag
namespace: /org
action: Allow
mode: Bidirectional
subject: [["$namespace=/org/other"]]
object: [[role=server]]
ports: [tcp/3000]
"#;

struct Row {
    rule: &'static str,
    dir: Direction,
    ns: &'static str,
    own: &'static [&'static str],
    peer: P<'static>,
    port: u16,
    verdict: Verdict,
    reason: Reason,
    tier: Option<Tier>,
    deciding: &'static [&'static str],
}

const APP: &str = "/org/app";

#[allow(clippy::too_many_arguments)] // one argument per table column
fn row(
    rule: &'static str,
    dir: Direction,
    ns: &'static str,
    own: &'static [&'static str],
    peer: P<'static>,
    port: u16,
    verdict: Verdict,
    deciding: &'static [&'static str],
) -> Row {
    let (reason, tier) = if deciding.is_empty() {
        (
            if verdict == Allow {
                Reason::Discovery
            } else {
                Reason::Default
            },
            None,
        )
    } else {
        (Reason::Policy, Some(Tier::Application))
    };
    Row {
        rule,
        dir,
        ns,
        own,
        peer,
        port,
        verdict,
        reason,
        tier,
        deciding,
    }
}

fn tier(mut r: Row, t: Tier) -> Row {
    r.tier = Some(t);
    r
}

fn names(engine: &Engine, d: &Decision) -> Vec<String> {
    d.policy_names(engine.set())
}

#[test]
fn decision_procedure_table() {
    let engine = Engine::compile(load_str(BASE).set);
    let client = P::Pu(APP, &["role=client"]);
    let server = P::Pu(APP, &["role=server"]);
    let rows = vec![
        // Step 1: mode fits the direction.
        row(
            "Outgoing applies at the client",
            Outgoing,
            APP,
            &["role=client"],
            server,
            1000,
            Allow,
            &["/org/app:out-only"],
        ),
        row(
            "Outgoing does not apply at the server",
            Incoming,
            APP,
            &["role=server"],
            client,
            1000,
            Reject,
            &[],
        ),
        row(
            "Incoming applies at the server",
            Incoming,
            APP,
            &["role=server"],
            client,
            1001,
            Allow,
            &["/org/app:in-only"],
        ),
        row(
            "Incoming does not apply at the client",
            Outgoing,
            APP,
            &["role=client"],
            server,
            1001,
            Reject,
            &[],
        ),
        row(
            "Bidirectional applies at the client",
            Outgoing,
            APP,
            &["role=client", "env=prod"],
            server,
            1002,
            Allow,
            &["/org/app:both"],
        ),
        row(
            "Bidirectional applies at the server",
            Incoming,
            APP,
            &["role=server"],
            P::Pu(APP, &["role=client", "env=prod"]),
            1002,
            Allow,
            &["/org/app:both"],
        ),
        // Step 1: selectors (OR of ANDs, wildcards).
        row(
            "an AND clause needs every tag",
            Outgoing,
            APP,
            &["role=client", "env=dev"],
            server,
            1002,
            Reject,
            &[],
        ),
        row(
            "the other OR clause matches",
            Outgoing,
            APP,
            &["role=batch"],
            server,
            1002,
            Allow,
            &["/org/app:both"],
        ),
        row(
            "the object must match the peer",
            Outgoing,
            APP,
            &["role=batch"],
            P::Pu(APP, &["role=db"]),
            1002,
            Reject,
            &[],
        ),
        row(
            "a wildcard matches any value",
            Outgoing,
            APP,
            &["role=admin"],
            P::Pu(APP, &["role=anything"]),
            1,
            Allow,
            &["/org/app:any-port"],
        ),
        row(
            "a wildcard needs the key",
            Outgoing,
            APP,
            &["role=admin"],
            P::Pu(APP, &["app=x"]),
            1,
            Reject,
            &[],
        ),
        row(
            "automatic $namespace tag is selectable",
            Outgoing,
            "/org/other",
            &["x=y"],
            server,
            3000,
            Allow,
            &["/org:by-namespace-tag"],
        ),
        // Step 1: ports.
        row(
            "a port inside a range",
            Outgoing,
            APP,
            &["role=batch"],
            server,
            2010,
            Allow,
            &["/org/app:both"],
        ),
        row(
            "a port outside every range",
            Outgoing,
            APP,
            &["role=batch"],
            server,
            2011,
            Reject,
            &[],
        ),
        row(
            "no ports means any port",
            Outgoing,
            APP,
            &["role=admin"],
            server,
            65535,
            Allow,
            &["/org/app:any-port"],
        ),
        // Step 1: namespace coverage.
        row(
            "a policy covers its own namespace",
            Outgoing,
            "/org",
            &["role=root-client"],
            P::Pu("/org", &["role=root-server"]),
            1,
            Allow,
            &["/org:here-only"],
        ),
        row(
            "propagate: false stops at the namespace",
            Outgoing,
            APP,
            &["role=root-client"],
            P::Pu("/org", &["role=root-server"]),
            1,
            Reject,
            &[],
        ),
        row(
            "propagate: true reaches descendants",
            Outgoing,
            "/org/app/child",
            &["role=admin"],
            server,
            9,
            Allow,
            &["/org/app:any-port"],
        ),
        row(
            "a child's policy does not reach the parent",
            Outgoing,
            APP,
            &["role=kid"],
            P::Pu(APP, &["role=kid"]),
            9,
            Reject,
            &[],
        ),
        row(
            "a policy does not reach a sibling",
            Outgoing,
            "/org/other",
            &["role=admin"],
            server,
            9,
            Reject,
            &[],
        ),
        row(
            "the child's own policy applies",
            Outgoing,
            "/org/app/child",
            &["role=kid"],
            P::Pu("/org/app/child", &["role=kid"]),
            9,
            Allow,
            &["/org/app/child:child-policy"],
        ),
        // A selector's PU peers stay in the policy's subtree (tags certified in another
        // namespace are not trusted by its policies) unless a clause names the peer's
        // namespace.
        row(
            "a peer outside the policy's subtree is not matched by its tags",
            Outgoing,
            "/org/app/child",
            &["role=kid"],
            P::Pu(APP, &["role=kid"]),
            9,
            Reject,
            &[],
        ),
        row(
            "a clause naming the peer's namespace reaches it",
            Outgoing,
            "/org/app/child",
            &["role=kid"],
            P::Pu("/org/other", &["role=partner"]),
            9,
            Allow,
            &["/org/app/child:to-other-namespace"],
        ),
        row(
            "`$namespace=*` reaches every namespace",
            Outgoing,
            "/org/app/child",
            &["role=kid"],
            P::Pu("/org/third", &["role=anyone"]),
            9,
            Allow,
            &["/org/app/child:to-any-namespace"],
        ),
        // Step 2: tiers and reject precedence.
        row(
            "Reject beats Allow in the same tier",
            Incoming,
            APP,
            &["role=server"],
            P::Pu(APP, &["role=batch"]),
            2005,
            Reject,
            &["/org/app:reject-2005"],
        ),
        tier(
            row(
                "an emergency Reject beats an application Allow",
                Outgoing,
                APP,
                &["role=admin", "bad=true"],
                server,
                1,
                Reject,
                &["/org:emergency-block"],
            ),
            Tier::Emergency,
        ),
        tier(
            row(
                "the first tier with a match decides, even Allow over a later Reject",
                Outgoing,
                APP,
                &["role=monitor"],
                server,
                1,
                Allow,
                &["/org:infra-allow"],
            ),
            Tier::Infrastructure,
        ),
        // Step 3: default and discovery.
        row(
            "no match: default reject",
            Outgoing,
            APP,
            &["role=nobody"],
            server,
            1,
            Reject,
            &[],
        ),
        row(
            "discovery allows what nothing decides",
            Outgoing,
            "/org/lab",
            &["role=x"],
            server,
            1,
            Allow,
            &[],
        ),
        row(
            "discovery is inherited by children",
            Outgoing,
            "/org/lab/child",
            &["role=x"],
            server,
            1,
            Allow,
            &[],
        ),
        row(
            "a child may turn discovery off",
            Outgoing,
            "/org/lab/strict",
            &["role=x"],
            server,
            1,
            Reject,
            &[],
        ),
        // Step 4: staged policies never change the verdict.
        row(
            "a staged emergency Reject does not reject",
            Outgoing,
            APP,
            &["role=client", "env=prod"],
            server,
            1002,
            Allow,
            &["/org/app:both"],
        ),
        row(
            "a staged Allow does not allow",
            Outgoing,
            APP,
            &["role=client"],
            P::Pu(APP, &["role=db"]),
            5432,
            Reject,
            &[],
        ),
        // External ends.
        row(
            "an address in a network matches its ext:name",
            Outgoing,
            APP,
            &["role=client"],
            P::Ip("198.51.100.1"),
            80,
            Allow,
            &["/org/app:to-internet"],
        ),
        row(
            "IPv6 addresses match IPv6 entries",
            Outgoing,
            APP,
            &["role=client"],
            P::Ip("2001:db8::1"),
            80,
            Allow,
            &["/org/app:to-internet"],
        ),
        row(
            "an address in several networks matches any of them",
            Outgoing,
            APP,
            &["role=client"],
            P::Ip("203.0.113.9"),
            443,
            Allow,
            &["/org/app:to-partner"],
        ),
        row(
            "a network's ports narrow it",
            Outgoing,
            APP,
            &["role=client"],
            P::Ip("203.0.113.9"),
            444,
            Reject,
            &[],
        ),
        row(
            "domain entries match names",
            Outgoing,
            APP,
            &["role=client"],
            P::Domain("api.partner.example"),
            443,
            Allow,
            &["/org/app:to-partner"],
        ),
        row(
            "a network is visible below its namespace",
            Outgoing,
            APP,
            &["role=client"],
            P::Ip("192.0.2.1"),
            1,
            Allow,
            &["/org:to-private"],
        ),
        row(
            "a network is not visible beside its namespace",
            Outgoing,
            "/org/other",
            &["role=client"],
            P::Ip("192.0.2.1"),
            1,
            Reject,
            &[],
        ),
        row(
            "an address in no network is a bare external end",
            Incoming,
            APP,
            &["role=public"],
            P::Domain("nowhere.example"),
            1,
            Allow,
            &["/org/app:from-anywhere"],
        ),
        row(
            "external ends given by tags",
            Incoming,
            APP,
            &["role=public"],
            P::Ext(&["$identity=externalnetwork", "zone=x"]),
            1,
            Allow,
            &["/org/app:from-anywhere"],
        ),
        row(
            "Bidirectional never applies to an external end",
            Outgoing,
            APP,
            &["role=bidi"],
            P::Ip("198.51.100.1"),
            1,
            Reject,
            &[],
        ),
        row(
            "Bidirectional applies to a PU peer",
            Outgoing,
            APP,
            &["role=bidi"],
            server,
            1,
            Allow,
            &["/org/app:bidi-to-any"],
        ),
    ];
    let mut failures = Vec::new();
    for r in &rows {
        let d = decide_both(&engine, r.dir, r.ns, r.own, r.peer, r.port);
        let got = (d.verdict, d.reason, d.tier, names(&engine, &d));
        let want = (
            r.verdict,
            r.reason,
            r.tier,
            r.deciding.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        );
        if got != want {
            failures.push(format!("{}: got {got:?}, want {want:?}", r.rule));
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn staged_matches_are_reported() {
    let engine = Engine::compile(load_str(BASE).set);
    let d = decide_both(
        &engine,
        Outgoing,
        APP,
        &["role=client", "env=prod"],
        P::Pu(APP, &["role=server"]),
        1002,
    );
    let staged: Vec<String> = d
        .staged(engine.set())
        .map(|(id, a)| format!("{} {a}", engine.set().policy(id).qualified_name()))
        .collect();
    assert_eq!(staged, vec!["/org:staged-reject Reject"]);
    let d = decide_both(
        &engine,
        Outgoing,
        APP,
        &["role=client"],
        P::Pu(APP, &["role=db"]),
        1,
    );
    let staged: Vec<String> = d
        .staged(engine.set())
        .map(|(id, a)| format!("{} {a}", engine.set().policy(id).qualified_name()))
        .collect();
    assert_eq!(staged, vec!["/org/app:staged-allow Allow"]);
    assert_eq!(d.verdict, Reject);
}

#[test]
fn encrypt_and_log_flags() {
    let engine = Engine::compile(load_str(BASE).set);
    // Only an encrypt:false policy decides: authenticated-only.
    let d = decide_both(
        &engine,
        Outgoing,
        APP,
        &["role=batch"],
        P::Pu(APP, &["role=server"]),
        2000,
    );
    assert!(!d.encrypt);
    assert!(!d.log);
    // Two deciding allows, one encrypted: encrypted wins.
    let d = decide_both(
        &engine,
        Outgoing,
        APP,
        &["role=monitor", "secure=yes"],
        P::Pu(APP, &["role=server"]),
        1,
    );
    assert_eq!(d.policies.len(), 2);
    assert!(d.encrypt);
    assert!(d.log, "infra-allow asks for a flow record");
    // Rejects and discoveries are always recorded.
    let d = decide_both(
        &engine,
        Outgoing,
        APP,
        &["role=nobody"],
        P::Pu(APP, &["role=server"]),
        1,
    );
    assert!(d.log);
    let d = decide_both(
        &engine,
        Outgoing,
        "/org/lab",
        &["role=nobody"],
        P::Pu(APP, &["role=server"]),
        1,
    );
    assert!(d.log && d.encrypt);
}

const CASES: &str = r#"
kind: PolicyTest
cases:
  - {name: outgoing allow alone is not enough, from: [role=client], to: [role=server], port: tcp/1000, expect: reject, namespace: /org/app}
  - {name: incoming allow alone is not enough, from: [role=client], to: [role=server], port: tcp/1001, expect: reject, namespace: /org/app}
  - {name: bidirectional allows at both ends, from: [role=client, env=prod], to: [role=server], port: tcp/1002, expect: allow, namespace: /org/app}
  - {name: a reject at the server wins, from: [role=batch], to: [role=server], port: tcp/2005, expect: reject, namespace: /org/app}
  - {name: PU to address is decided by the client only, from: [role=client], to: {ip: 198.51.100.1}, port: tcp/80, expect: allow, namespace: /org/app}
  - {name: address to PU is decided by the server only, from: {ip: 198.51.100.1}, to: [role=public], port: tcp/22, expect: allow, namespace: /org/app}
  - {name: discovery at one end is not enough, from: [role=x], from_namespace: /org/lab, to: [role=y], to_namespace: /org/app, port: tcp/1, expect: reject}
"#;

#[test]
fn case_evaluation_follows_the_modes() {
    let loaded = load_str(&format!("{BASE}\n---\n{CASES}"));
    let engine = Engine::compile(loaded.set);
    for case in &loaded.tests {
        let o = evaluate(&engine, case);
        assert_eq!(o.actual, case.expect, "{}", case.name);
        match case.name.as_str() {
            "PU to address is decided by the client only" => {
                assert!(o.client.is_some() && o.server.is_none())
            }
            "address to PU is decided by the server only" => {
                assert!(o.client.is_none() && o.server.is_some())
            }
            "outgoing allow alone is not enough" => {
                assert_eq!(o.client.as_ref().unwrap().decision.verdict, Allow);
                assert_eq!(o.server.as_ref().unwrap().decision.verdict, Reject);
            }
            "incoming allow alone is not enough" => {
                assert_eq!(o.client.as_ref().unwrap().decision.verdict, Reject);
                assert_eq!(o.server.as_ref().unwrap().decision.verdict, Allow);
            }
            "a reject at the server wins" => {
                let ends: Vec<_> = o.deciding_ends().map(|e| e.direction).collect();
                assert_eq!(ends, vec![Incoming]);
            }
            _ => {}
        }
    }
}

#[test]
fn decisions_do_not_depend_on_load_order() {
    let docs: Vec<&str> = BASE.split("\n---\n").collect();
    let forward = Engine::compile(load_str(&docs.join("\n---\n")).set);
    let reversed: Vec<&str> = docs.iter().rev().copied().collect();
    let backward = Engine::compile(load_str(&reversed.join("\n---\n")).set);
    for (own, peer, port) in [
        (&["role=monitor"][..], &["role=server"][..], 1),
        (&["role=client", "env=prod"][..], &["role=server"][..], 1002),
        (&["role=batch"][..], &["role=server"][..], 2005),
    ] {
        let a = decide_both(&forward, Outgoing, APP, own, P::Pu(APP, peer), port);
        let b = decide_both(&backward, Outgoing, APP, own, P::Pu(APP, peer), port);
        assert_eq!(names(&forward, &a), names(&backward, &b));
        assert_eq!(
            (a.verdict, a.tier, a.encrypt),
            (b.verdict, b.tier, b.encrypt)
        );
    }
}

/// The attack the namespace scope closes: a PU of `/acme/lab` whose (lab) token
/// certified `app=web, env=prod` calls shop's api. `/acme/shop`'s `web-to-api` names those
/// tags but only for peers of `/acme/shop`: refused, while the shop's own web passes.
#[test]
fn tags_certified_in_another_namespace_do_not_satisfy_a_policy() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/three-tier/policies.yaml"
    ))
    .unwrap();
    let engine = Engine::compile(load_str(&text).set);
    let web = ["app=web", "env=prod"];
    for (peer_ns, want) in [("/acme/shop", Allow), ("/acme/lab", Reject)] {
        let d = decide_both(
            &engine,
            Incoming,
            "/acme/shop",
            &["app=api", "env=prod"],
            P::Pu(peer_ns, &web),
            8080,
        );
        assert_eq!(d.verdict, want, "web's tags from {peer_ns}: {d:?}");
    }
}
