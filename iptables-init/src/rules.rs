//! The capture rules, generated as `iptables-restore` lines with no I/O.
//!
//! Outbound (nat `OUTPUT`): every TCP connection a local process opens is REDIRECTed to
//! the enforcer's outbound port, except the enforcer's own (its uid, or gid, *and* the
//! mark every enforcer socket sets with `SO_MARK`: a process that merely runs as the
//! proxy uid is captured), loopback, and configured ports and destination CIDRs.
//!
//! Inbound (mangle `PREROUTING`): every new TCP connection arriving from outside for one
//! of this namespace's own addresses is TPROXYed to the enforcer's inbound port with a
//! mark that policy routing delivers locally (kernel `Documentation/networking/
//! tproxy.rst`), except established traffic, the tunnel and admin ports, and configured
//! ports and source CIDRs. Traffic for other addresses is never diverted (the enforcer
//! must not become a relay for a neighbour that routes a network through the pod).
//! Packets of an already-diverted connection (a transparent socket) keep their mark.
//!
//! Outbound UDP (both modes unless `tcp_only`; mangle `OUTPUT`, then `PREROUTING` on `lo`): every
//! datagram a local process sends, except the enforcer's own (uid and mark), loopback
//! and excluded destinations, gets the TPROXY mark, which policy routing sends back
//! through `lo`, where TPROXY hands it to the enforcer's transparent UDP socket on the
//! outbound port with its original destination (the standard technique for locally
//! generated traffic, kernel `Documentation/networking/tproxy.rst`). Inbound UDP: the
//! first datagram of a new session goes to the enforcer through NFQUEUE for its decision
//! (with no enforcer reading the queue, it is dropped); the rest of an accepted session
//! and the workload's answers pass as the tracked flow.
//!
//! Other protocols (filter `OUTPUT` and `INPUT`, both modes unless `tcp_only`):
//! everything but TCP and UDP is dropped, except what the network itself needs:
//! loopback, ICMP errors related to a tracked flow (PMTU, unreachable: conntrack
//! `RELATED`; in host mode also those the host sends about traffic it forwards), IPv6
//! neighbour discovery, router and multicast-listener messages, and the excluded
//! CIDRs (an admin network keeps every protocol). ICMP echo requests go to the
//! enforcer through NFQUEUE (a policy's `icmp` port decides them; with no enforcer
//! reading the queue the kernel drops them); replies of allowed ones pass as tracked
//! flows.
//!
//! Every rule lives in the project's own chains, so removal is exact. Lines are written
//! in the form `iptables-save` prints, so `--check` compares them textually.

use std::fmt::Write;

use ipnet::IpNet;

pub const CHAIN_OUTPUT: &str = "SEGMESH_OUTPUT";
pub const CHAIN_INBOUND: &str = "SEGMESH_INBOUND";
pub const CHAIN_DIVERT: &str = "SEGMESH_DIVERT";
pub const CHAIN_UDP_OUT: &str = "SEGMESH_UDP_OUT";
pub const CHAIN_UDP_DIVERT: &str = "SEGMESH_UDP_DIVERT";
pub const CHAIN_FILTER_OUT: &str = "SEGMESH_FILTER_OUT";
pub const CHAIN_FILTER_IN: &str = "SEGMESH_FILTER_IN";

/// ICMPv6 types the network needs (RFC 4861 router and neighbour discovery, RFC 3810
/// multicast listener discovery, which neighbour discovery's multicast relies on).
const ICMPV6_NEEDED: [u8; 8] = [130, 131, 132, 133, 134, 135, 136, 143];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Inside a workload's own network namespace (a pod): capture everything.
    Sidecar,
    /// On a host, for the host's own processes: only locally generated traffic and
    /// traffic for the host's own addresses (the `OUTPUT` and `INPUT` paths), so
    /// forwarded traffic (containers, routing) is left alone.
    Host,
}

/// What to capture and what to leave alone.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    /// The enforcer's uid: its own connections are never captured. Default 1337.
    pub proxy_uid: u32,
    /// Also exclude this gid.
    pub proxy_gid: Option<u32>,
    /// The mark every enforcer socket carries (`SO_MARK`); the uid and gid exemptions
    /// hold only for packets with it. Default 0x1337.
    pub enforcer_mark: u32,
    /// Also exclude packets carrying this mark, whatever their owner (setting a mark
    /// needs CAP_NET_ADMIN).
    pub proxy_mark: Option<u32>,
    /// Outbound capture port. Default 15001.
    pub outbound_port: u16,
    /// Inbound capture port. Default 15006.
    pub inbound_port: u16,
    /// Mesh tunnel port, never captured inbound. Default 15008.
    pub tunnel_port: u16,
    /// Admin port, never captured inbound. Default 15020.
    pub admin_port: u16,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    /// Destinations never captured outbound.
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Sources never captured inbound (e.g. an admin network's SSH in host mode).
    pub exclude_inbound_cidrs: Vec<IpNet>,
    /// The NFQUEUE number ICMP echo requests go to for the enforcer's decision. Default
    /// 1337.
    pub echo_queue: u16,
    /// Mark TPROXY puts on diverted packets, and the routing table that delivers them.
    /// Defaults 0x539 and 133.
    pub tproxy_mark: u32,
    pub route_table: u32,
    /// Capture TCP only: UDP, ICMP and every other protocol pass unmediated (they
    /// bypass policy). For a host whose other traffic is not yet described by policy;
    /// off by default in both modes.
    pub tcp_only: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Sidecar,
            proxy_uid: 1337,
            proxy_gid: None,
            enforcer_mark: 0x1337,
            proxy_mark: None,
            outbound_port: 15001,
            inbound_port: 15006,
            tunnel_port: 15008,
            admin_port: 15020,
            exclude_outbound_ports: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            exclude_inbound_cidrs: Vec::new(),
            echo_queue: 1337,
            tproxy_mark: 0x539,
            route_table: 133,
            tcp_only: false,
        }
    }
}

/// The rules of one family, by table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub family: Family,
    /// Rules in our nat chain.
    pub nat: Vec<String>,
    /// Rules in our mangle chains.
    pub mangle: Vec<String>,
    /// Rules in our filter chains (other protocols; sidecar mode).
    pub filter: Vec<String>,
    /// The jumps from the built-in chains into ours: (table, rule).
    pub jumps: Vec<(&'static str, String)>,
}

fn in_family(net: &IpNet, f: Family) -> bool {
    matches!(
        (net, f),
        (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6)
    )
}

/// Ports sorted and deduplicated, so the rules do not depend on flag order.
fn sorted(ports: &[u16]) -> Vec<u16> {
    let mut p = ports.to_vec();
    p.sort_unstable();
    p.dedup();
    p
}

pub fn jump_output() -> String {
    format!("-A OUTPUT -p tcp -j {CHAIN_OUTPUT}")
}

pub fn jump_inbound() -> String {
    format!("-A PREROUTING -p tcp -j {CHAIN_INBOUND}")
}

/// Drops every protocol but TCP and UDP in both directions, except what the network
/// needs (see the module doc); echo requests go to the enforcer's queue, their replies
/// pass as tracked flows.
fn filter_rules(cfg: &Config, family: Family) -> Vec<String> {
    let queue = cfg.echo_queue;
    let icmp = match family {
        Family::V4 => "icmp",
        Family::V6 => "ipv6-icmp",
    };
    let mut out = Vec::new();
    for (chain, iface) in [(CHAIN_FILTER_OUT, "-o lo"), (CHAIN_FILTER_IN, "-i lo")] {
        out.push(format!("-A {chain} {iface} -j RETURN"));
        // Excluded networks keep every protocol, as they keep TCP.
        let (excluded, flag) = match chain {
            CHAIN_FILTER_OUT => (&cfg.exclude_outbound_cidrs, "-d"),
            _ => (&cfg.exclude_inbound_cidrs, "-s"),
        };
        for net in excluded.iter().filter(|n| in_family(n, family)) {
            out.push(format!("-A {chain} {flag} {} -j RETURN", net.trunc()));
        }
        out.push(format!("-A {chain} -p tcp -j RETURN"));
        match chain {
            // Outbound UDP is captured (mangle).
            CHAIN_FILTER_OUT => out.push(format!("-A {chain} -p udp -j RETURN")),
            // Inbound: the rest of tracked sessions (answers to the enforcer's sockets,
            // sessions the enforcer accepted); a new session's first datagram goes to the
            // enforcer for its decision.
            _ => {
                out.push(format!(
                    "-A {chain} -p udp -m conntrack --ctstate ESTABLISHED -j RETURN"
                ));
                out.push(format!(
                    "-A {chain} -p udp -m conntrack --ctstate NEW -j NFQUEUE --queue-num {queue}"
                ));
            }
        }
        out.push(format!(
            "-A {chain} -p {icmp} -m conntrack --ctstate RELATED -j RETURN"
        ));
        if family == Family::V6 {
            for t in ICMPV6_NEEDED {
                out.push(format!(
                    "-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN"
                ));
            }
        }
        // Echo: each request decided by the enforcer (NFQUEUE; with no enforcer reading
        // the queue the kernel drops it), the replies of allowed ones pass.
        out.push(format!(
            "-A {chain} -p {icmp} -m conntrack --ctstate ESTABLISHED -j RETURN"
        ));
        out.push(match family {
            Family::V4 => {
                format!("-A {chain} -p icmp -m icmp --icmp-type 8 -j NFQUEUE --queue-num {queue}")
            }
            Family::V6 => format!(
                "-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j NFQUEUE --queue-num {queue}"
            ),
        });
        out.push(format!("-A {chain} -j DROP"));
    }
    out
}

impl Config {
    /// What leaves `chain` uncaptured, in order: the enforcer's own packets (its uid or
    /// gid *and* its mark; any packet with `proxy_mark`), then — after `extra` — loopback
    /// and excluded destinations.
    fn exemptions(
        &self,
        chain: &str,
        extra: &[String],
        loopback: &str,
        family: Family,
    ) -> Vec<String> {
        let enforcer = format!("-m mark --mark 0x{:x}", self.enforcer_mark);
        let mut out = vec![format!(
            "-A {chain} -m owner --uid-owner {} {enforcer} -j RETURN",
            self.proxy_uid
        )];
        if let Some(gid) = self.proxy_gid {
            out.push(format!(
                "-A {chain} -m owner --gid-owner {gid} {enforcer} -j RETURN"
            ));
        }
        if let Some(m) = self.proxy_mark {
            out.push(format!("-A {chain} -m mark --mark 0x{m:x} -j RETURN"));
        }
        out.extend(extra.iter().cloned());
        out.push(format!("-A {chain} -d {loopback} -j RETURN"));
        out.push(format!("-A {chain} -o lo -j RETURN"));
        for net in self
            .exclude_outbound_cidrs
            .iter()
            .filter(|n| in_family(n, family))
        {
            out.push(format!("-A {chain} -d {} -j RETURN", net.trunc()));
        }
        out
    }

    /// Outbound UDP left alone: as TCP, plus the enforcer's own name lookups (the
    /// console's address): glibc's resolver cannot mark its socket, and a fail-closed
    /// enforcer could not decide them. Only DNS, only the proxy uid, which no other
    /// process of an injected pod has.
    fn udp_exemptions(&self, loopback: &str, family: Family) -> Vec<String> {
        let dns = format!(
            "-A {CHAIN_UDP_OUT} -p udp -m owner --uid-owner {} -m udp --dport 53 -j RETURN",
            self.proxy_uid
        );
        // The workload's answers within inbound sessions the enforcer accepted (the reply
        // direction of a tracked flow; its own sessions' datagrams are the original
        // direction and stay captured).
        let answers = format!(
            "-A {CHAIN_UDP_OUT} -p udp -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN"
        );
        self.exemptions(CHAIN_UDP_OUT, &[dns, answers], loopback, family)
    }

    pub fn rules(&self, family: Family) -> Rules {
        let (loopback, any) = match family {
            Family::V4 => ("127.0.0.0/8", "0.0.0.0"),
            Family::V6 => ("::1/128", "::"),
        };
        let mark = format!("0x{:x}/0xffffffff", self.tproxy_mark);

        let mut nat = self.exemptions(CHAIN_OUTPUT, &[], loopback, family);
        for p in sorted(&self.exclude_outbound_ports) {
            nat.push(format!(
                "-A {CHAIN_OUTPUT} -p tcp -m tcp --dport {p} -j RETURN"
            ));
        }
        nat.push(format!(
            "-A {CHAIN_OUTPUT} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));

        let mut mangle = vec![
            format!("-A {CHAIN_DIVERT} -j MARK --set-xmark {mark}"),
            format!("-A {CHAIN_DIVERT} -j ACCEPT"),
            // Cheapest first: every TCP packet the namespace receives walks this chain,
            // most of them on `lo` (the application's and the workload's hops to their
            // enforcer) or of established connections. Neither is ever diverted, so
            // they leave before the socket match, which looks the packet's socket up
            // (an established and a listener lookup) for each packet it sees. What the
            // socket match still catches: packets of a transparent socket that
            // conntrack does not call established (a retransmitted SYN before the
            // SYN-ACK); packets of transparent sockets are always for a local address
            // (only those are diverted), so established ones are delivered to their
            // socket without the mark.
            format!("-A {CHAIN_INBOUND} -i lo -j RETURN"),
            format!("-A {CHAIN_INBOUND} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"),
            format!("-A {CHAIN_INBOUND} -p tcp -m socket --transparent -j {CHAIN_DIVERT}"),
            // Only our own addresses, in both modes: no relay to anywhere else.
            format!("-A {CHAIN_INBOUND} -m addrtype ! --dst-type LOCAL -j RETURN"),
        ];
        for net in self
            .exclude_inbound_cidrs
            .iter()
            .filter(|n| in_family(n, family))
        {
            mangle.push(format!("-A {CHAIN_INBOUND} -s {} -j RETURN", net.trunc()));
        }
        let mut skip = vec![self.tunnel_port, self.admin_port];
        skip.extend(&self.exclude_inbound_ports);
        for p in sorted(&skip) {
            mangle.push(format!(
                "-A {CHAIN_INBOUND} -p tcp -m tcp --dport {p} -j RETURN"
            ));
        }
        mangle.push(format!(
            "-A {CHAIN_INBOUND} -p tcp -j TPROXY --on-port {} --on-ip {any} --tproxy-mark {mark}",
            self.inbound_port
        ));
        let mut jumps = vec![("nat", jump_output()), ("mangle", jump_inbound())];
        // Both modes mediate every protocol; `OUTPUT` and `INPUT` see only a host's own
        // traffic, never what it forwards.
        let filter = if self.tcp_only {
            Vec::new()
        } else {
            jumps.push(("filter", format!("-A OUTPUT -j {CHAIN_FILTER_OUT}")));
            jumps.push(("filter", format!("-A INPUT -j {CHAIN_FILTER_IN}")));
            filter_rules(self, family)
        };
        if !self.tcp_only {
            let lo = match family {
                Family::V4 => "127.0.0.1",
                Family::V6 => "::1",
            };
            mangle.extend(self.udp_exemptions(loopback, family));
            mangle.push(format!("-A {CHAIN_UDP_OUT} -j MARK --set-xmark {mark}"));
            mangle.push(format!(
                "-A {CHAIN_UDP_DIVERT} -i lo -p udp -m mark --mark 0x{:x} -j TPROXY --on-port {} --on-ip {lo} --tproxy-mark {mark}",
                self.tproxy_mark, self.outbound_port
            ));
            jumps.push(("mangle", format!("-A OUTPUT -p udp -j {CHAIN_UDP_OUT}")));
            jumps.push((
                "mangle",
                format!("-A PREROUTING -p udp -j {CHAIN_UDP_DIVERT}"),
            ));
        }
        Rules {
            family,
            nat,
            mangle,
            filter,
            jumps,
        }
    }
}

/// The enforcer's listening ports, which no other socket of the namespace may be handed
/// as an ephemeral port (a client socket in TIME_WAIT on 15008 would block the
/// enforcer's bind).
pub fn enforcer_ports(cfg: &Config) -> Vec<u16> {
    sorted(&[
        cfg.outbound_port,
        cfg.inbound_port,
        cfg.tunnel_port,
        cfg.admin_port,
    ])
}

/// Parses `net.ipv4.ip_local_reserved_ports` (`8080,15000-15010`) into ranges; what does
/// not parse is dropped.
fn reserved_ranges(list: &str) -> Vec<(u16, u16)> {
    list.split(',')
        .filter_map(|r| {
            let r = r.trim();
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

fn reserved_list(ports: &std::collections::BTreeSet<u16>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut iter = ports.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end.wrapping_add(1))) && end < u16::MAX {
            end = iter.next().expect("peeked");
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

fn reserved_set(list: &str) -> std::collections::BTreeSet<u16> {
    reserved_ranges(list)
        .into_iter()
        .flat_map(|(a, b)| a..=b)
        .collect()
}

/// The reserved-ports list with `ports` added (what was reserved stays).
pub fn reserved_with(list: &str, ports: &[u16]) -> String {
    let mut set = reserved_set(list);
    set.extend(ports);
    reserved_list(&set)
}

/// The reserved-ports list with `ports` removed (the rest stays).
pub fn reserved_without(list: &str, ports: &[u16]) -> String {
    let mut set = reserved_set(list);
    for p in ports {
        set.remove(p);
    }
    reserved_list(&set)
}

/// The policy routing TPROXY needs: marked packets are delivered locally.
pub fn route_commands(cfg: &Config, family: Family) -> (Vec<String>, Vec<String>) {
    let (flag, any) = match family {
        Family::V4 => ("-4", "0.0.0.0/0"),
        Family::V6 => ("-6", "::/0"),
    };
    let rule = format!(
        "rule add fwmark 0x{:x} lookup {}",
        cfg.tproxy_mark, cfg.route_table
    );
    let route = format!("route replace local {any} dev lo table {}", cfg.route_table);
    (
        vec![format!("{flag} {rule}"), format!("{flag} {route}")],
        vec![
            format!(
                "{flag} rule del fwmark 0x{:x} lookup {}",
                cfg.tproxy_mark, cfg.route_table
            ),
            format!("{flag} route flush table {}", cfg.route_table),
        ],
    )
}

/// What the live tables hold of ours, parsed from `iptables-save` output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Live {
    pub chains: Vec<(String, String)>,
    /// (table, rule) for rules in our chains and jumps into them.
    pub rules: Vec<(String, String)>,
}

pub fn parse_save(save: &str) -> Live {
    let mut live = Live::default();
    let mut table = String::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_owned();
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if name.starts_with("SEGMESH_") {
                live.chains.push((table.clone(), name.to_owned()));
            }
        } else if line.starts_with("-A ") && line.contains("SEGMESH_") {
            live.rules.push((table.clone(), line.to_owned()));
        }
    }
    live
}

/// The `iptables-restore --noflush` payload installing `rules` over what is live:
/// declaring our chains flushes them, then they are refilled, and the jumps are added
/// only where missing; each table commits atomically.
pub fn install_payload(rules: &Rules, live: &Live) -> String {
    let mut out = String::new();
    for (table, chains, body) in [
        ("nat", vec![CHAIN_OUTPUT], &rules.nat),
        (
            "mangle",
            if rules
                .mangle
                .iter()
                .any(|r| r.starts_with("-A SEGMESH_UDP_"))
            {
                vec![CHAIN_DIVERT, CHAIN_INBOUND, CHAIN_UDP_OUT, CHAIN_UDP_DIVERT]
            } else {
                vec![CHAIN_DIVERT, CHAIN_INBOUND]
            },
            &rules.mangle,
        ),
        (
            "filter",
            vec![CHAIN_FILTER_OUT, CHAIN_FILTER_IN],
            &rules.filter,
        ),
    ] {
        if body.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{table}");
        for c in &chains {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for r in body {
            let _ = writeln!(out, "{r}");
        }
        for (t, jump) in rules.jumps.iter().filter(|(t, _)| *t == table) {
            if !live.rules.iter().any(|(lt, lr)| lt == t && lr == jump) {
                let _ = writeln!(out, "{jump}");
            }
        }
        let _ = writeln!(out, "COMMIT");
    }
    out
}

/// The payload removing everything of ours that is live (and nothing else).
pub fn cleanup_payload(live: &Live) -> String {
    let mut out = String::new();
    for table in ["nat", "mangle", "filter"] {
        let jumps: Vec<&String> = live
            .rules
            .iter()
            .filter(|(t, r)| t == table && !r.starts_with("-A SEGMESH_"))
            .map(|(_, r)| r)
            .collect();
        let chains: Vec<&String> = live
            .chains
            .iter()
            .filter(|(t, _)| t == table)
            .map(|(_, c)| c)
            .collect();
        if jumps.is_empty() && chains.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{table}");
        for j in jumps {
            let _ = writeln!(out, "{}", j.replacen("-A ", "-D ", 1));
        }
        for c in &chains {
            let _ = writeln!(out, "-F {c}");
        }
        for c in &chains {
            let _ = writeln!(out, "-X {c}");
        }
        let _ = writeln!(out, "COMMIT");
    }
    out
}

/// Differences between what `rules` wants and what is live: (missing, unexpected).
pub fn diff(rules: &Rules, live: &Live) -> (Vec<String>, Vec<String>) {
    let mut want: Vec<(String, String)> = rules
        .nat
        .iter()
        .map(|r| ("nat".to_owned(), r.clone()))
        .collect();
    want.extend(
        rules
            .mangle
            .iter()
            .map(|r| ("mangle".to_owned(), r.clone())),
    );
    want.extend(
        rules
            .filter
            .iter()
            .map(|r| ("filter".to_owned(), r.clone())),
    );
    want.extend(rules.jumps.iter().map(|(t, r)| (t.to_string(), r.clone())));
    let missing: Vec<String> = want
        .iter()
        .filter(|w| !live.rules.contains(w))
        .map(|(t, r)| format!("{t}: {r}"))
        .collect();
    let mut unexpected: Vec<String> = live
        .rules
        .iter()
        .filter(|l| !want.contains(l))
        .map(|(t, r)| format!("{t}: {r}"))
        .collect();
    // Order matters inside a chain.
    for chain in [
        CHAIN_OUTPUT,
        CHAIN_DIVERT,
        CHAIN_INBOUND,
        CHAIN_UDP_OUT,
        CHAIN_UDP_DIVERT,
        CHAIN_FILTER_OUT,
        CHAIN_FILTER_IN,
    ] {
        let prefix = format!("-A {chain} ");
        let live_order: Vec<&String> = live
            .rules
            .iter()
            .map(|(_, r)| r)
            .filter(|r| r.starts_with(&prefix))
            .collect();
        let want_order: Vec<&String> = want
            .iter()
            .map(|(_, r)| r)
            .filter(|r| r.starts_with(&prefix))
            .collect();
        if live_order != want_order && missing.is_empty() && unexpected.is_empty() {
            unexpected.push(format!("rules of {chain} are out of order"));
        }
    }
    (missing, unexpected)
}

#[cfg(test)]
mod tests;
