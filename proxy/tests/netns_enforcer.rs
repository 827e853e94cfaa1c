//! The enforcer with real capture rules in network namespaces: a workload `work` (its
//! enforcer runs as uid 1337, the workload's own processes as root), an allowed
//! external host `ext` and a blocked one `bad`.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use segmesh_testkit::{Topology, netns_enabled, wait_until};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn write_config(dir: &Scratch, topo: &Topology) -> PathBuf {
    write_config_with(dir, topo, "")
}

fn write_config_with(dir: &Scratch, topo: &Topology, extra: &str) -> PathBuf {
    let (ext, bad) = (topo.host("ext"), topo.host("bad"));
    let policies = format!(
        r#"
kind: ExternalNetwork
name: partner
namespace: /lab
entries: ["{e4}", "{e6}"]
---
kind: ExternalNetwork
name: blocked
namespace: /lab
entries: ["{b4}", "{b6}"]
---
kind: NetworkPolicy
name: to-partner
namespace: /lab
action: Allow
mode: Outgoing
subject: [[app=work]]
object: [[ext:name=partner]]
ports: [tcp/7000-7002]
log: true
---
kind: NetworkPolicy
name: block-bad
namespace: /lab
action: Reject
mode: Outgoing
subject: [[app=work]]
object: [[ext:name=blocked]]
log: true
---
kind: NetworkPolicy
name: partner-in
namespace: /lab
action: Allow
mode: Incoming
subject: [[ext:name=partner]]
object: [[app=work]]
ports: [tcp/8000]
log: true
"#,
        e4 = ext.ip4,
        e6 = ext.ip6,
        b4 = bad.ip4,
        b6 = bad.ip6
    );
    std::fs::write(dir.0.join("policies.yaml"), policies).unwrap();
    let cfg = format!(
        "pu: {{name: work, namespace: /lab, tags: [app=work]}}\npolicies: [policies.yaml]\nflow_log: flows.jsonl\n{extra}"
    );
    let path = dir.0.join("enforcer.yaml");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn scenario(v6: bool) {
    let topo = Topology::new(&["work", "ext", "bad"]);
    let (work, ext, bad) = (
        topo.host("work").clone(),
        topo.host("ext").clone(),
        topo.host("bad").clone(),
    );
    let dir = Scratch::new(if v6 { "v6" } else { "v4" });
    let config = write_config(&dir, &topo);
    capture(&work);
    start_enforcer(&topo, "work", &config);

    // Servers: a bulk peer on ext:7000; greeters on bad:7000 and bad:7777 (reachable if
    // anything bypassed the enforcer), on ext:7003 (a port no policy lists), and the workload's own on work:8000.
    let bulk = in_ns(&ext, bulk_server(SocketAddr::new(ip(&ext, v6), 7000)));
    let bad_seen = Arc::new(AtomicUsize::new(0));
    for port in [7000, 7777] {
        let _ = greet(&bad, SocketAddr::new(ip(&bad, v6), port), bad_seen.clone());
    }
    let ext_seen = Arc::new(AtomicUsize::new(0));
    let _ = greet(&ext, SocketAddr::new(ip(&ext, v6), 7003), ext_seen.clone());
    let work_seen = Arc::new(AtomicUsize::new(0));
    let _ = greet(&work, "[::]:8000".parse().unwrap(), work_seen.clone());

    // 1. Allowed outbound: 100 MB each way, half-closed, intact.
    let to = SocketAddr::new(ip(&ext, v6), 7000);
    let client = in_ns(&work, bulk_client(to));
    assert_eq!(
        client.join().unwrap(),
        BULK,
        "the workload received everything"
    );
    assert_eq!(
        bulk.join().unwrap(),
        BULK,
        "the external host received everything"
    );

    // 2. Rejected outbound: an immediate RST, nothing reaches `bad`, even on a port no
    //    policy lists; an allowed host on an unlisted port is refused too.
    for port in [7000, 7777] {
        let to = SocketAddr::new(ip(&bad, v6), port);
        refused_fast(in_ns(&work, attempt(to)).join().unwrap());
    }
    refused_fast(
        in_ns(&work, attempt(SocketAddr::new(ip(&ext, v6), 7003)))
            .join()
            .unwrap(),
    );
    assert_eq!(
        bad_seen.load(Ordering::SeqCst),
        0,
        "nothing bypassed the enforcer"
    );
    assert_eq!(ext_seen.load(Ordering::SeqCst), 0);

    // 3. Inbound: the partner reaches the workload's server; `bad` does not.
    let target = SocketAddr::new(ip(&work, v6), 8000);
    assert_eq!(
        in_ns(&ext, attempt(target)).join().unwrap(),
        Attempt::Greeted
    );
    assert_eq!(work_seen.load(Ordering::SeqCst), 1);
    refused_fast(in_ns(&bad, attempt(target)).join().unwrap());
    assert_eq!(
        work_seen.load(Ordering::SeqCst),
        1,
        "the rejected connection never reached the workload"
    );

    // 4. Flow records name the deciding policy.
    wait_until("flow records", Duration::from_secs(10), || {
        flow_records(&dir).len() >= 6
    });
    let records = flow_records(&dir);
    let to_bad: Vec<_> = records
        .iter()
        .filter(|r| r["destination"]["ip"] == ip(&bad, v6).to_string())
        .collect();
    assert_eq!(to_bad.len(), 2, "{records:#?}");
    for r in to_bad {
        assert_eq!(r["verdict"], "reject");
        assert_eq!(r["policies"][0], "/lab:block-bad");
        assert_eq!(r["destination"]["external"][0], "/lab:blocked");
    }
    let bulk_rec = records
        .iter()
        .find(|r| r["destination"]["port"] == 7000 && r["verdict"] == "allow")
        .expect("bulk flow record");
    assert_eq!(bulk_rec["policies"][0], "/lab:to-partner");
    assert_eq!(bulk_rec["bytes_sent"], BULK);
    assert_eq!(bulk_rec["bytes_received"], BULK);
    assert_eq!(bulk_rec["data_path"], "spliced");
    let inbound_rej = records
        .iter()
        .find(|r| r["direction"] == "incoming" && r["verdict"] == "reject")
        .expect("inbound reject record");
    assert_eq!(inbound_rej["reason"], "default");

    // 5. The spliced path carried every byte (the kernel relay is off by default).
    let moved = records
        .iter()
        .filter(|r| r["verdict"] == "allow")
        .map(|r| r["bytes_sent"].as_u64().unwrap() + r["bytes_received"].as_u64().unwrap())
        .sum::<u64>();
    wait_until("metrics settle", Duration::from_secs(5), || {
        metric(&work, "segmesh_spliced_bytes_total") as u64 == moved
    });
    assert!(moved >= 2 * BULK as u64);
    assert_eq!(metric(&work, "segmesh_copied_bytes_total"), 0.0);
}

#[test]
fn netns_enforcer_ipv4() {
    if netns_enabled() {
        scenario(false);
    }
}

#[test]
fn netns_enforcer_ipv6() {
    if netns_enabled() {
        scenario(true);
    }
}

#[test]
fn netns_enforcer_stopped_fails_closed() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["work", "ext", "bad"]);
    let (work, ext) = (topo.host("work").clone(), topo.host("ext").clone());
    let dir = Scratch::new("stop");
    let config = write_config(&dir, &topo);
    capture(&work);
    let pid = start_enforcer(&topo, "work", &config);
    let seen = Arc::new(AtomicUsize::new(0));
    let _ = greet(&ext, SocketAddr::new(ext.ip4.into(), 7000), seen.clone());
    let _ = greet(&ext, SocketAddr::new(ext.ip6.into(), 7000), seen.clone());
    assert_eq!(
        in_ns(&work, attempt(SocketAddr::new(ext.ip4.into(), 7000)))
            .join()
            .unwrap(),
        Attempt::Greeted
    );
    topo.kill(pid);
    for to in [
        SocketAddr::new(ext.ip4.into(), 7000),
        SocketAddr::new(ext.ip6.into(), 7000),
    ] {
        refused_fast(in_ns(&work, attempt(to)).join().unwrap());
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "with the enforcer gone nothing goes around it"
    );
}

#[test]
fn netns_enforcer_limits_timeouts_and_registered_pus() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["work", "ext", "bad"]);
    let (work, ext) = (topo.host("work").clone(), topo.host("ext").clone());
    let dir = Scratch::new("limits");
    let extra = "registry:\n  - {name: api, namespace: /lab, ips: [10.77.0.99]}\nlimits: {max_connections: 1, connect_timeout: 500ms}\n";
    let config = write_config_with(&dir, &topo, extra);
    capture(&work);
    start_enforcer(&topo, "work", &config);
    let seen = Arc::new(AtomicUsize::new(0));
    let _ = greet(&ext, SocketAddr::new(ext.ip4.into(), 7000), seen.clone());
    // Port 7002 swallows SYNs: the enforcer's connect times out.
    ext.exec_ok(&[
        "iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", "7002", "-j", "DROP",
    ]);

    // One connection held open uses the only permit; the next is refused at once.
    let to = SocketAddr::new(ext.ip4.into(), 7000);
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let holder = in_ns(&work, async move {
        let mut s = TcpStream::connect(to).await.unwrap();
        let mut b = [0u8; 6];
        s.read_exact(&mut b).await.unwrap();
        let _ = tokio::task::spawn_blocking(move || held_rx.recv_timeout(Duration::from_secs(30)))
            .await;
        drop(s);
    });
    wait_until("the held connection", Duration::from_secs(10), || {
        seen.load(Ordering::SeqCst) == 1
    });
    refused_fast(in_ns(&work, attempt(to)).join().unwrap());
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "the second connection never reached the server"
    );
    held_tx.send(()).unwrap();
    holder.join().unwrap();
    wait_until("the permit is back", Duration::from_secs(10), || {
        in_ns(&work, attempt(to)).join().unwrap() == Attempt::Greeted
    });

    // A destination that never answers: reset after the connect timeout (once the last
    // relayed connection has given its permit back).
    wait_until("no open connection", Duration::from_secs(10), || {
        metric(&work, "segmesh_open_connections{direction=\"Outbound\"}") == 0.0
    });
    match in_ns(&work, attempt(SocketAddr::new(ext.ip4.into(), 7002)))
        .join()
        .unwrap()
    {
        Attempt::Refused(t) => assert!(
            t >= Duration::from_millis(400) && t < Duration::from_secs(3),
            "{t:?}"
        ),
        other => panic!("expected a reset after the connect timeout, got {other:?}"),
    }

    // A registered PU is reached only through the mesh tunnel; with no identity
    // configured the enforcer refuses rather than sending plaintext.
    refused_fast(
        in_ns(&work, attempt("10.77.0.99:8080".parse().unwrap()))
            .join()
            .unwrap(),
    );

    wait_until(
        "the three refusals' records",
        Duration::from_secs(10),
        || {
            let r = flow_records(&dir);
            r.iter().any(|r| r["reason"] == "overload")
                && r.iter().any(|r| r["reason"] == "no-identity")
                && r.iter().any(|r| r["close_reason"] == "connect-timeout")
        },
    );
    let records = flow_records(&dir);
    let reason_of = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        records
            .iter()
            .find(|r| pred(r))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        reason_of(&|r| r["reason"] == "overload")["verdict"],
        "reject",
        "{records:#?}"
    );
    assert_eq!(
        reason_of(&|r| r["destination"]["port"] == 7002)["close_reason"],
        "connect-timeout",
        "{records:#?}"
    );
    // Without an identity the enforcer cannot open the mesh tunnel to a registered PU.
    let reg = reason_of(&|r| r["reason"] == "no-identity");
    assert_eq!(reg["destination"]["pu"], "/lab:api", "{records:#?}");
    assert!(metric(&work, "segmesh_connection_errors_total{kind=\"Overload\"}") >= 1.0);
}
