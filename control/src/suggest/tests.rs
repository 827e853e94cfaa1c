use super::*;
use segmesh_policy::{CaseEnd, Engine, Location, TagSet, TestCase, Verdict, evaluate};

fn pu(ns: &str, name: &str, tags: &[&str]) -> PuRecord {
    let mut t: Vec<String> = tags.iter().map(|s| s.to_string()).collect();
    t.push(format!("$name={name}"));
    PuRecord {
        name: name.into(),
        namespace: ns.into(),
        tags: t,
        ips: vec![],
        registered_at: "t".into(),
        by: "b".into(),
        any_source: false,
    }
}

fn flow(
    reporter: &str,
    dir: &str,
    from: (&str, Option<&str>),
    to: (&str, Option<&str>, &[&str], u16),
    reason: &str,
) -> StoredFlow {
    StoredFlow {
        seq: 0,
        reporter: reporter.into(),
        received_at: "t".into(),
        record: serde_json::from_value(serde_json::json!({
            "time": "t", "direction": dir,
            "source": {"ip": from.0, "port": 40000, "pu": from.1},
            "destination": {"ip": to.0, "port": to.3, "pu": to.1, "external": to.2},
            "verdict": "allow", "reason": reason, "policies": [], "encrypt": false,
            "bytes_sent": 0, "bytes_received": 0, "duration_ms": 0, "close_reason": "closed"
        }))
        .unwrap(),
    }
}

#[test]
fn discovered_flows_become_least_privilege_policies_that_keep_only_them() {
    let pus = vec![
        pu(
            "/acme/lab",
            "client-7f9c",
            &["app=client", "pod-template-hash=7f9c"],
        ),
        pu(
            "/acme/lab",
            "store-0",
            &["app=store", "statefulset.kubernetes.io/pod-name=store-0"],
        ),
        pu("/acme/lab", "bare", &[]),
    ];
    let flows = vec![
        // client → store on 6379, seen at both ends (both in discovery), twice.
        flow(
            "/acme/lab:client-7f9c",
            "outgoing",
            ("10.0.0.1", Some("/acme/lab:client-7f9c")),
            ("10.0.0.2", Some("/acme/lab:store-0"), &[], 6379),
            "discovered",
        ),
        flow(
            "/acme/lab:store-0",
            "incoming",
            ("10.0.0.1", Some("/acme/lab:client-7f9c")),
            ("10.0.0.2", Some("/acme/lab:store-0"), &[], 6379),
            "discovered",
        ),
        flow(
            "/acme/lab:client-7f9c",
            "outgoing",
            ("10.0.0.1", Some("/acme/lab:client-7f9c")),
            ("10.0.0.2", Some("/acme/lab:store-0"), &[], 6380),
            "discovered",
        ),
        // client → an external network on 443: only the client enforces.
        flow(
            "/acme/lab:client-7f9c",
            "outgoing",
            ("10.0.0.1", Some("/acme/lab:client-7f9c")),
            ("203.0.113.5", None, &["/acme:internet"], 443),
            "discovered",
        ),
        // Allowed by a policy already, or elsewhere, or not describable: ignored or skipped.
        flow(
            "/acme/lab:client-7f9c",
            "outgoing",
            ("10.0.0.1", Some("/acme/lab:client-7f9c")),
            ("10.0.0.2", Some("/acme/lab:store-0"), &[], 22),
            "policy",
        ),
        flow(
            "/acme/shop:web",
            "outgoing",
            ("10.0.1.1", Some("/acme/shop:web")),
            ("10.0.0.2", Some("/acme/lab:store-0"), &[], 6379),
            "discovered",
        ),
        flow(
            "/acme/lab:bare",
            "outgoing",
            ("10.0.0.3", Some("/acme/lab:bare")),
            ("10.0.0.2", Some("/acme/lab:store-0"), &[], 6379),
            "discovered",
        ),
        flow(
            "/acme/lab:client-7f9c",
            "outgoing",
            ("10.0.0.1", Some("/acme/lab:client-7f9c")),
            ("198.51.100.9", None, &[], 80),
            "discovered",
        ),
    ];
    let s = suggest(&"/acme/lab".parse().unwrap(), &flows, &pus);
    assert_eq!(s.flows, 6);
    assert_eq!(s.skipped.len(), 2, "{:?}", s.skipped);
    let summary: Vec<(&str, &str, Vec<u16>)> = s
        .policies
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.mode,
                p.ports.iter().map(|x| x.port).collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("allow-client-to-store", "Bidirectional", vec![6379, 6380]),
            ("allow-client-to-internet", "Outgoing", vec![443]),
        ]
    );
    assert!(
        s.policies.iter().all(|p| p
            .subject
            .iter()
            .chain(&p.object)
            .all(|t| !t.contains("hash") && !t.contains("pod-name") && !t.starts_with('$'))),
        "stable tags only: {s:?}"
    );

    // Applied with discovery off: the discovered flows stay allowed, the rest is rejected.
    let mut yaml = to_yaml(&s, "test");
    yaml.push_str("---\nkind: ExternalNetwork\nname: internet\nnamespace: /acme\nentries: [0.0.0.0/0]\n---\nkind: Namespace\nname: /acme/lab\ndiscovery: false\n");
    let loaded = segmesh_policy::load(&[segmesh_policy::Source {
        name: "s.yaml",
        text: &yaml,
    }])
    .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let engine = Engine::compile(loaded.set);
    let lab: NamespacePath = "/acme/lab".parse().unwrap();
    let case = |to: CaseEnd, port: u16| TestCase {
        name: "c".into(),
        from: CaseEnd::Pu(TagSet::parse(&["app=client".to_string()]).unwrap()),
        to,
        port: port.into(),
        expect: Verdict::Allow,
        from_namespace: lab.clone(),
        to_namespace: lab.clone(),
        location: Location {
            file: "x".into(),
            line: 1,
            column: 1,
        },
    };
    let store = || CaseEnd::Pu(TagSet::parse(&["app=store".to_string()]).unwrap());
    let ip = |a: &str| {
        CaseEnd::Address(segmesh_policy::Address {
            ip: Some(a.parse().unwrap()),
            domain: None,
        })
    };
    for (to, port, want) in [
        (store(), 6379, Verdict::Allow),
        (store(), 6380, Verdict::Allow),
        (store(), 22, Verdict::Reject),
        (ip("203.0.113.5"), 443, Verdict::Allow),
        (ip("203.0.113.5"), 80, Verdict::Reject),
    ] {
        assert_eq!(
            evaluate(&engine, &case(to, port)).actual,
            want,
            "port {port}"
        );
    }
}

/// A discovered UDP flow is suggested as `udp/N`, never as the TCP port of that number.
#[test]
fn udp_flows_keep_their_protocol() {
    let pus = vec![pu("/acme/lab", "client", &["app=client"])];
    let mut f = flow(
        "/acme/lab:client",
        "outgoing",
        ("10.0.0.1", Some("/acme/lab:client")),
        ("198.51.100.53", None, &["/acme:dns"], 53),
        "discovered",
    );
    f.record.protocol = Some("udp".into());
    let tcp = flow(
        "/acme/lab:client",
        "outgoing",
        ("10.0.0.1", Some("/acme/lab:client")),
        ("198.51.100.53", None, &["/acme:dns"], 53),
        "discovered",
    );
    let s = suggest(&"/acme/lab".parse().unwrap(), &[f, tcp], &pus);
    let y = to_yaml(&s, "t");
    assert!(y.contains("ports: [tcp/53, udp/53]"), "{y}");
}
