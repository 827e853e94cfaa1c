//! The capture rules applied, checked and removed for real, inside a network namespace.

use segmesh_testkit::{Topology, netns_enabled};

fn init(host: &segmesh_testkit::Host, args: &[&str]) -> std::process::Output {
    host.command(env!("CARGO_BIN_EXE_segmesh-iptables-init"))
        .args(args)
        .output()
        .expect("run segmesh-iptables-init")
}

fn save(host: &segmesh_testkit::Host) -> String {
    let mut s = host.exec_ok(&["iptables-save", "-t", "nat"]);
    s.push_str(&host.exec_ok(&["iptables-save", "-t", "mangle"]));
    s.push_str(&host.exec_ok(&["ip6tables-save", "-t", "nat"]));
    s.push_str(&host.exec_ok(&["ip6tables-save", "-t", "mangle"]));
    s.push_str(&host.exec_ok(&["ip", "-4", "rule"]));
    s.push_str(&host.exec_ok(&["ip", "-6", "rule"]));
    // Drop the timestamps and counters iptables-save prints.
    s.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap().to_owned() + "\n")
        .collect()
}

#[test]
fn netns_apply_check_reapply_cleanup() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["work"]);
    let h = topo.host("work");
    // Someone else's rule, which we must leave alone.
    h.exec_ok(&[
        "iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9999", "-j",
        "ACCEPT",
    ]);
    let before = save(h);

    let check = init(h, &["--check"]);
    assert_eq!(
        check.status.code(),
        Some(1),
        "nothing installed yet: --check fails"
    );

    let args = [
        "--exclude-outbound-ports",
        "5432",
        "--exclude-inbound-cidrs",
        "192.0.2.0/24,2001:db8::/32",
    ];
    let out = init(h, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = init(h, &[&args[..], &["--check"]].concat());
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let applied = save(h);
    for needle in [
        "-A OUTPUT -p tcp -j SEGMESH_OUTPUT",
        "-A SEGMESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        "-A PREROUTING -p tcp -j SEGMESH_INBOUND",
        "--on-ip :: --tproxy-mark 0x539/0xffffffff",
        "-A SEGMESH_INBOUND -s 2001:db8::/32 -j RETURN",
        "fwmark 0x539 lookup 133",
    ] {
        assert!(applied.contains(needle), "{needle} not in:\n{applied}");
    }

    // Running it twice changes nothing.
    assert!(init(h, &args).status.success());
    assert_eq!(save(h), applied);

    // A different configuration is detected by --check, and re-applying converges.
    let check = init(h, &["--check"]);
    assert_eq!(check.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("--dport 5432"),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // Someone deletes one of our rules: --check says so.
    h.exec_ok(&[
        "iptables",
        "-w",
        "-t",
        "nat",
        "-D",
        "SEGMESH_OUTPUT",
        "-o",
        "lo",
        "-j",
        "RETURN",
    ]);
    assert_eq!(
        init(h, &[&args[..], &["--check"]].concat()).status.code(),
        Some(1)
    );
    assert!(init(h, &args).status.success());
    assert_eq!(save(h), applied);

    // Cleanup removes exactly what we added, twice is fine.
    assert!(init(h, &["--cleanup"]).status.success());
    assert_eq!(save(h), before);
    assert!(init(h, &["--cleanup"]).status.success());
    assert_eq!(save(h), before);
}

#[test]
fn netns_dry_run_changes_nothing() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["work"]);
    let h = topo.host("work");
    let before = save(h);
    let out = init(h, &["--dry-run", "--mode", "host"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("*nat\n:SEGMESH_OUTPUT - [0:0]"), "{text}");
    assert!(text.contains("--dst-type LOCAL"), "{text}");
    assert!(text.contains("# V6"), "{text}");
    assert_eq!(save(h), before);
}
