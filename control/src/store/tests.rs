//! The store's contract. Written against `&dyn Store` so every backend runs it.

use super::*;

pub fn contract(s: &dyn Store) {
    assert_eq!(s.draft().unwrap(), None);
    assert!(s.live().unwrap().is_none());
    assert_eq!(s.revision().unwrap(), 0);
    assert!(matches!(
        s.commit(("t", "commit", "")),
        Err(StoreError::NoDraft)
    ));

    let mut d = Documents::default();
    d.namespaces.insert(
        "/a".into(),
        Namespace {
            path: "/a".parse().unwrap(),
            discovery: Some(true),
            default_tier: None,
            tag_prefixes: None,
        },
    );
    s.set_draft(&d, ("alice", "apply", "1")).unwrap();
    assert_eq!(s.draft().unwrap(), Some(d.clone()));
    assert_eq!(s.commit(("alice", "commit", "")).unwrap(), 1);
    assert_eq!(s.draft().unwrap(), None, "a commit clears the draft");
    assert_eq!(s.live().unwrap().unwrap().documents, d);

    let mut d2 = d.clone();
    d2.namespaces.clear();
    s.set_draft(&d2, ("bob", "apply", "2")).unwrap();
    assert_eq!(s.commit(("bob", "commit", "")).unwrap(), 2);
    assert_eq!(s.live().unwrap().unwrap().documents, d2);
    assert_eq!(s.rollback(1, ("alice", "rollback", "")).unwrap(), 3);
    let v3 = s.live().unwrap().unwrap();
    assert_eq!(
        (v3.version, v3.documents, v3.how.as_str()),
        (3, d, "rollback to 1")
    );
    assert!(matches!(
        s.rollback(99, ("a", "rollback", "")),
        Err(StoreError::NoSuchVersion(99))
    ));
    assert_eq!(s.version(2).unwrap().unwrap().by, "bob");

    let t = TokenRecord {
        name: "ci".into(),
        role: Role::Viewer,
        namespace: "/a".into(),
        allowed_tags: vec![],
        any_source: false,
    };
    s.put_token("h1", &t, ("admin", "token", "ci")).unwrap();
    assert_eq!(s.token("h1").unwrap(), Some(t.clone()));
    assert_eq!(s.token("h2").unwrap(), None);
    assert_eq!(s.tokens().unwrap(), vec![("h1".to_string(), t.clone())]);

    let log = s.audit_log().unwrap();
    let actions: Vec<(&str, &str)> = log
        .iter()
        .map(|e| (e.who.as_str(), e.action.as_str()))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("alice", "apply"),
            ("alice", "commit"),
            ("bob", "apply"),
            ("bob", "commit"),
            ("alice", "rollback"),
            ("admin", "token")
        ]
    );
    assert!(log.windows(2).all(|w| w[0].seq < w[1].seq));

    let pu = PuRecord {
        name: "web".into(),
        namespace: "/a".into(),
        tags: vec!["app=web".into()],
        ips: vec!["10.0.0.1".parse().unwrap()],
        registered_at: "t".into(),
        by: "boot".into(),
        any_source: false,
    };
    s.put_pu(&pu, ("boot", "register", "web")).unwrap();
    s.put_pu(&pu, ("boot", "register", "web")).unwrap();
    assert_eq!(
        s.pus().unwrap(),
        vec![pu.clone()],
        "registering again replaces the record"
    );
    // 2 commits, 1 rollback, 1 registration (the second changed nothing enforcers
    // see); drafts and tokens do not count.
    assert_eq!(s.revision().unwrap(), 4);
    let moved = PuRecord {
        ips: vec!["10.0.0.2".parse().unwrap()],
        ..pu.clone()
    };
    s.put_pu(&moved, ("boot", "register", "web")).unwrap();
    assert_eq!(s.revision().unwrap(), 5, "a new address is news");
    assert_eq!(s.pu("/a", "web").unwrap(), Some(moved.clone()));
    assert_eq!(s.pu("/a", "nobody").unwrap(), None);
    assert!(s.delete_pu("/a", "web", ("alice", "delete", "pu")).unwrap());
    assert!(!s.delete_pu("/a", "web", ("alice", "delete", "pu")).unwrap());
    assert_eq!(s.pus().unwrap(), vec![]);
    assert_eq!(s.revision().unwrap(), 6, "a deletion is news");

    let flow = |port: u16| StoredFlow {
        seq: 0,
        reporter: "/a:web".into(),
        received_at: "t".into(),
        record: serde_json::from_value(serde_json::json!({
            "time": "t", "direction": "outgoing",
            "source": {"ip": "10.0.0.2", "port": 40000},
            "destination": {"ip": "10.0.0.3", "port": port},
            "verdict": "allow", "reason": "policy", "policies": [], "encrypt": false,
            "bytes_sent": 0, "bytes_received": 0, "duration_ms": 0, "close_reason": "closed"
        }))
        .unwrap(),
    };
    s.add_flows(&[flow(1), flow(2), flow(3)], 4, 10).unwrap();
    s.add_flows(&[flow(4), flow(5)], 4, 10).unwrap();
    let ports = |s: &dyn Store| -> Vec<(String, u16)> {
        s.flows()
            .unwrap()
            .iter()
            .map(|f| (f.reporter.clone(), f.record.destination.port))
            .collect()
    };
    let web = |p: u16| ("/a:web".to_owned(), p);
    assert_eq!(
        ports(s),
        vec![web(2), web(3), web(4), web(5)],
        "the oldest records go first"
    );
    // One reporter's flood evicts its own records, not everyone's.
    let other = StoredFlow {
        reporter: "/a:db".into(),
        ..flow(9)
    };
    s.add_flows(&[other], 4, 3).unwrap();
    s.add_flows(&[flow(6), flow(7), flow(8)], 4, 3).unwrap();
    assert_eq!(
        ports(s),
        vec![("/a:db".to_owned(), 9), web(6), web(7), web(8)],
        "web keeps its 3 newest, db's record stays"
    );

    assert!(s.delete_token("h1", ("admin", "revoke", "ci")).unwrap());
    assert!(!s.delete_token("h1", ("admin", "revoke", "ci")).unwrap());
    assert_eq!(s.token("h1").unwrap(), None);
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("segmesh-store-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn redb_store_meets_the_contract_and_persists() {
    let dir = tempdir("contract");
    {
        let s = RedbStore::open(&dir).unwrap();
        contract(&s);
    }
    let s = RedbStore::open(&dir).unwrap();
    assert_eq!(
        s.live().unwrap().unwrap().version,
        3,
        "versions survive a restart"
    );
    assert_eq!(s.audit_log().unwrap().len(), 11);
    assert_eq!(s.pus().unwrap().len(), 0);
    assert_eq!(
        s.flows().unwrap().len(),
        4,
        "flow records survive a restart"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
