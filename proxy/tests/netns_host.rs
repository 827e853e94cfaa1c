//! Host mode: a host's own processes protected by `segmesh-iptables-init --mode host`
//! and `segmesh-proxy --mode host` registered with a console. The host serves and
//! connects as any host does; an admin network's SSH is never captured (not even with
//! the enforcer down); the enforcer's own console traffic is not captured. UDP and ICMP
//! of the host's own processes are mediated like TCP; the admin network keeps every
//! protocol.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use common::*;
use segmesh_testkit::{Topology, netns_enabled, wait_until};
use tokio::net::TcpStream;

#[test]
fn netns_host_mode_protects_the_hosts_own_processes() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["console", "host", "peer", "other", "admin"]);
    let dir = Scratch::new("host-mode");
    let (console, host, peer, other, admin) = (
        topo.host("console").clone(),
        topo.host("host").clone(),
        topo.host("peer").clone(),
        topo.host("other").clone(),
        topo.host("admin").clone(),
    );

    // The console, its admin token, a bootstrap token for hosts, the policies.
    let data = dir.0.join("console");
    let mut cmd = console.command(bin("segmesh-control").to_str().unwrap());
    cmd.arg("--data-dir")
        .arg(&data)
        .arg("--listen")
        .arg(format!("{}:8443", console.ip4));
    topo.spawn(cmd);
    let api = SocketAddr::new(console.ip4.into(), 8443);
    wait_until("the console", Duration::from_secs(20), || {
        data.join("admin.token").exists()
            && in_ns(
                &console,
                async move { TcpStream::connect(api).await.is_ok() },
            )
            .join()
            .unwrap()
    });
    let ctl = |args: &[&str]| {
        let out = console
            .command(bin("segmeshctl").to_str().unwrap())
            .args(args)
            .env("SEGMESH_CONSOLE", format!("https://{api}"))
            .env(
                "SEGMESH_TOKEN",
                format!("@{}", data.join("admin.token").display()),
            )
            .env("SEGMESH_CA", data.join("ca/bundle.crt"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "segmeshctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let boot = ctl(&[
        "token",
        "--name",
        "hosts",
        "--role",
        "enforcer",
        "--namespace",
        "/acme/hosts",
        "--allow-tag",
        "role=*",
    ]);
    std::fs::write(dir.0.join("boot.token"), &boot).unwrap();
    std::fs::copy(data.join("ca/bundle.crt"), dir.0.join("console-ca.crt")).unwrap();
    let policies = format!(
        "kind: ExternalNetwork\nname: peers\nnamespace: /acme\nentries: [{}/32]\n---\n\
         kind: ExternalNetwork\nname: others\nnamespace: /acme\nentries: [{}/32]\n---\n\
         kind: NetworkPolicy\nname: peers-to-host\nnamespace: /acme/hosts\naction: Allow\nmode: Incoming\n\
         subject: [[ext:name=peers]]\nobject: [[role=host]]\nports: [tcp/8080]\n---\n\
         kind: NetworkPolicy\nname: host-to-peers\nnamespace: /acme/hosts\naction: Allow\nmode: Outgoing\n\
         subject: [[role=host]]\nobject: [[ext:name=peers]]\nports: [tcp/80, udp/7, icmp]\n",
        peer.ip4, other.ip4
    );
    let p = dir.0.join("hosts.yaml");
    std::fs::write(&p, policies).unwrap();
    ctl(&["apply", "-f", p.to_str().unwrap()]);
    ctl(&["commit"]);

    // The host: its services, host-mode capture rules (the admin network's SSH never
    // captured), the enforcer in host mode named after the host.
    let seen = Arc::new(AtomicUsize::new(0));
    for port in [8080u16, 9090, 22] {
        greet(&host, SocketAddr::new(host.ip4.into(), port), seen.clone());
    }
    let udp_seen = Arc::new(AtomicUsize::new(0));
    for h in [&peer, &other] {
        greet(
            h,
            SocketAddr::new(h.ip4.into(), 80),
            Arc::new(AtomicUsize::new(0)),
        );
        in_ns(
            h,
            udp_echo(SocketAddr::new(h.ip4.into(), 7), udp_seen.clone()),
        );
    }
    in_ns(
        &host,
        udp_echo(SocketAddr::new(host.ip4.into(), 7), udp_seen.clone()),
    );
    let admin_net = format!("{}/32", admin.ip4);
    host.exec_ok(&[
        bin("segmesh-iptables-init").to_str().unwrap(),
        "--mode",
        "host",
        "--exclude-inbound-cidrs",
        &admin_net,
    ]);
    let mut cmd = host.enforcer_command(std::path::Path::new(env!("CARGO_BIN_EXE_segmesh-proxy")));
    cmd.args([
        "--mode",
        "host",
        "--console",
        &format!("https://{api}"),
        "--console-ca",
        dir.0.join("console-ca.crt").to_str().unwrap(),
        "--bootstrap-token",
        &format!("@{}", dir.0.join("boot.token").display()),
        "--namespace",
        "/acme/hosts",
        "--tag",
        "role=host",
        "--state-dir",
        dir.0.join("state").to_str().unwrap(),
        "--flow-log",
        dir.0.join("flows.jsonl").to_str().unwrap(),
        "--log-all-flows",
    ]);
    let pid = topo.spawn(cmd);
    // Registration and the snapshot went to the console from inside the captured host:
    // the enforcer's own traffic is not captured, or it would never get ready.
    wait_until(
        "the host enforcer is ready",
        Duration::from_secs(30),
        || http_get(&host, "/ready").0 == 200,
    );
    let cfg = http_get(&host, "/config").1;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    assert!(
        cfg.contains(&format!("/acme/hosts:{hostname}")),
        "named after the host: {cfg}"
    );
    // Admin port on loopback only in host mode.
    let admin_port = SocketAddr::new(host.ip4.into(), 15020);
    assert!(
        in_ns(&peer, async move {
            TcpStream::connect(admin_port).await.is_err()
        })
        .join()
        .unwrap(),
        "the admin port is not reachable from outside the host"
    );

    let at = |h: &segmesh_testkit::Host, ip: std::net::Ipv4Addr, port: u16| {
        in_ns(h, attempt(SocketAddr::new(ip.into(), port)))
            .join()
            .unwrap()
    };
    // Inbound to the host's own services.
    assert_eq!(at(&peer, host.ip4, 8080), Attempt::Greeted);
    refused_fast(at(&peer, host.ip4, 9090));
    refused_fast(at(&other, host.ip4, 8080));
    // Outbound from the host's own processes.
    assert_eq!(at(&host, peer.ip4, 80), Attempt::Greeted);
    refused_fast(at(&host, other.ip4, 80));
    // SSH from the admin network: never captured.
    assert_eq!(at(&admin, host.ip4, 22), Attempt::Greeted);
    refused_fast(at(&peer, host.ip4, 22));

    // UDP and ICMP of the host's own processes: mediated like TCP.
    let ask_from = |h: &segmesh_testkit::Host, ip: std::net::Ipv4Addr| {
        in_ns(h, ask(SocketAddr::new(ip.into(), 7), b"hello"))
            .join()
            .unwrap()
    };
    let ping = |from: &segmesh_testkit::Host, to: std::net::Ipv4Addr| {
        from.exec(&["ping", "-c", "1", "-W", "1", &to.to_string()])
            .status
            .success()
    };
    assert_eq!(
        ask_from(&host, peer.ip4).map(|(b, _)| b),
        Some(b"hello".to_vec()),
        "the host's UDP to an allowed peer"
    );
    let before = udp_seen.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(ask_from(&host, other.ip4), None, "the host's UDP to other");
    assert_eq!(ask_from(&other, host.ip4), None, "other's UDP to the host");
    assert_eq!(
        udp_seen.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "a refused datagram arrived"
    );
    assert!(ping(&host, peer.ip4), "the host pings an allowed peer");
    assert!(!ping(&host, other.ip4), "the host pinged other");
    assert!(!ping(&other, host.ip4), "other pinged the host");
    // The admin network keeps every protocol.
    assert!(ping(&admin, host.ip4), "the admin network pings the host");
    assert_eq!(
        ask_from(&admin, host.ip4).map(|(b, _)| b),
        Some(b"hello".to_vec()),
        "the admin network's UDP"
    );

    // The records: inbound and outbound, and nothing about the enforcer's own console
    // connections.
    wait_until("flow records", Duration::from_secs(10), || {
        flow_log(&dir.0.join("flows.jsonl"))
            .iter()
            .filter(|r| r["protocol"] == "udp" || r["protocol"] == "icmp")
            .count()
            >= 3
    });
    let records = flow_log(&dir.0.join("flows.jsonl"));
    assert!(records.iter().any(|r| r["destination"]["port"] == 8080
        && r["verdict"] == "allow"
        && r["policies"][0] == "/acme/hosts:peers-to-host"));
    assert!(
        records
            .iter()
            .any(|r| r["destination"]["port"] == 80 && r["verdict"] == "reject")
    );
    let udp_to = |ip: std::net::Ipv4Addr, verdict: &str| {
        records.iter().any(|r| {
            r["protocol"] == "udp"
                && r["destination"]["ip"] == ip.to_string()
                && r["verdict"] == verdict
        })
    };
    // (The allowed session is recorded when it ends, after the idle timeout.)
    for (ip, verdict) in [(other.ip4, "reject"), (host.ip4, "reject")] {
        assert!(udp_to(ip, verdict), "udp to {ip} {verdict}: {records:#?}");
    }
    assert!(records.iter().any(|r| r["protocol"] == "icmp"
        && r["destination"]["ip"] == other.ip4.to_string()
        && r["verdict"] == "reject"));
    assert!(
        !records
            .iter()
            .any(|r| r["destination"]["port"] == 8443 || r["source"]["port"] == 8443),
        "the enforcer's console traffic is not captured"
    );

    // The enforcer down: the host fails closed, except the admin network's SSH.
    topo.kill(pid);
    let target = SocketAddr::new(host.ip4.into(), 8080);
    let down = in_ns(&peer, async move {
        tokio::time::timeout(Duration::from_secs(2), attempt(target)).await
    })
    .join()
    .unwrap();
    assert!(
        !matches!(down, Ok(Attempt::Greeted)),
        "nothing reaches the host's services without its enforcer: {down:?}"
    );
    assert_eq!(at(&admin, host.ip4, 22), Attempt::Greeted);
}
