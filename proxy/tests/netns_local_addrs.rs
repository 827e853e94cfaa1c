//! The enforcer's list of its namespace's own addresses (`proxy/src/local.rs`): listed
//! once, listed again only after the kernel says something changed, and never stale.
//! "Never a relay" (`plan::inbound`) rests on it: an address just taken off the pod must
//! not be taken for the pod's own by the next connection. Needs root (namespaces).

use std::net::IpAddr;

use segmesh_proxy::local::LocalAddrs;
use segmesh_testkit::{Topology, netns_enabled};

#[test]
fn netns_local_addrs_follow_each_change_at_once_and_list_only_after_one() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["pod"]);
    let pod = topo.host("pod").clone();
    let inside = pod.clone();
    pod.thread(move || {
        let pod = inside;
        let local = LocalAddrs::new();
        let other: IpAddr = "198.51.100.250".parse().unwrap();
        assert!(local.contains(pod.ip4.into()));
        assert!(local.contains(pod.ip6.into()));
        assert!(!local.contains(other));
        let first = local.listings();
        assert_eq!(first, 1);
        for _ in 0..1_000 {
            assert!(local.contains(pod.ip4.into()));
            assert!(!local.contains(other));
        }
        assert_eq!(local.listings(), first, "listed again with nothing changed");

        // Each change is seen by the very next check, with no wait: added, then taken
        // off (the case that matters: a stale "ours" would make the enforcer a relay).
        let rounds = 25;
        for i in 1..=rounds {
            let v4 = format!("198.51.100.{i}");
            let v6 = format!("2001:db8::{i}");
            let (ip4, ip6): (IpAddr, IpAddr) = (v4.parse().unwrap(), v6.parse().unwrap());
            assert!(!local.contains(ip4) && !local.contains(ip6));
            pod.exec_ok(&["ip", "addr", "add", &format!("{v4}/32"), "dev", "lo"]);
            assert!(local.contains(ip4), "{v4}: added, not seen as ours");
            pod.exec_ok(&["ip", "-6", "addr", "add", &format!("{v6}/128"), "dev", "lo"]);
            assert!(local.contains(ip6), "{v6}: added, not seen as ours");
            pod.exec_ok(&["ip", "addr", "del", &format!("{v4}/32"), "dev", "lo"]);
            assert!(!local.contains(ip4), "{v4}: taken off, still seen as ours");
            pod.exec_ok(&["ip", "-6", "addr", "del", &format!("{v6}/128"), "dev", "lo"]);
            assert!(!local.contains(ip6), "{v6}: taken off, still seen as ours");
            // The pod's own address stays ours through the changes around it.
            assert!(local.contains(pod.ip4.into()));
        }
        let listed = local.listings() - first;
        assert!(
            listed >= 4 * rounds,
            "{listed} listings for {} changes",
            4 * rounds
        );
        // Ten thousand changes at once, far more notifications than the subscription's
        // queue holds (the kernel drops the rest and says so with ENOBUFS): the next
        // checks still see every address as it is, in one listing each way.
        let batch = |verb: &str| {
            let file = std::env::temp_dir()
                .join(format!("segmesh-local-addrs-{}-{verb}", std::process::id()));
            let lines: String = (0..10_000u32)
                .map(|i| format!("addr {verb} 10.99.{}.{}/32 dev lo\n", i / 250, i % 250 + 1))
                .collect();
            std::fs::write(&file, lines).unwrap();
            pod.exec_ok(&["ip", "-batch", file.to_str().unwrap()]);
            let _ = std::fs::remove_file(file);
        };
        let (some, last): (IpAddr, IpAddr) = (
            "10.99.0.1".parse().unwrap(),
            "10.99.39.250".parse().unwrap(),
        );
        batch("add");
        let before = local.listings();
        assert!(local.contains(some) && local.contains(last));
        assert_eq!(local.listings(), before + 1, "one listing after the flood");
        batch("del");
        assert!(!local.contains(some) && !local.contains(last));
        assert!(local.contains(pod.ip4.into()));

        // And quiet again: no listing without a change.
        let now = local.listings();
        for _ in 0..1_000 {
            assert!(!local.contains(other));
        }
        assert_eq!(local.listings(), now, "listed again with nothing changed");
    })
    .join()
    .unwrap();
}

/// An interface that leaves the namespace takes its addresses with it: moved to another
/// namespace (as a CNI or an operator might do), its addresses stop being ours at the
/// next check; brought back and deleted, likewise. Both families.
#[test]
fn netns_local_addrs_an_interface_moved_away_takes_its_addresses() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["pod", "away"]);
    let (pod, away) = (topo.host("pod").clone(), topo.host("away").clone());
    let inside = pod.clone();
    pod.thread(move || {
        let pod = inside;
        let local = LocalAddrs::new();
        let (v4, v6): (IpAddr, IpAddr) = (
            "198.51.100.77".parse().unwrap(),
            "2001:db8::77".parse().unwrap(),
        );
        let add = || {
            // A veth pair inside the pod (no dummy module on every kernel).
            pod.exec_ok(&[
                "ip", "link", "add", "smv0", "type", "veth", "peer", "name", "smv1",
            ]);
            pod.exec_ok(&["ip", "addr", "add", "198.51.100.77/32", "dev", "smv0"]);
            pod.exec_ok(&[
                "ip",
                "-6",
                "addr",
                "add",
                "2001:db8::77/128",
                "dev",
                "smv0",
                "nodad",
            ]);
            pod.exec_ok(&["ip", "link", "set", "smv0", "up"]);
            assert!(
                local.contains(v4) && local.contains(v6),
                "added, not seen as ours"
            );
        };
        add();
        pod.exec_ok(&["ip", "link", "set", "smv0", "netns", &away.ns]);
        assert!(
            !local.contains(v4),
            "{v4}: its interface left, still seen as ours"
        );
        assert!(
            !local.contains(v6),
            "{v6}: its interface left, still seen as ours"
        );
        assert!(local.contains(pod.ip4.into()));
        away.exec_ok(&["ip", "link", "del", "smv0"]);
        add();
        pod.exec_ok(&["ip", "link", "del", "smv0"]);
        assert!(
            !local.contains(v4) && !local.contains(v6),
            "deleted, still seen as ours"
        );
    })
    .join()
    .unwrap();
}
