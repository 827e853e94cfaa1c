//! Console replicas on etcd: three etcd members and two console replicas in the console's
//! namespace, enforcers (web, api) given both replicas. Commits alternate between the
//! replicas and every enforcer takes each; one etcd member and then the replica the
//! enforcers watch are killed mid-run: no commit is lost or published twice, the
//! enforcers move to the live replica, keep renewing their certificates and keep an open
//! connection; restarting the member and the replica changes nothing.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use common::console::Lab;
use common::*;
use segmesh_testkit::etcd::EtcdCluster;
use segmesh_testkit::{netns_enabled, wait_until};

const PUSH: Duration = Duration::from_secs(20);

fn policy(i: usize) -> String {
    format!(
        "kind: NetworkPolicy\nname: p{i}\nnamespace: /acme/shop\naction: Reject\nmode: Outgoing\nsubject: [[app=web]]\nobject: [[app=nothing-{i}]]\n"
    )
}

#[test]
fn netns_console_replicas_on_etcd_survive_a_member_and_a_replica() {
    if !netns_enabled() {
        return;
    }
    let scratch = Scratch::new("ha-kek");
    let kek = scratch.0.join("kek");
    std::fs::write(&kek, "5e".repeat(32)).unwrap();
    // Three etcd members on the console namespace's loopback. The lab starts its
    // replicas at once, so etcd runs first: make the namespaces, start etcd in the
    // console's, then hand them to the lab.
    let mut etcd: Option<EtcdCluster>;
    let mut lab = {
        let topo = segmesh_testkit::Topology::new(&["console", "web", "api"]);
        let e = EtcdCluster::start_on(3, "127.0.0.1".parse().unwrap(), Some(topo.host("console")));
        let endpoints = e.endpoints().join(",");
        etcd = Some(e);
        let args = [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &endpoints,
            "--kek-file",
            kek.to_str().unwrap(),
            "--cert-ttl",
            "6s",
            "--pu-lease",
            "9s",
        ];
        Lab::replicas_in(topo, "ha", &args, 2)
    };
    let etcd = etcd.as_mut().unwrap();
    // Both replicas serve the same CA, and both wrote the same admin token.
    assert_eq!(
        std::fs::read(lab.data_of(0).join("ca/bundle.crt")).unwrap(),
        std::fs::read(lab.data_of(1).join("ca/bundle.crt")).unwrap()
    );
    assert_eq!(
        std::fs::read(lab.data_of(0).join("admin.token")).unwrap(),
        std::fs::read(lab.data_of(1).join("admin.token")).unwrap()
    );
    // Any replica takes any request: the token is made on the second.
    let boot = lab.shop_token_on(1);
    lab.publish(
        "allow.yaml",
        "kind: NetworkPolicy\nname: web-to-api\nnamespace: /acme/shop\naction: Allow\nmode: Bidirectional\nsubject: [[app=web]]\nobject: [[app=api]]\nports: [tcp/8080]\nencrypt: true\n",
    );
    for h in ["web", "api"] {
        capture(&lab.host(h));
    }
    lab.start_enforcer("api", &["app=api"], &boot, true);
    lab.start_enforcer("web", &["app=web"], &boot, true);

    // An open connection web → api through the tunnel, kept across everything below.
    let api = lab.host("api");
    let api_addr = SocketAddr::new(api.ip4.into(), 8080);
    let seen = Arc::new(AtomicUsize::new(0));
    let _server = greet(&api, api_addr, seen.clone());
    wait_until("api's server listens", Duration::from_secs(10), || {
        in_ns(&lab.host("web"), attempt(api_addr)).join().unwrap() == Attempt::Greeted
    });
    let (go, wait_go) = std::sync::mpsc::channel::<()>();
    let open = lab.host("web").thread(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&api_addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut hello = [0u8; 6];
        s.read_exact(&mut hello)?;
        let _ = wait_go.recv();
        s.write_all(b"still here")?;
        let mut back = [0u8; 10];
        s.read_exact(&mut back)?;
        Ok::<_, std::io::Error>(back)
    });

    let policies = |lab: &Lab, h: &str| lab.config(h)["policies"].as_u64().unwrap_or(0);
    let base = policies(&lab, "web");
    let mut versions = Vec::new();
    let mut commit = |lab: &Lab, i: usize, replica: usize| {
        let p = lab.dir.0.join(format!("p{i}.yaml"));
        std::fs::write(&p, policy(i)).unwrap();
        lab.ctl_ok_on(replica, &["apply", "-f", p.to_str().unwrap()]);
        let t0 = std::time::Instant::now();
        let out = lab.ctl_ok_on(replica, &["commit"]);
        let v: u64 = out
            .trim()
            .strip_prefix("published version ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("commit said {out:?}"));
        versions.push(v);
        for h in ["web", "api"] {
            wait_until(
                &format!("{h} takes commit {i} (from replica {replica})"),
                PUSH,
                || policies(lab, h) == base + i as u64,
            );
        }
        eprintln!(
            "commit {i} on replica {replica}: both enforcers hold it {:?} after segmeshctl commit started",
            t0.elapsed()
        );
    };
    // Commits alternate between the replicas.
    for i in 1..=4 {
        commit(&lab, i, i % 2);
    }
    // One etcd member killed: the cluster keeps its quorum, the replicas go on.
    etcd.kill(0);
    for i in 5..=6 {
        commit(&lab, i, i % 2);
    }
    // The replica the enforcers watch (the first they were given) killed: they move to
    // the other and keep renewing.
    lab.stop_replica(0);
    let before = lab.not_after("web").expect("a certificate");
    for i in 7..=8 {
        commit(&lab, i, 1);
    }
    wait_until(
        "web renews through the live replica",
        Duration::from_secs(20),
        || lab.not_after("web").is_some_and(|t| t > before),
    );
    assert_eq!(http_get(&lab.host("web"), "/ready").0, 200);
    // The connection opened before all this still carries bytes.
    go.send(()).unwrap();
    assert_eq!(
        &open.join().unwrap().expect("the open connection survived"),
        b"still here"
    );

    // Restarting the member and the replica changes nothing: same CA, same token, and
    // the next commit (on the restarted replica) is the next version.
    let bundle = std::fs::read(lab.data_of(0).join("ca/bundle.crt")).unwrap();
    let admin = std::fs::read(lab.data_of(0).join("admin.token")).unwrap();
    etcd.restart(0);
    lab.start_replica(0);
    commit(&lab, 9, 0);
    assert_eq!(
        std::fs::read(lab.data_of(0).join("ca/bundle.crt")).unwrap(),
        bundle
    );
    assert_eq!(
        std::fs::read(lab.data_of(0).join("admin.token")).unwrap(),
        admin
    );

    // No commit lost or published twice: versions 2.. (1 was the allow policy) in order.
    assert_eq!(versions, (2..=10).collect::<Vec<u64>>());
    let audit = lab.ctl_ok_on(1, &["audit"]);
    let commits = audit
        .lines()
        .filter(|l| l.split(' ').nth(2) == Some("commit"))
        .count();
    assert_eq!(commits, 10, "{audit}");
    assert_eq!(
        lab.ctl_ok_on(0, &["get", "pus"]).lines().count(),
        2,
        "web and api registered once each"
    );
}
