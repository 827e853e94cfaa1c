use super::*;
use crate::store::RedbStore;

struct Fixture {
    console: Console<RedbStore>,
    dir: std::path::PathBuf,
    admin: Caller,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(tag: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("segmesh-console-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let console = Console::new(RedbStore::open(&dir).unwrap());
    let token = console
        .create_token(None, "admin", Role::Editor, &NamespacePath::root())
        .unwrap();
    let admin = console.authenticate(&token).unwrap();
    Fixture {
        console,
        dir,
        admin,
    }
}

fn caller(f: &Fixture, name: &str, role: Role, ns: &str) -> Caller {
    let t = f
        .console
        .create_token(Some(&f.admin), name, role, &ns.parse().unwrap())
        .unwrap();
    f.console.authenticate(&t).unwrap()
}

fn policy(ns: &str, name: &str, port: u16) -> String {
    format!(
        "kind: NetworkPolicy\nname: {name}\nnamespace: {ns}\naction: Allow\nmode: Bidirectional\nsubject: [[app=a]]\nobject: [[app=b]]\nports: [tcp/{port}]\n"
    )
}

fn src<'a>(name: &'a str, text: &'a str) -> Source<'a> {
    Source { name, text }
}

#[test]
fn apply_diff_commit_rollback() {
    let f = fixture("flow");
    let (a, b) = (
        policy("/acme/shop", "one", 80),
        policy("/acme/shop", "two", 81),
    );
    let ch = f
        .console
        .apply(&f.admin, &[src("a.yaml", &a), src("b.yaml", &b)])
        .unwrap();
    assert_eq!(
        ch.added,
        vec![
            "NetworkPolicy /acme/shop:one",
            "NetworkPolicy /acme/shop:two"
        ]
    );
    assert_eq!(f.console.diff(&f.admin).unwrap().added.len(), 2);
    assert_eq!(f.console.commit(&f.admin).unwrap(), 1);
    assert_eq!(f.console.diff(&f.admin).unwrap(), Changes::default());
    let (v, set) = f.console.live().unwrap().unwrap();
    assert_eq!((v.version, set.policies().len()), (1, 2));

    // Change one, leave one: the diff says so; commit; roll back.
    let a2 = policy("/acme/shop", "one", 8080);
    let ch = f
        .console
        .apply(&f.admin, &[src("a.yaml", &a2), src("b.yaml", &b)])
        .unwrap();
    assert_eq!((ch.changed.len(), ch.unchanged.len()), (1, 1));
    f.console
        .delete(
            &f.admin,
            "NetworkPolicy",
            &"/acme/shop".parse().unwrap(),
            "two",
        )
        .unwrap();
    let d = f.console.diff(&f.admin).unwrap();
    assert_eq!(
        (d.changed.clone(), d.removed.clone()),
        (
            vec!["NetworkPolicy /acme/shop:one".to_owned()],
            vec!["NetworkPolicy /acme/shop:two".to_owned()]
        )
    );
    assert_eq!(f.console.commit(&f.admin).unwrap(), 2);
    assert_eq!(f.console.live().unwrap().unwrap().1.policies().len(), 1);
    assert_eq!(f.console.rollback(&f.admin, None).unwrap(), 3);
    let (v, set) = f.console.live().unwrap().unwrap();
    assert_eq!((v.version, set.policies().len()), (3, 2));
    assert_eq!(
        set.policies()[0].ports.to_string(),
        "tcp/80",
        "version 1's content is back"
    );
}

#[test]
fn a_bad_document_rejects_the_whole_apply() {
    let f = fixture("bad");
    let good = policy("/acme", "ok", 80);
    let bad = "kind: NetworkPolicy\nname: broken\naction: Allow\nmode: Bidirectional\nsubject: [[app=a]]\nobject: [[app=b]]\nports: [tcp/99999]\n";
    let audit_before = f.console.store.audit_log().unwrap().len();
    let err = f
        .console
        .apply(&f.admin, &[src("good.yaml", &good), src("bad.yaml", bad)])
        .unwrap_err();
    let ConsoleError::Invalid(e) = &err else {
        panic!("{err}")
    };
    let d = &e.diagnostics[0];
    assert_eq!(
        (d.location.file.as_str(), d.location.line, d.location.column),
        ("bad.yaml", 7, 9)
    );
    assert!(err.to_string().contains("bad.yaml:7:9"), "{err}");
    assert_eq!(
        f.console.store.draft().unwrap(),
        None,
        "nothing applied, not even good.yaml"
    );
    assert_eq!(f.console.store.audit_log().unwrap().len(), audit_before);
}

#[test]
fn roles_per_namespace_subtree() {
    let f = fixture("roles");
    let viewer = caller(&f, "viewer", Role::Viewer, "/");
    let shop = caller(&f, "shop-editor", Role::Editor, "/acme/shop");
    let acme = caller(&f, "acme-editor", Role::Editor, "/acme");
    let p = policy("/acme/shop", "p", 80);
    assert!(matches!(
        f.console.apply(&viewer, &[src("p.yaml", &p)]),
        Err(ConsoleError::Forbidden(_))
    ));
    f.console.apply(&shop, &[src("p.yaml", &p)]).unwrap();
    f.console
        .apply(&shop, &[src("q.yaml", &policy("/acme/shop/dev", "q", 81))])
        .unwrap();
    let other = policy("/acme/other", "x", 80);
    let e = f
        .console
        .apply(&shop, &[src("x.yaml", &other), src("p.yaml", &p)])
        .unwrap_err();
    assert!(
        matches!(&e, ConsoleError::Forbidden(m) if m.contains("/acme/other")),
        "{e}"
    );
    assert!(
        !f.console
            .store
            .draft()
            .unwrap()
            .unwrap()
            .policies
            .contains_key("/acme/other:x"),
        "nothing of the denied apply was written"
    );
    // A namespace's own settings need editor rights on its parent.
    let ns = "kind: Namespace\nname: /acme/shop\ndiscovery: true\n";
    assert!(matches!(
        f.console.apply(&shop, &[src("ns.yaml", ns)]),
        Err(ConsoleError::Forbidden(_))
    ));
    f.console.apply(&acme, &[src("ns.yaml", ns)]).unwrap();
    // Commit and rollback have global effect: root editors only.
    assert!(matches!(
        f.console.commit(&acme),
        Err(ConsoleError::Forbidden(_))
    ));
    assert!(matches!(
        f.console
            .create_token(Some(&shop), "x", Role::Editor, &"/acme".parse().unwrap()),
        Err(ConsoleError::Forbidden(_))
    ));
    // The viewer of / sees the diff.
    assert_eq!(f.console.diff(&viewer).unwrap().added.len(), 3);
}

#[test]
fn tokens_are_stored_hashed_and_audited() {
    let f = fixture("tokens");
    let token = f
        .console
        .create_token(
            Some(&f.admin),
            "ci",
            Role::Viewer,
            &"/acme".parse().unwrap(),
        )
        .unwrap();
    assert!(token.starts_with("smt_") && token.len() > 60);
    assert!(matches!(
        f.console.authenticate("smt_wrong"),
        Err(ConsoleError::Unauthenticated)
    ));
    assert_eq!(f.console.authenticate(&token).unwrap().role, Role::Viewer);
    drop(f.console.store.audit_log().unwrap());
    let bytes = std::fs::read(f.dir.join("console.redb")).unwrap();
    assert!(
        !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
        "the raw token is not in the database"
    );
    let h = hash_token(&token);
    assert!(
        bytes.windows(h.len()).any(|w| w == h.as_bytes()),
        "its hash is"
    );
    let log = f.console.store.audit_log().unwrap();
    assert!(
        log.iter()
            .any(|e| e.who == "admin" && e.action == "token" && e.detail.contains("ci")),
        "{log:?}"
    );
}

#[test]
fn registration_certifies_only_recorded_tags() {
    use segmesh_identity::{KeyAlgorithm, WorkloadIdentity, WorkloadKey};
    let f = fixture("register");
    let ca = Ca::new_root("segmesh.local", KeyAlgorithm::EcdsaP256).unwrap();
    let boot = f
        .console
        .create_bootstrap_token(
            &f.admin,
            "shop-nodes",
            &"/acme/shop".parse().unwrap(),
            &["app=*".into(), "env=prod".into()],
        )
        .unwrap();
    assert!(
        matches!(
            f.console.authenticate(&boot),
            Err(ConsoleError::Unauthenticated)
        ),
        "bootstrap tokens do not administer"
    );
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let req = |name: &str, ns: &str, tags: &[&str]| Registration {
        name: name.into(),
        namespace: ns.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ips: vec!["10.0.0.7".parse().unwrap()],
        csr: key.csr_pem(name).unwrap(),
        renew: false,
    };
    let r = f
        .console
        .register(
            &boot,
            &ca,
            &req(
                "web",
                "/acme/shop",
                &[
                    "app=web",
                    "env=prod",
                    "role=admin",
                    "$identity=externalnetwork",
                ],
            ),
        )
        .unwrap();
    assert_eq!(r.dropped, vec!["role=admin", "$identity=externalnetwork"]);
    let chain = segmesh_identity::ca::certs_from_pem(&r.chain).unwrap();
    let id = WorkloadIdentity::from_cert(&chain[0]).unwrap();
    assert_eq!(
        id.spiffe_id().to_string(),
        "spiffe://segmesh.local/ns/acme/shop/pu/web"
    );
    assert_eq!(
        id.tags,
        vec![
            "$identity=processingunit",
            "$name=web",
            "$namespace=/acme/shop",
            "app=web",
            "env=prod"
        ]
    );
    let pus = f.console.store.pus().unwrap();
    assert_eq!((pus.len(), pus[0].tags.clone()), (1, id.tags.clone()));
    // Outside the token's namespace, with another token kind, or a bad token: no certificate.
    assert!(matches!(
        f.console
            .register(&boot, &ca, &req("x", "/acme/other", &[])),
        Err(ConsoleError::Forbidden(_))
    ));
    let viewer = f
        .console
        .create_token(Some(&f.admin), "v", Role::Viewer, &NamespacePath::root())
        .unwrap();
    assert!(matches!(
        f.console
            .register(&viewer, &ca, &req("x", "/acme/shop", &[])),
        Err(ConsoleError::Forbidden(_))
    ));
    assert!(matches!(
        f.console
            .register("smt_bad", &ca, &req("x", "/acme/shop", &[])),
        Err(ConsoleError::Unauthenticated)
    ));
    assert_eq!(f.console.store.pus().unwrap().len(), 1);

    // A live PU is not registered again with a token (only its certificate renews it);
    // deleting the PU stops renewals.
    let renew = Registration {
        renew: true,
        ..req("web", "/acme/shop", &["app=web"])
    };
    assert!(matches!(
        f.console
            .register(&boot, &ca, &req("web", "/acme/shop", &["app=web"])),
        Err(ConsoleError::Conflict(_))
    ));
    // With the current certificate instead of the token: the recorded tags, whatever
    // the request claims; only for the PU the certificate names.
    let greedy = Registration {
        tags: vec!["app=web".into(), "role=admin".into()],
        ..renew.clone()
    };
    let r = f.console.renew_by_certificate(&id, &ca, &greedy).unwrap();
    assert_eq!(r.tags, f.console.store.pus().unwrap()[0].tags);
    assert!(!r.tags.iter().any(|t| t == "role=admin"));
    assert!(matches!(
        f.console.renew_by_certificate(
            &id,
            &ca,
            &Registration {
                name: "api".into(),
                ..renew.clone()
            }
        ),
        Err(ConsoleError::Forbidden(_))
    ));
    let shop_viewer = Caller {
        role: Role::Viewer,
        ..f.admin.clone()
    };
    assert!(matches!(
        f.console
            .delete_pu(&shop_viewer, &"/acme/shop".parse().unwrap(), "web"),
        Err(ConsoleError::Forbidden(_))
    ));
    f.console
        .delete_pu(&f.admin, &"/acme/shop".parse().unwrap(), "web")
        .unwrap();
    assert!(matches!(
        f.console.register(&boot, &ca, &renew),
        Err(ConsoleError::Gone(_))
    ));
    assert!(matches!(
        f.console.renew_by_certificate(&id, &ca, &renew),
        Err(ConsoleError::Gone(_))
    ));
    assert!(f.console.store.pus().unwrap().is_empty());
    assert!(
        f.console
            .snapshot_for(&"/acme/shop".parse().unwrap())
            .unwrap()
            .registry
            .is_empty(),
        "a deleted PU leaves the registry"
    );
    // A fresh start registers anew.
    f.console
        .register(&boot, &ca, &req("web", "/acme/shop", &["app=web"]))
        .unwrap();
    assert_eq!(f.console.store.pus().unwrap().len(), 1);
}

#[test]
fn tokens_are_revoked_by_name_with_rights() {
    use segmesh_identity::{KeyAlgorithm, WorkloadKey};
    let f = fixture("revoke");
    let ca = Ca::new_root("segmesh.local", KeyAlgorithm::EcdsaP256).unwrap();
    let shop: NamespacePath = "/acme/shop".parse().unwrap();
    let boot = f
        .console
        .create_bootstrap_token(&f.admin, "shop-nodes", &shop, &["app=*".into()])
        .unwrap();
    // A viewer edits no namespace: for it there is no such token.
    let viewer = caller(&f, "v", Role::Viewer, "/");
    assert!(matches!(
        f.console.revoke_token(&viewer, "x", "shop-nodes"),
        Err(ConsoleError::NotFound { .. })
    ));
    // The attack: another namespace's token of the same name (which the shop's editor
    // may not revoke) used to block the revocation. Names are unique per namespace.
    let lab: NamespacePath = "/acme/lab".parse().unwrap();
    f.console
        .create_bootstrap_token(&f.admin, "shop-nodes", &lab, &["app=*".into()])
        .unwrap();
    assert!(matches!(
        f.console
            .create_bootstrap_token(&f.admin, "shop-nodes", &shop, &[]),
        Err(ConsoleError::Conflict(_))
    ));
    let shop_editor_token = f
        .console
        .create_token(Some(&f.admin), "shop-ed", Role::Editor, &shop)
        .unwrap();
    let shop_editor = f.console.authenticate(&shop_editor_token).unwrap();
    assert!(
        matches!(
            f.console
                .revoke_token(&shop_editor, &shop_editor_token, "shop-ed"),
            Err(ConsoleError::Forbidden(_))
        ),
        "a token cannot revoke itself"
    );
    assert_eq!(
        f.console
            .revoke_token(&shop_editor, &shop_editor_token, "shop-nodes")
            .unwrap(),
        1
    );
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let r = Registration {
        name: "web".into(),
        namespace: "/acme/shop".into(),
        tags: vec![],
        ips: vec![],
        csr: key.csr_pem("web").unwrap(),
        renew: false,
    };
    assert!(matches!(
        f.console.register(&boot, &ca, &r),
        Err(ConsoleError::Unauthenticated)
    ));
    // The lab's token of that name is untouched; the root editor revokes it.
    assert_eq!(
        f.console.revoke_token(&f.admin, "x", "shop-nodes").unwrap(),
        1
    );
    assert!(matches!(
        f.console.revoke_token(&f.admin, "x", "shop-nodes"),
        Err(ConsoleError::NotFound { .. })
    ));
    assert!(
        f.console
            .store
            .audit_log()
            .unwrap()
            .iter()
            .any(|e| e.action == "revoke" && e.who == "shop-ed")
    );
}

#[test]
fn flow_records_are_stored_and_filtered_by_visibility() {
    let f = fixture("flows");
    let boot = f
        .console
        .create_bootstrap_token(&f.admin, "b", &"/acme".parse().unwrap(), &[])
        .unwrap();
    let rec = |from: &str, to: &str, verdict: &str| -> segmesh_api::FlowRecord {
        serde_json::from_value(serde_json::json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "direction": "outgoing",
            "source": {"ip": "10.0.0.2", "port": 40000, "pu": from},
            "destination": {"ip": "10.0.0.3", "port": 80, "pu": to},
            "verdict": verdict, "reason": "policy", "policies": [], "encrypt": false,
            "bytes_sent": 0, "bytes_received": 0, "duration_ms": 0, "close_reason": "closed"
        }))
        .unwrap()
    };
    let _ = boot;
    // The reporter (from its certificate) keeps only records about itself: web cannot
    // put words in db's mouth.
    assert_eq!(
        f.console
            .store_flows(
                "/acme/shop:web",
                vec![
                    rec("/acme/shop:web", "/acme/shop:api", "allow"),
                    rec("/acme/shop:web", "/acme/shop:db", "reject"),
                    rec("/acme/shop:db", "/acme/shop:web", "allow"),
                ],
            )
            .unwrap(),
        (2, 1)
    );
    f.console
        .store_flows(
            "/acme/other:x",
            vec![rec("/acme/other:x", "/acme/shop:api", "reject")],
        )
        .unwrap();
    let all = |filter: FlowFilter| f.console.flows(&f.admin, &filter).unwrap().len();
    assert_eq!(all(FlowFilter::default()), 3);
    assert_eq!(
        all(FlowFilter {
            verdict: Some("reject".into()),
            ..Default::default()
        }),
        2
    );
    assert_eq!(
        all(FlowFilter {
            pu: Some("api".into()),
            ..Default::default()
        }),
        2
    );
    assert_eq!(
        all(FlowFilter {
            pu: Some("/acme/shop:db".into()),
            ..Default::default()
        }),
        1
    );
    assert_eq!(
        all(FlowFilter {
            since: Some(std::time::Duration::from_secs(600)),
            limit: Some(1),
            ..Default::default()
        }),
        1
    );
    // Pages: the newest first page, then the one before it by `seq`.
    let page = |limit: usize, before: Option<u64>| {
        f.console
            .flows(
                &f.admin,
                &FlowFilter {
                    limit: Some(limit),
                    before,
                    ..Default::default()
                },
            )
            .unwrap()
    };
    let last = page(1, None);
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].reporter, "/acme/other:x");
    let earlier = page(2, Some(last[0].seq));
    assert_eq!(earlier.len(), 2);
    assert!(earlier.iter().all(|f| f.seq < last[0].seq));
    assert!(page(5, Some(earlier[0].seq)).is_empty());
    let shop = Caller {
        name: "shop".into(),
        role: Role::Viewer,
        namespace: "/acme/shop".parse().unwrap(),
    };
    assert_eq!(
        f.console
            .flows(&shop, &FlowFilter::default())
            .unwrap()
            .len(),
        2,
        "a viewer of /acme/shop sees what its PUs reported"
    );
}

/// Services are applied, versioned and pushed with their endpoints resolved: a
/// selector picks registered PUs by their certified tags in its namespace subtree; listed
/// addresses are the PU registered there or outside the mesh. An address and port lead
/// to one Service across applies.
#[test]
fn services_are_resolved_for_enforcers() {
    use segmesh_identity::{KeyAlgorithm, WorkloadKey};
    let f = fixture("services");
    let ca = Ca::new_root("segmesh.local", KeyAlgorithm::EcdsaP256).unwrap();
    let boot = f
        .console
        .create_bootstrap_token(
            &f.admin,
            "nodes",
            &"/acme".parse().unwrap(),
            &["app=*".into()],
        )
        .unwrap();
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    for (name, ns, app, ip) in [
        ("api-1", "/acme/shop", "api", "10.0.0.11"),
        ("api-2", "/acme/shop", "api", "10.0.0.12"),
        ("api-lab", "/acme/lab", "api", "10.0.0.13"),
        ("db-1", "/acme/shop", "db", "10.0.0.21"),
    ] {
        let r = Registration {
            name: name.into(),
            namespace: ns.into(),
            tags: vec![format!("app={app}")],
            ips: vec![ip.parse().unwrap()],
            csr: key.csr_pem(name).unwrap(),
            renew: false,
        };
        f.console.register(&boot, &ca, &r).unwrap();
    }
    let docs = "kind: Service\nname: api\nnamespace: /acme/shop\naddresses: [10.96.0.10]\n\
                ports: [{port: 80, targetPort: 8080}]\nselector: [app=api]\n---\n\
                kind: Service\nname: db\nnamespace: /acme/shop\naddresses: [10.96.0.20]\n\
                ports: [{port: 5432}]\nendpoints: [10.0.0.21, 192.0.2.5]\n";
    let ch = f.console.apply(&f.admin, &[src("s.yaml", docs)]).unwrap();
    assert_eq!(
        ch.added,
        vec!["Service /acme/shop:api", "Service /acme/shop:db"]
    );
    // Not live before the commit.
    assert!(f.console.services(&f.admin).unwrap().is_empty());
    assert_eq!(f.console.diff(&f.admin).unwrap().added.len(), 2);
    f.console.commit(&f.admin).unwrap();
    let snap = f
        .console
        .snapshot_for(&"/acme/web".parse().unwrap())
        .unwrap();
    let ep = |ip: &str, pu: Option<&str>| segmesh_api::ServiceEndpoint {
        ip: ip.parse().unwrap(),
        pu: pu.map(str::to_owned),
    };
    assert_eq!(snap.services.len(), 2);
    assert_eq!(snap.services[0].name, "/acme/shop:api");
    assert_eq!(
        snap.services[0].endpoints,
        vec![
            ep("10.0.0.11", Some("/acme/shop:api-1")),
            ep("10.0.0.12", Some("/acme/shop:api-2")),
        ],
        "the lab's api is outside the Service's namespace"
    );
    assert_eq!(
        snap.services[1].endpoints,
        vec![
            ep("10.0.0.21", Some("/acme/shop:db-1")),
            ep("192.0.2.5", None)
        ]
    );
    // A deleted PU leaves the endpoints with the next snapshot.
    f.console
        .delete_pu(&f.admin, &"/acme/shop".parse().unwrap(), "api-2")
        .unwrap();
    let snap = f
        .console
        .snapshot_for(&"/acme/web".parse().unwrap())
        .unwrap();
    assert_eq!(snap.services[0].endpoints.len(), 1);
    // One address and port, one Service.
    let clash = "kind: Service\nname: api2\nnamespace: /acme/shop\naddresses: [10.96.0.10]\n\
                 ports: [{port: 80}]\nselector: [app=api]\n";
    let e = f
        .console
        .apply(&f.admin, &[src("c.yaml", clash)])
        .unwrap_err();
    assert!(
        e.to_string().contains(
            "10.96.0.10 tcp/80 belongs to both Service /acme/shop:api and Service /acme/shop:api2"
        ),
        "{e}"
    );
    // Rights: an editor of /acme/lab may not define Services of /acme/shop.
    let lab = caller(&f, "lab", Role::Editor, "/acme/lab");
    assert!(matches!(
        f.console.apply(&lab, &[src("s.yaml", docs)]),
        Err(ConsoleError::Forbidden(_))
    ));
    f.console
        .delete(&f.admin, "Service", &"/acme/shop".parse().unwrap(), "db")
        .unwrap();
    assert_eq!(
        f.console.diff(&f.admin).unwrap().removed,
        vec!["Service /acme/shop:db"]
    );
}

/// Namespaces declare the tag prefixes their tokens may certify: a token cannot allow
/// more, and a registration is certified only within the prefixes as they are now.
#[test]
fn tokens_stay_within_their_namespace_tag_prefixes() {
    use segmesh_identity::{KeyAlgorithm, WorkloadKey};
    let f = fixture("prefixes");
    let ca = Ca::new_root("segmesh.local", KeyAlgorithm::EcdsaP256).unwrap();
    let ns = "kind: Namespace\nname: /acme/shop\ntagPrefixes: [app, env]\n";
    f.console.apply(&f.admin, &[src("ns.yaml", ns)]).unwrap();
    f.console.commit(&f.admin).unwrap();
    let shop: NamespacePath = "/acme/shop".parse().unwrap();
    assert!(matches!(
        f.console
            .create_bootstrap_token(&f.admin, "wide", &shop, &["role=*".into()]),
        Err(ConsoleError::Forbidden(_))
    ));
    // Below /acme/shop the nearest declaration holds too.
    assert!(matches!(
        f.console.create_bootstrap_token(
            &f.admin,
            "wide",
            &"/acme/shop/eu".parse().unwrap(),
            &["team=*".into()]
        ),
        Err(ConsoleError::Forbidden(_))
    ));
    let boot = f
        .console
        .create_bootstrap_token(&f.admin, "ok", &shop, &["app=*".into(), "env=*".into()])
        .unwrap();
    // The namespace narrows to `app` afterwards: env= is no longer certified.
    let ns = "kind: Namespace\nname: /acme/shop\ntagPrefixes: [app]\n";
    f.console.apply(&f.admin, &[src("ns.yaml", ns)]).unwrap();
    f.console.commit(&f.admin).unwrap();
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let r = f
        .console
        .register(
            &boot,
            &ca,
            &Registration {
                name: "web".into(),
                namespace: "/acme/shop".into(),
                tags: vec!["app=web".into(), "env=prod".into()],
                ips: vec!["10.0.0.7".parse().unwrap()],
                csr: key.csr_pem("web").unwrap(),
                renew: false,
            },
        )
        .unwrap();
    assert!(r.tags.contains(&"app=web".to_owned()));
    assert_eq!(r.dropped, vec!["env=prod"]);
}

/// A PU registered with a `--any-source` token (behind NAT) renews from its NAT address
/// too; one registered with a plain token renews only from an address it claims.
#[test]
fn renewals_keep_the_source_rule_of_their_registration() {
    use segmesh_identity::{KeyAlgorithm, WorkloadIdentity, WorkloadKey};
    let f = fixture("nat-renew");
    let ca = Ca::new_root("segmesh.local", KeyAlgorithm::EcdsaP256).unwrap();
    let shop: NamespacePath = "/acme/shop".parse().unwrap();
    let nat = f
        .console
        .create_bootstrap_token_with(&f.admin, "nat", &shop, &["app=*".into()], true)
        .unwrap();
    let plain = f
        .console
        .create_bootstrap_token(&f.admin, "plain", &shop, &["app=*".into()])
        .unwrap();
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let req = |name: &str, ip: &str| Registration {
        name: name.into(),
        namespace: "/acme/shop".into(),
        tags: vec!["app=x".into()],
        ips: vec![ip.parse().unwrap()],
        csr: key.csr_pem(name).unwrap(),
        renew: false,
    };
    let natted: std::net::IpAddr = "192.0.2.1".parse().unwrap();
    let holder = |issued: &segmesh_api::Issued| {
        let chain = segmesh_identity::ca::certs_from_pem(&issued.chain).unwrap();
        WorkloadIdentity::from_cert(&chain[0]).unwrap()
    };
    let a = f
        .console
        .register_from(&nat, &ca, &req("a", "10.0.0.7"), Some(natted))
        .unwrap();
    let renew = Registration {
        renew: true,
        ..req("a", "10.0.0.7")
    };
    f.console
        .renew_from(&holder(&a), &ca, &renew, Some(natted))
        .expect("a NAT PU renews from its NAT address");
    let b = f
        .console
        .register_from(
            &plain,
            &ca,
            &req("b", "10.0.0.8"),
            Some("10.0.0.8".parse().unwrap()),
        )
        .unwrap();
    let renew = Registration {
        renew: true,
        ..req("b", "10.0.0.8")
    };
    assert!(matches!(
        f.console.renew_from(&holder(&b), &ca, &renew, Some(natted)),
        Err(ConsoleError::Forbidden(_))
    ));
}

/// An address whose PU's lease lapsed is free: the new claim succeeds and the lapsed PU
/// leaves the registry at once (not at the next sweep); while the lease runs, the claim
/// is a conflict.
#[test]
fn a_lapsed_lease_frees_the_address_at_once() {
    use segmesh_identity::{KeyAlgorithm, WorkloadKey};
    let mut f = fixture("lapse");
    f.console.lease = std::time::Duration::from_millis(300);
    let ca = Ca::new_root("segmesh.local", KeyAlgorithm::EcdsaP256).unwrap();
    let boot = f
        .console
        .create_bootstrap_token(&f.admin, "b", &"/acme".parse().unwrap(), &[])
        .unwrap();
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let req = |name: &str| Registration {
        name: name.into(),
        namespace: "/acme/shop".into(),
        tags: vec![],
        ips: vec!["::ffff:10.0.0.7".parse().unwrap()],
        csr: key.csr_pem(name).unwrap(),
        renew: false,
    };
    f.console.register(&boot, &ca, &req("old")).unwrap();
    assert!(matches!(
        f.console.register(&boot, &ca, &req("new")),
        Err(ConsoleError::Conflict(_))
    ));
    std::thread::sleep(std::time::Duration::from_millis(400));
    f.console.register(&boot, &ca, &req("new")).unwrap();
    let pus = f.console.store.pus().unwrap();
    assert_eq!(pus.len(), 1);
    assert_eq!(pus[0].name, "new");
    assert_eq!(
        pus[0].ips,
        vec!["10.0.0.7".parse::<std::net::IpAddr>().unwrap()]
    );
}

/// A store that runs `before_set` (once) just before its next draft write: another
/// replica's edit landing between this console's read of the draft and its write.
struct Racing<S: Store> {
    inner: S,
    before_set: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl<S: Store> Store for Racing<S> {
    fn draft(&self) -> Result<Option<Documents>, crate::store::StoreError> {
        self.inner.draft()
    }
    fn draft_base(
        &self,
    ) -> Result<(Documents, crate::store::DraftStamp), crate::store::StoreError> {
        self.inner.draft_base()
    }
    fn set_draft(
        &self,
        docs: &Documents,
        since: crate::store::DraftStamp,
        audit: (&str, &str, &str),
    ) -> Result<(), crate::store::StoreError> {
        if let Some(race) = self.before_set.lock().unwrap().take() {
            race();
        }
        self.inner.set_draft(docs, since, audit)
    }
    fn commit(&self, audit: (&str, &str, &str)) -> Result<u64, crate::store::StoreError> {
        self.inner.commit(audit)
    }
    fn rollback(
        &self,
        to: u64,
        audit: (&str, &str, &str),
    ) -> Result<u64, crate::store::StoreError> {
        self.inner.rollback(to, audit)
    }
    fn live(&self) -> Result<Option<Version>, crate::store::StoreError> {
        self.inner.live()
    }
    fn version(&self, v: u64) -> Result<Option<Version>, crate::store::StoreError> {
        self.inner.version(v)
    }
    fn put_token(
        &self,
        hash: &str,
        token: &crate::store::TokenRecord,
        audit: (&str, &str, &str),
    ) -> Result<(), crate::store::StoreError> {
        self.inner.put_token(hash, token, audit)
    }
    fn token(
        &self,
        hash: &str,
    ) -> Result<Option<crate::store::TokenRecord>, crate::store::StoreError> {
        self.inner.token(hash)
    }
    fn tokens(&self) -> Result<Vec<(String, crate::store::TokenRecord)>, crate::store::StoreError> {
        self.inner.tokens()
    }
    fn delete_token(
        &self,
        hash: &str,
        audit: (&str, &str, &str),
    ) -> Result<bool, crate::store::StoreError> {
        self.inner.delete_token(hash, audit)
    }
    fn audit_log(&self) -> Result<Vec<crate::store::AuditEntry>, crate::store::StoreError> {
        self.inner.audit_log()
    }
    fn put_pu(
        &self,
        pu: &crate::store::PuRecord,
        audit: (&str, &str, &str),
    ) -> Result<(), crate::store::StoreError> {
        self.inner.put_pu(pu, audit)
    }
    fn pus(&self) -> Result<Vec<crate::store::PuRecord>, crate::store::StoreError> {
        self.inner.pus()
    }
    fn pu(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<crate::store::PuRecord>, crate::store::StoreError> {
        self.inner.pu(namespace, name)
    }
    fn delete_pu(
        &self,
        namespace: &str,
        name: &str,
        audit: (&str, &str, &str),
    ) -> Result<bool, crate::store::StoreError> {
        self.inner.delete_pu(namespace, name, audit)
    }
    fn revision(&self) -> Result<u64, crate::store::StoreError> {
        self.inner.revision()
    }
    fn add_flows(
        &self,
        flows: &[crate::store::StoredFlow],
        keep: usize,
        per_reporter: usize,
    ) -> Result<(), crate::store::StoreError> {
        self.inner.add_flows(flows, keep, per_reporter)
    }
    fn flows(&self) -> Result<Vec<crate::store::StoredFlow>, crate::store::StoreError> {
        self.inner.flows()
    }
}

/// Two replicas on one etcd edit the draft at the same moment: an edit of another
/// document is merged with theirs, an edit of the same document is refused, naming it,
/// and leaves the other replica's version in place.
#[test]
fn etcd_replicas_editing_one_draft_merge_or_refuse_clearly() {
    use crate::store::{EtcdOptions, EtcdStore};
    let etcd = segmesh_testkit::etcd::EtcdCluster::start(1);
    let mut o = EtcdOptions::new(etcd.endpoints());
    o.prefix = format!("/drafts-{}/", std::process::id());
    let b = std::sync::Arc::new(Console::new(EtcdStore::connect(&o).unwrap()));
    let a = Console::new(Racing {
        inner: EtcdStore::connect(&o).unwrap(),
        before_set: Default::default(),
    });
    let token = b
        .create_token(None, "admin", Role::Editor, &NamespacePath::root())
        .unwrap();
    let (on_a, on_b) = (
        a.authenticate(&token).unwrap(),
        b.authenticate(&token).unwrap(),
    );
    let race = |doc: String| -> Box<dyn FnOnce() + Send> {
        let (b, on_b) = (b.clone(), on_b.clone());
        Box::new(move || {
            b.apply(&on_b, &[src("b.yaml", &doc)]).unwrap();
        })
    };

    // Another document: both land.
    *a.store.before_set.lock().unwrap() = Some(race(policy("/acme", "theirs", 80)));
    a.apply(&on_a, &[src("a.yaml", &policy("/acme", "ours", 81))])
        .unwrap();
    let draft = a.store.draft().unwrap().unwrap();
    assert!(
        draft.policies.contains_key("/acme:theirs") && draft.policies.contains_key("/acme:ours")
    );

    // The same document: refused, naming it; the other replica's version stays.
    *a.store.before_set.lock().unwrap() = Some(race(policy("/acme", "shared", 443)));
    let e = a
        .apply(&on_a, &[src("a.yaml", &policy("/acme", "shared", 8443))])
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ConsoleError::Conflict(_)), "{msg}");
    assert!(
        msg.contains("NetworkPolicy /acme:shared") && msg.contains("nothing was changed"),
        "{msg}"
    );
    let draft = a.store.draft().unwrap().unwrap();
    assert!(
        serde_json::to_string(&draft.policies["/acme:shared"])
            .unwrap()
            .contains("443")
            && !serde_json::to_string(&draft.policies["/acme:shared"])
                .unwrap()
                .contains("8443"),
        "the other replica's edit stays"
    );
    // And the refused apply wrote no audit entry.
    let applies = a
        .store
        .audit_log()
        .unwrap()
        .iter()
        .filter(|e| e.action == "apply")
        .count();
    assert_eq!(applies, 3, "theirs, ours, the other replica's shared");
}
