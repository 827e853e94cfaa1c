//! Kubelet probes under default deny: the node probes the pod's rewritten probe paths on
//! the enforcer's admin port, which makes the original probes on loopback. An HTTP
//! probe of a healthy path and a TCP probe of the open app port pass; a failing path
//! and a closed port fail; the node itself still cannot reach the app.

mod common;

use std::net::SocketAddr;

use common::*;
use segmesh_testkit::{Topology, netns_enabled, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP server answering 200 on `/healthz` (when the probe's header came along) and
/// 500 elsewhere, until the test ends.
async fn app(addr: SocketAddr) {
    let l = TcpListener::bind(addr).await.unwrap();
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut b = vec![0u8; 4096];
            let mut n = 0;
            while !b[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < b.len() {
                match s.read(&mut b[n..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => n += k,
                }
            }
            let req = String::from_utf8_lossy(&b[..n]).to_lowercase();
            let ok = req.starts_with("get /healthz ") && req.contains("x-probe: yes");
            let status = if ok {
                "200 OK"
            } else {
                "500 Internal Server Error"
            };
            let _ = s
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        });
    }
}

/// GET `path` on `to` from `from`'s namespace: the status, 0 when nothing answered.
fn get(from: &segmesh_testkit::Host, to: SocketAddr, path: &'static str) -> u16 {
    in_ns(from, async move {
        let Ok(Ok(mut s)) =
            tokio::time::timeout(std::time::Duration::from_secs(3), TcpStream::connect(to)).await
        else {
            return 0;
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            return 0;
        }
        let mut out = String::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            s.read_to_string(&mut out),
        )
        .await;
        out.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    })
    .join()
    .unwrap()
}

#[test]
fn netns_probes_pass_under_default_deny_through_the_admin_port() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["pod", "node"]);
    let (pod, node) = (topo.host("pod").clone(), topo.host("node").clone());
    let dir = Scratch::new("probes");
    // No policy: default deny. The probes as the injector hands them to the enforcer.
    let config = dir.0.join("enforcer.yaml");
    std::fs::write(
        &config,
        r#"pu: {name: pod, namespace: /lab, tags: [app=api]}
flow_log: flows.jsonl
app_probes:
  /app-health/api/readiness: {httpGet: {port: 8080, path: /healthz, headers: [[X-Probe, "yes"]]}}
  /app-health/api/liveness: {tcpSocket: {port: 8080}}
  /app-health/api/broken: {httpGet: {port: 8080, path: /fail}}
  /app-health/api/closed: {tcpSocket: {port: 9999}}
"#,
    )
    .unwrap();
    capture(&pod);
    start_enforcer(&topo, "pod", &config);
    in_ns(&pod, app(SocketAddr::new(pod.ip4.into(), 8080)));
    // (The app listens on the pod's address; the enforcer probes on loopback.)
    in_ns(&pod, app("127.0.0.1:8080".parse().unwrap()));
    // The app's threads bind in the background: wait until it listens on loopback (a
    // probe before that fails like a dead app would).
    wait_until(
        "the app listens",
        std::time::Duration::from_secs(10),
        || {
            in_ns(&pod, async {
                TcpStream::connect("127.0.0.1:8080").await.is_ok()
            })
            .join()
            .unwrap()
        },
    );
    let admin = SocketAddr::new(pod.ip4.into(), 15020);
    assert_eq!(get(&node, admin, "/app-health/api/readiness"), 200);
    assert_eq!(get(&node, admin, "/app-health/api/liveness"), 200);
    assert_eq!(get(&node, admin, "/app-health/api/broken"), 503);
    assert_eq!(get(&node, admin, "/app-health/api/closed"), 503);
    assert_eq!(get(&node, admin, "/app-health/api/unknown"), 404);
    // The node itself is refused by default deny.
    let direct = in_ns(&node, attempt(SocketAddr::new(pod.ip4.into(), 8080)))
        .join()
        .unwrap();
    refused_fast(direct);
}
