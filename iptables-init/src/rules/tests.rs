use super::*;

fn cfg() -> Config {
    Config {
        exclude_outbound_ports: vec![5432, 22, 22],
        exclude_inbound_ports: vec![9090],
        exclude_outbound_cidrs: vec![
            "10.96.0.0/12".parse().unwrap(),
            "fd00:96::/64".parse().unwrap(),
        ],
        exclude_inbound_cidrs: vec!["192.0.2.0/24".parse().unwrap()],
        ..Config::default()
    }
}

#[test]
fn sidecar_v4_rules() {
    let r = cfg().rules(Family::V4);
    assert_eq!(
        r.nat,
        vec![
            // The proxy uid alone is not enough: the enforcer's mark too.
            "-A SEGMESH_OUTPUT -m owner --uid-owner 1337 -m mark --mark 0x1337 -j RETURN",
            "-A SEGMESH_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A SEGMESH_OUTPUT -o lo -j RETURN",
            "-A SEGMESH_OUTPUT -d 10.96.0.0/12 -j RETURN",
            "-A SEGMESH_OUTPUT -p tcp -m tcp --dport 22 -j RETURN",
            "-A SEGMESH_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
            "-A SEGMESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        ]
    );
    assert_eq!(
        r.mangle,
        vec![
            "-A SEGMESH_DIVERT -j MARK --set-xmark 0x539/0xffffffff",
            "-A SEGMESH_DIVERT -j ACCEPT",
            // Loopback and established traffic leave before the per-packet socket
            // lookup.
            "-A SEGMESH_INBOUND -i lo -j RETURN",
            "-A SEGMESH_INBOUND -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
            "-A SEGMESH_INBOUND -p tcp -m socket --transparent -j SEGMESH_DIVERT",
            // Sidecar mode too: nothing for another address is diverted (no relay).
            "-A SEGMESH_INBOUND -m addrtype ! --dst-type LOCAL -j RETURN",
            "-A SEGMESH_INBOUND -s 192.0.2.0/24 -j RETURN",
            "-A SEGMESH_INBOUND -p tcp -m tcp --dport 9090 -j RETURN",
            "-A SEGMESH_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
            "-A SEGMESH_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
            "-A SEGMESH_INBOUND -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff",
            // Outbound UDP: marked in OUTPUT, routed back through lo, TPROXYed there.
            "-A SEGMESH_UDP_OUT -m owner --uid-owner 1337 -m mark --mark 0x1337 -j RETURN",
            "-A SEGMESH_UDP_OUT -p udp -m owner --uid-owner 1337 -m udp --dport 53 -j RETURN",
            "-A SEGMESH_UDP_OUT -p udp -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN",
            "-A SEGMESH_UDP_OUT -d 127.0.0.0/8 -j RETURN",
            "-A SEGMESH_UDP_OUT -o lo -j RETURN",
            "-A SEGMESH_UDP_OUT -d 10.96.0.0/12 -j RETURN",
            "-A SEGMESH_UDP_OUT -j MARK --set-xmark 0x539/0xffffffff",
            "-A SEGMESH_UDP_DIVERT -i lo -p udp -m mark --mark 0x539 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x539/0xffffffff",
        ]
    );
}

#[test]
fn v6_rules_use_v6_addresses_only() {
    let r = cfg().rules(Family::V6);
    assert!(
        r.nat
            .contains(&"-A SEGMESH_OUTPUT -d ::1/128 -j RETURN".to_owned())
    );
    assert!(
        r.nat
            .contains(&"-A SEGMESH_OUTPUT -d fd00:96::/64 -j RETURN".to_owned())
    );
    assert!(!r.nat.iter().any(|l| l.contains("10.96.")));
    assert!(!r.mangle.iter().any(|l| l.contains("192.0.2.")));
    assert!(
        r.mangle
            .iter()
            .any(|l| l.contains("-p tcp -j TPROXY") && l.contains("--on-ip :: "))
    );
    assert!(r.mangle.last().unwrap().contains("--on-ip ::1 "));
}

#[test]
fn host_mode_only_captures_local_destinations_and_excludes_gid_and_mark() {
    let c = Config {
        mode: Mode::Host,
        proxy_gid: Some(1337),
        proxy_mark: Some(0x2a),
        ..Config::default()
    };
    let r = c.rules(Family::V4);
    assert!(
        r.mangle
            .contains(&"-A SEGMESH_INBOUND -m addrtype ! --dst-type LOCAL -j RETURN".to_owned())
    );
    assert!(r.nat.contains(
        &"-A SEGMESH_OUTPUT -m owner --gid-owner 1337 -m mark --mark 0x1337 -j RETURN".to_owned()
    ));
    assert!(
        r.nat
            .contains(&"-A SEGMESH_OUTPUT -m mark --mark 0x2a -j RETURN".to_owned())
    );
    // Both modes divert only traffic for local addresses.
    assert!(
        Config::default()
            .rules(Family::V4)
            .mangle
            .iter()
            .any(|l| l.contains("addrtype ! --dst-type LOCAL"))
    );
}

#[test]
fn install_adds_jumps_only_when_missing() {
    let r = cfg().rules(Family::V4);
    let fresh = install_payload(&r, &Live::default());
    assert!(fresh.starts_with("*nat\n:SEGMESH_OUTPUT - [0:0]\n"));
    assert!(fresh.contains("-A OUTPUT -p tcp -j SEGMESH_OUTPUT\nCOMMIT\n*mangle\n:SEGMESH_DIVERT - [0:0]\n:SEGMESH_INBOUND - [0:0]\n"));
    assert!(fresh.contains("-A PREROUTING -p udp -j SEGMESH_UDP_DIVERT\nCOMMIT\n*filter\n"));
    assert!(
        fresh.ends_with("-A OUTPUT -j SEGMESH_FILTER_OUT\n-A INPUT -j SEGMESH_FILTER_IN\nCOMMIT\n")
    );
    let live = parse_save(&format!(
        "*nat\n:OUTPUT ACCEPT [0:0]\n:SEGMESH_OUTPUT - [0:0]\n{}\nCOMMIT\n",
        jump_output()
    ));
    let again = install_payload(&r, &live);
    assert!(
        !again.contains("-A OUTPUT -p tcp -j SEGMESH_OUTPUT"),
        "{again}"
    );
    assert!(again.contains("-A PREROUTING -p tcp -j SEGMESH_INBOUND"));
}

fn save_of(r: &Rules) -> String {
    let mut s = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:SEGMESH_OUTPUT - [0:0]\n-A OUTPUT -p tcp -m owner --uid-owner 1 -j ACCEPT\n",
    );
    s.push_str(&format!("{}\n", jump_output()));
    for l in &r.nat {
        s.push_str(l);
        s.push('\n');
    }
    s.push_str("COMMIT\n*mangle\n:PREROUTING ACCEPT [0:0]\n:SEGMESH_DIVERT - [0:0]\n:SEGMESH_INBOUND - [0:0]\n:SEGMESH_UDP_OUT - [0:0]\n:SEGMESH_UDP_DIVERT - [0:0]\n");
    for (t, j) in &r.jumps {
        if *t == "mangle" {
            s.push_str(j);
            s.push('\n');
        }
    }
    for l in &r.mangle {
        s.push_str(l);
        s.push('\n');
    }
    s.push_str("COMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:SEGMESH_FILTER_OUT - [0:0]\n:SEGMESH_FILTER_IN - [0:0]\n");
    for (t, j) in &r.jumps {
        if *t == "filter" {
            s.push_str(j);
            s.push('\n');
        }
    }
    for l in &r.filter {
        s.push_str(l);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    s
}

#[test]
fn check_compares_rules_and_order() {
    let r = cfg().rules(Family::V4);
    let live = parse_save(&save_of(&r));
    assert_eq!(diff(&r, &live), (vec![], vec![]));
    assert!(
        !live.rules.iter().any(|(_, l)| l.contains("--uid-owner 1 ")),
        "others' rules are not ours"
    );
    // A missing rule, an extra rule, a reordering: each is reported.
    let mut missing = r.clone();
    missing
        .nat
        .push("-A SEGMESH_OUTPUT -d 1.2.3.4/32 -j RETURN".into());
    assert_eq!(
        diff(&missing, &live).0,
        vec!["nat: -A SEGMESH_OUTPUT -d 1.2.3.4/32 -j RETURN"]
    );
    let mut fewer = r.clone();
    fewer.nat.remove(1);
    assert_eq!(
        diff(&fewer, &live).1,
        vec!["nat: -A SEGMESH_OUTPUT -d 127.0.0.0/8 -j RETURN"]
    );
    let mut swapped = r.clone();
    swapped.nat.swap(1, 2);
    assert_eq!(
        diff(&swapped, &live).1,
        vec!["rules of SEGMESH_OUTPUT are out of order"]
    );
    // Nothing live: everything is missing.
    assert_eq!(
        diff(&r, &Live::default()).0.len(),
        r.nat.len() + r.mangle.len() + r.filter.len() + r.jumps.len()
    );
}

#[test]
fn cleanup_removes_exactly_ours() {
    let r = cfg().rules(Family::V4);
    let live = parse_save(&save_of(&r));
    let p = cleanup_payload(&live);
    assert_eq!(
        p,
        "*nat\n-D OUTPUT -p tcp -j SEGMESH_OUTPUT\n-F SEGMESH_OUTPUT\n-X SEGMESH_OUTPUT\nCOMMIT\n\
         *mangle\n-D PREROUTING -p tcp -j SEGMESH_INBOUND\n-D OUTPUT -p udp -j SEGMESH_UDP_OUT\n-D PREROUTING -p udp -j SEGMESH_UDP_DIVERT\n\
         -F SEGMESH_DIVERT\n-F SEGMESH_INBOUND\n-F SEGMESH_UDP_OUT\n-F SEGMESH_UDP_DIVERT\n\
         -X SEGMESH_DIVERT\n-X SEGMESH_INBOUND\n-X SEGMESH_UDP_OUT\n-X SEGMESH_UDP_DIVERT\nCOMMIT\n\
         *filter\n-D OUTPUT -j SEGMESH_FILTER_OUT\n-D INPUT -j SEGMESH_FILTER_IN\n-F SEGMESH_FILTER_OUT\n-F SEGMESH_FILTER_IN\n-X SEGMESH_FILTER_OUT\n-X SEGMESH_FILTER_IN\nCOMMIT\n"
    );
    assert_eq!(cleanup_payload(&Live::default()), "");
}

#[test]
fn route_commands_per_family() {
    let (add, del) = route_commands(&Config::default(), Family::V6);
    assert_eq!(
        add,
        vec![
            "-6 rule add fwmark 0x539 lookup 133",
            "-6 route replace local ::/0 dev lo table 133"
        ]
    );
    assert_eq!(
        del,
        vec![
            "-6 rule del fwmark 0x539 lookup 133",
            "-6 route flush table 133"
        ]
    );
}

#[test]
fn reserved_ports_are_merged_and_released_exactly() {
    let ours = enforcer_ports(&Config::default());
    assert_eq!(ours, vec![15001, 15006, 15008, 15020]);
    assert_eq!(reserved_with("", &ours), "15001,15006,15008,15020");
    assert_eq!(
        reserved_with("8080,15000-15002\n", &ours),
        "8080,15000-15002,15006,15008,15020"
    );
    assert_eq!(
        reserved_with("15001,15006,15008,15020", &ours),
        "15001,15006,15008,15020"
    );
    // Releasing leaves what others reserved, even inside a range that held ours.
    assert_eq!(
        reserved_without("8080,15000-15002,15006,15008,15020", &ours),
        "8080,15000,15002"
    );
    assert_eq!(reserved_without("15001,15006,15008,15020", &ours), "");
    assert_eq!(reserved_with("65535", &[65534]), "65534-65535");
}

/// Both modes drop every other protocol, keeping what the network needs; `--tcp-only`
/// leaves UDP and the rest alone.
#[test]
fn other_protocols_are_dropped_in_both_modes() {
    let v4 = Config::default().rules(Family::V4);
    assert_eq!(
        v4.filter,
        vec![
            "-A SEGMESH_FILTER_OUT -o lo -j RETURN",
            "-A SEGMESH_FILTER_OUT -p tcp -j RETURN",
            "-A SEGMESH_FILTER_OUT -p udp -j RETURN",
            "-A SEGMESH_FILTER_OUT -p icmp -m conntrack --ctstate RELATED -j RETURN",
            // Echo: requests decided by the enforcer, replies of allowed ones tracked.
            "-A SEGMESH_FILTER_OUT -p icmp -m conntrack --ctstate ESTABLISHED -j RETURN",
            "-A SEGMESH_FILTER_OUT -p icmp -m icmp --icmp-type 8 -j NFQUEUE --queue-num 1337",
            "-A SEGMESH_FILTER_OUT -j DROP",
            "-A SEGMESH_FILTER_IN -i lo -j RETURN",
            "-A SEGMESH_FILTER_IN -p tcp -j RETURN",
            // Inbound UDP: tracked sessions pass, a new one is the enforcer's decision.
            "-A SEGMESH_FILTER_IN -p udp -m conntrack --ctstate ESTABLISHED -j RETURN",
            "-A SEGMESH_FILTER_IN -p udp -m conntrack --ctstate NEW -j NFQUEUE --queue-num 1337",
            "-A SEGMESH_FILTER_IN -p icmp -m conntrack --ctstate RELATED -j RETURN",
            "-A SEGMESH_FILTER_IN -p icmp -m conntrack --ctstate ESTABLISHED -j RETURN",
            "-A SEGMESH_FILTER_IN -p icmp -m icmp --icmp-type 8 -j NFQUEUE --queue-num 1337",
            "-A SEGMESH_FILTER_IN -j DROP",
        ]
    );
    let v6 = Config::default().rules(Family::V6);
    for t in [133, 134, 135, 136, 143] {
        let rule =
            format!("-A SEGMESH_FILTER_IN -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN");
        assert!(v6.filter.contains(&rule), "{rule}");
    }
    assert!(v6.filter.contains(
        &"-A SEGMESH_FILTER_OUT -p ipv6-icmp -m conntrack --ctstate RELATED -j RETURN".to_owned()
    ));
    // Echo requests (128) go to the enforcer, never straight through.
    assert!(v6.filter.contains(
        &"-A SEGMESH_FILTER_IN -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j NFQUEUE --queue-num 1337".to_owned()
    ));
    assert!(
        !v6.filter
            .iter()
            .any(|r| r.contains("--icmpv6-type 128 -j RETURN"))
    );
    // Host mode mediates the same way; excluded networks keep every protocol.
    let host = Config {
        mode: Mode::Host,
        exclude_inbound_cidrs: vec!["192.0.2.0/24".parse().unwrap()],
        exclude_outbound_cidrs: vec!["198.51.100.7/32".parse().unwrap()],
        ..Config::default()
    };
    let h = host.rules(Family::V4);
    assert_eq!(
        h.filter[1],
        "-A SEGMESH_FILTER_OUT -d 198.51.100.7/32 -j RETURN"
    );
    assert!(
        h.filter
            .contains(&"-A SEGMESH_FILTER_IN -s 192.0.2.0/24 -j RETURN".to_owned())
    );
    assert!(
        h.filter
            .ends_with(&["-A SEGMESH_FILTER_IN -j DROP".to_owned()])
    );
    assert!(
        h.mangle
            .iter()
            .any(|r| r.contains("SEGMESH_UDP_DIVERT -i lo -p udp"))
    );
    assert_eq!(h.jumps.iter().filter(|(t, _)| *t == "filter").count(), 2);
    // `--tcp-only`: neither UDP nor the filter chains.
    let tcp = Config {
        mode: Mode::Host,
        tcp_only: true,
        ..Config::default()
    };
    let t = tcp.rules(Family::V4);
    assert!(t.filter.is_empty());
    assert!(!t.jumps.iter().any(|(t, _)| *t == "filter"));
    assert!(!t.mangle.iter().any(|r| r.contains("-p udp")));
}
