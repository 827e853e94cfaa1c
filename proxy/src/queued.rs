//! Packets the capture rules queue to the enforcer (NFQUEUE) for a decision:
//! - ICMP echo requests, both directions, decided on the `icmp` port of the policies — to
//!   or from an external network by its address (and the names our PU resolved to it),
//!   to or from a PU by what the registry proves without a certificate (its name and
//!   namespace: ICMP carries no identity);
//! - the first datagram of an inbound UDP session from outside the mesh, decided as
//!   incoming on `udp/N` against the external networks of its source (a registered PU
//!   must come through the tunnel). The rest of an accepted session, and the workload's
//!   answers, pass as the kernel's tracked flow (conntrack), so the workload answers from
//!   its own address and port.
//!
//! Accepted packets go on, refused ones are dropped. A refusal, and an echo decision,
//! is recorded once per peer, direction, port and verdict every [`RECORD_EVERY`] (a
//! flood does not flood the flow log). An accepted inbound UDP session is recorded when
//! the kernel's tracked flow ends, with the kernel's counters (conntrack DESTROY events,
//! read from conntrack-tools' `conntrack -E`; see [`Carried`]).

use std::collections::HashMap;
use std::io::BufRead;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use segmesh_api::{CloseReason, FlowRecord};
use segmesh_policy::{Direction, FlowPort, PreparedPeer, Verdict};

use crate::flow::{Flow, Recorder, reason_of};
use crate::state::Shared;

/// How often one peer's echo decisions are recorded at most.
pub(crate) const RECORD_EVERY: Duration = Duration::from_secs(10);

/// netfilter hooks (linux/netfilter.h): where a queued packet was taken.
const NF_INET_LOCAL_IN: u8 = 1;

/// Source and destination of an IPv4 or IPv6 packet.
fn addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let s: [u8; 4] = packet[12..16].try_into().ok()?;
            let d: [u8; 4] = packet[16..20].try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        6 if packet.len() >= 40 => {
            let s: [u8; 16] = packet[8..24].try_into().ok()?;
            let d: [u8; 16] = packet[24..40].try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        _ => None,
    }
}

/// A UDP session's 4-tuple as the kernel tracks it: source, source port, destination,
/// destination port (the original direction).
type Tuple = (IpAddr, u16, IpAddr, u16);

/// Inbound UDP sessions the kernel carries after the enforcer accepted them, waiting
/// for the end of their tracked flow: then each is recorded with the kernel's counters
/// (datagrams and bytes each way; conntrack accounting, which the capture init turns
/// on). While the events cannot be read, an accepted session is recorded when it is
/// accepted, without counters.
pub(crate) struct Carried {
    waiting: Mutex<HashMap<Tuple, (FlowRecord, Instant)>>,
    live: AtomicBool,
    bound: usize,
}

impl Carried {
    fn new(bound: usize) -> Carried {
        Carried {
            waiting: Mutex::new(HashMap::new()),
            live: AtomicBool::new(false),
            bound,
        }
    }

    /// Keeps `r` until the session ends; gives it back when it cannot (no events, or
    /// the table is full: recorded now, without counters).
    fn wait(&self, t: Tuple, r: FlowRecord) -> Option<FlowRecord> {
        if !self.live.load(Ordering::Relaxed) {
            return Some(r);
        }
        let mut w = self.waiting.lock().expect("lock poisoned");
        if w.len() >= self.bound && !w.contains_key(&t) {
            return Some(r);
        }
        // A tuple accepted again (its tracked flow deleted for a re-decision) keeps
        // the first record; the end event of the old flow completes it.
        w.entry(t).or_insert((r, Instant::now()));
        None
    }

    /// The record of a session that ended, completed with the kernel's counters.
    fn ended(&self, e: &Ended) -> Option<FlowRecord> {
        let (mut r, started) = self
            .waiting
            .lock()
            .expect("lock poisoned")
            .remove(&e.tuple)?;
        // conntrack counts IP packets: the payload is what remains after the IP and
        // UDP headers (20 + 8 bytes, or 40 + 8; the capture queues no v6 extension
        // headers and v4 options are not used by UDP senders in practice).
        let header = if e.tuple.0.is_ipv6() { 48 } else { 28 };
        let payload = |(packets, bytes): (u64, u64)| bytes.saturating_sub(packets * header);
        r.datagrams_sent = Some(e.original.0);
        r.datagrams_received = Some(e.reply.0);
        r.bytes_sent = payload(e.original);
        r.bytes_received = payload(e.reply);
        r.duration_ms = started.elapsed().as_millis() as u64;
        r.data_path = Some("kernel".into());
        // Deleted by userspace: the enforcer's re-decision on a new snapshot (or an
        // operator's `conntrack -D`); otherwise the kernel's UDP timeout.
        r.close_reason = if e.by_userspace {
            CloseReason::Policy
        } else {
            CloseReason::Idle
        };
        Some(r)
    }

    /// Every waiting record, without counters (the events stopped).
    fn drain(&self) -> Vec<FlowRecord> {
        self.waiting
            .lock()
            .expect("lock poisoned")
            .drain()
            .map(|(_, (r, _))| r)
            .collect()
    }
}

/// The end of a tracked UDP flow, from one line of `conntrack -E -e DESTROY -o
/// extended`: its original tuple, packets and bytes each way (zero without accounting),
/// and whether userspace deleted it.
#[derive(Debug, PartialEq)]
struct Ended {
    tuple: Tuple,
    original: (u64, u64),
    reply: (u64, u64),
    by_userspace: bool,
}

/// Parses one event line (`[DESTROY] ipv4 2 udp 17 src=… dst=… sport=… dport=…
/// packets=… bytes=… src=… …`); the first of each key is the original direction, the
/// second the reply. Anything else (other events, other protocols) is None.
fn parse_destroy(line: &str) -> Option<Ended> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.first() != Some(&"[DESTROY]") || !words.contains(&"udp") {
        return None;
    }
    let all = |key: &str| -> Vec<&str> {
        words
            .iter()
            .filter_map(|w| w.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
            .collect()
    };
    let (src, dst, sport, dport) = (all("src"), all("dst"), all("sport"), all("dport"));
    let (packets, bytes) = (all("packets"), all("bytes"));
    let count = |v: &Vec<&str>, i: usize| v.get(i).and_then(|s| s.parse().ok()).unwrap_or(0);
    Some(Ended {
        tuple: (
            src.first()?.parse().ok()?,
            sport.first()?.parse().ok()?,
            dst.first()?.parse().ok()?,
            dport.first()?.parse().ok()?,
        ),
        original: (count(&packets, 0), count(&bytes, 0)),
        reply: (count(&packets, 1), count(&bytes, 1)),
        by_userspace: words.contains(&"[USERSPACE]"),
    })
}

/// Follows the ends of tracked UDP flows on a thread of its own (`conntrack -E`, which
/// dies with that thread) and records the waiting sessions among them. When the
/// stream cannot start or stops, waiting sessions are recorded without counters and
/// later ones when they are accepted.
fn follow_ends(shared: Arc<Shared>, carried: Arc<Carried>) {
    let spawned = std::thread::Builder::new()
        .name("segmesh-conntrack".into())
        .spawn(move || {
            let mut cmd = std::process::Command::new("conntrack");
            cmd.args(["-E", "-e", "DESTROY", "-p", "udp", "-o", "extended"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null());
            let mut child = match crate::child::spawn_bound_to_thread(&mut cmd) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot follow conntrack events (conntrack -E): inbound UDP sessions are recorded without byte counts");
                    return;
                }
            };
            let Some(out) = child.stdout.take() else {
                return;
            };
            carried.live.store(true, Ordering::Relaxed);
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(r) = parse_destroy(&line).and_then(|e| carried.ended(&e)) {
                    shared.record(r);
                }
            }
            carried.live.store(false, Ordering::Relaxed);
            tracing::warn!("conntrack events ended: inbound UDP sessions are recorded without byte counts");
            for r in carried.drain() {
                shared.record(r);
            }
            let _ = child.kill();
            let _ = child.wait();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the conntrack events thread");
    }
}

/// The ports of a UDP datagram (source, destination). The transport header follows the
/// IPv4 header (IHL words), or the fixed IPv6 header when no extension header precedes
/// it (the capture rules queue only UDP and echo, which carry none in practice;
/// anything else is refused).
fn udp_ports(packet: &[u8]) -> Option<(u16, u16)> {
    let l4 = match packet.first()? >> 4 {
        4 if *packet.get(9)? == 17 => usize::from(packet[0] & 0x0f) * 4,
        6 if *packet.get(6)? == 17 => 40,
        _ => return None,
    };
    let p = packet.get(l4..l4 + 4)?;
    Some((
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
    ))
}

/// What a queued packet asks for: ICMP echo, or a UDP datagram to this port.
fn kind(packet: &[u8]) -> Option<FlowPort> {
    let proto = match packet.first()? >> 4 {
        4 => *packet.get(9)?,
        6 => *packet.get(6)?,
        _ => return None,
    };
    match proto {
        1 | 58 => Some(FlowPort::ICMP_ECHO),
        17 => udp_ports(packet).map(|(_, d)| FlowPort::udp(d)),
        _ => None,
    }
}

/// What the queue thread remembers between packets.
struct Memory {
    /// When a decision was last recorded, per direction, peer, port and verdict.
    last: HashMap<(bool, IpAddr, FlowPort, bool), Instant>,
    carried: Arc<Carried>,
}

/// Decides one queued packet from `src` (port `sport`, for UDP) to `dst` on `port`;
/// `incoming`: it arrived for our PU. Returns whether it may pass. Records as
/// [`RECORD_EVERY`] allows; an accepted UDP session when it ends.
fn decide(
    shared: &Arc<Shared>,
    (src, sport): (IpAddr, u16),
    dst: IpAddr,
    port: FlowPort,
    incoming: bool,
    memory: &mut Memory,
) -> bool {
    let last = &mut memory.last;
    let snap = shared.snapshot();
    if snap.is_fail_closed() {
        return false;
    }
    let (dir, peer_ip) = if incoming {
        (Direction::Incoming, src.to_canonical())
    } else {
        (Direction::Outgoing, dst.to_canonical())
    };
    let udp = port.protocol == segmesh_policy::Protocol::Udp;
    let mut flow = Flow::new(dir, (src, sport).into(), (dst, port.port).into());
    let own = if incoming {
        &mut flow.destination
    } else {
        &mut flow.source
    };
    own.pu = Some(snap.pu_qualified());
    let peer_end = if incoming {
        &mut flow.source
    } else {
        &mut flow.destination
    };
    let peer = match snap.registry.get(&peer_ip) {
        // UDP from a PU's address must come through the tunnel, with its certificate.
        Some(r) if udp => {
            peer_end.pu = Some(r.qualified());
            if last
                .get(&(incoming, peer_ip, port, false))
                .is_none_or(|t| t.elapsed() >= RECORD_EVERY)
            {
                last.insert((incoming, peer_ip, port, false), Instant::now());
                let mut rec = Recorder::new(shared, snap.clone(), flow);
                rec.datagrams = Some((1, 0));
                rec.refuse(segmesh_api::FlowReason::RegisteredPu, None);
            }
            return false;
        }
        Some(r) => {
            peer_end.pu = Some(r.qualified());
            let tags = crate::mesh::automatic_tags(&r.name, &r.namespace);
            PreparedPeer::Pu(snap.engine.id_set(&tags))
        }
        None => {
            let names = if incoming {
                Vec::new()
            } else {
                shared.names.names(peer_ip, std::time::Instant::now())
            };
            let (ids, domain) = snap.resolve(peer_ip, &names, port);
            peer_end.external = ids
                .iter()
                .map(|&i| {
                    let e = &snap.engine.set().externals()[i as usize];
                    format!("{}:{}", e.namespace, e.name)
                })
                .collect();
            peer_end.domain = domain;
            PreparedPeer::Networks(ids)
        }
    };
    let d = snap.engine.decide(dir, &snap.prepared, &peer, port);
    let allow = d.verdict == Verdict::Allow;
    let wanted = !allow || d.log || shared.settings.log_all_flows;
    if udp && allow {
        // Each accepted session is one record, made when the kernel's flow ends.
        if wanted {
            let mut rec = Recorder::new(shared, snap.clone(), flow);
            rec.datagrams = Some((1, 0));
            rec.decided(d);
            if let Some(r) = memory
                .carried
                .wait((src, sport, dst, port.port), rec.carried())
            {
                shared.record(r);
            }
        }
        return true;
    }
    // Per verdict too: a verdict that changed (a new snapshot) is recorded at once.
    let due = last
        .get(&(incoming, peer_ip, port, allow))
        .is_none_or(|t| t.elapsed() >= RECORD_EVERY);
    if due && wanted {
        last.insert((incoming, peer_ip, port, allow), Instant::now());
        let mut rec = Recorder::new(shared, snap.clone(), flow);
        if udp {
            rec.datagrams = Some((1, 0));
        } else {
            rec.protocol = Some("icmp");
        }
        let reason = reason_of(&d);
        rec.decided(d);
        if allow {
            rec.ended_unrelayed(segmesh_api::CloseReason::Closed);
        } else {
            rec.refuse(reason, None);
        }
    }
    allow
}

/// Makes every inbound UDP session decide again: deletes the kernel's tracked UDP flows
/// addressed to this namespace's addresses (`conntrack -D`, from conntrack-tools), so
/// that each session's next datagram is new again and comes to the queue, where the
/// snapshot of now decides it. Runs on a thread of its own; a failure is logged once.
pub(crate) fn redecide_inbound_udp() {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return;
    };
    let ips: Vec<IpAddr> = addrs
        .filter_map(|a| {
            let a = a.address?;
            a.as_sockaddr_in()
                .map(|s| IpAddr::from(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::from(s.ip())))
        })
        .filter(|ip| !ip.is_loopback())
        .collect();
    std::thread::spawn(move || {
        for ip in ips {
            let family = if ip.is_ipv6() { "ipv6" } else { "ipv4" };
            let out = std::process::Command::new("conntrack")
                .args([
                    "-D",
                    "-f",
                    family,
                    "-p",
                    "udp",
                    "--orig-dst",
                    &ip.to_string(),
                ])
                .output();
            // Exit 1 with "0 flow entries" is the normal case of nothing to delete.
            let failed = match &out {
                Ok(o) => {
                    !o.status.success()
                        && !String::from_utf8_lossy(&o.stderr).contains("0 flow entries")
                }
                Err(_) => true,
            };
            if failed && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    ?out,
                    "cannot make inbound UDP sessions decide again (conntrack -D): they keep their earlier decision until idle"
                );
            }
        }
    });
}

/// Reads queue `num` on a thread of its own until the queue fails (the process ends
/// with it otherwise). Without the queue bound nothing is lost: unread requests are
/// dropped by the kernel.
pub(crate) fn start(shared: Arc<Shared>, num: u16) -> std::io::Result<()> {
    let mut q = nfq::Queue::open()?;
    q.bind(num)?;
    // Only the headers are needed.
    q.set_copy_range(num, 64)?;
    let carried = Arc::new(Carried::new(shared.settings.limits.max_udp_sessions));
    follow_ends(shared.clone(), carried.clone());
    std::thread::Builder::new()
        .name("segmesh-echo".into())
        .spawn(move || {
            let mut memory = Memory {
                last: HashMap::new(),
                carried,
            };
            loop {
                let mut msg = match q.recv() {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "echo queue: no more decisions (requests are dropped)");
                        return;
                    }
                };
                let incoming = msg.get_hook() == NF_INET_LOCAL_IN;
                let packet = msg.get_payload();
                let sport = udp_ports(packet).map_or(0, |(s, _)| s);
                let allow = match (addresses(packet), kind(packet)) {
                    (Some((s, d)), Some(port)) => {
                        decide(&shared, (s, sport), d, port, incoming, &mut memory)
                    }
                    _ => false,
                };
                msg.set_verdict(if allow {
                    nfq::Verdict::Accept
                } else {
                    nfq::Verdict::Drop
                });
                if let Err(e) = q.verdict(msg) {
                    tracing::debug!(error = %e, "echo verdict");
                }
                if memory.last.len() > 4096 {
                    memory.last.retain(|_, t| t.elapsed() < RECORD_EVERY);
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_addresses() {
        let mut v4 = vec![0x45u8; 20];
        v4[12..16].copy_from_slice(&[10, 0, 0, 1]);
        v4[16..20].copy_from_slice(&[10, 0, 0, 2]);
        assert_eq!(
            addresses(&v4),
            Some(("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()))
        );
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[8..24].copy_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6[24..40].copy_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert_eq!(
            addresses(&v6),
            Some(("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap()))
        );
        assert_eq!(addresses(&v4[..19]), None);
        // Protocol 1 (ICMP), then UDP to port 53 after a 20-byte header.
        v4[9] = 1;
        assert_eq!(kind(&v4), Some(FlowPort::ICMP_ECHO));
        v4[9] = 17;
        v4.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
        assert_eq!(kind(&v4), Some(FlowPort::udp(53)));
        v6[6] = 17;
        v6.extend_from_slice(&[0x9c, 0x40, 0x1f, 0x40, 0, 8, 0, 0]);
        assert_eq!(kind(&v6), Some(FlowPort::udp(8000)));
        v6[6] = 6;
        assert_eq!(kind(&v6), None);
        assert_eq!(addresses(&[0x70; 40]), None);
        assert_eq!(addresses(&[]), None);
        assert_eq!(udp_ports(&v4), Some((40000, 53)));
    }

    #[test]
    fn destroy_events() {
        let v4 = "[DESTROY] ipv4     2 udp      17 29 src=10.0.0.1 dst=10.0.0.2 sport=40000 dport=7000 packets=3 bytes=99 src=10.0.0.2 dst=10.0.0.1 sport=7000 dport=40000 packets=2 bytes=60";
        assert_eq!(
            parse_destroy(v4),
            Some(Ended {
                tuple: (
                    "10.0.0.1".parse().unwrap(),
                    40000,
                    "10.0.0.2".parse().unwrap(),
                    7000
                ),
                original: (3, 99),
                reply: (2, 60),
                by_userspace: false,
            })
        );
        let v6 = "[DESTROY] ipv6     10 udp      17 28 src=fd00::1 dst=fd00::2 sport=51415 dport=9999 packets=1 bytes=51 [UNREPLIED] src=fd00::2 dst=fd00::1 sport=9999 dport=51415 packets=0 bytes=0 [USERSPACE] portid=3186617529";
        let e = parse_destroy(v6).unwrap();
        assert!(e.by_userspace);
        assert_eq!(e.reply, (0, 0));
        // Without accounting there are no counters: zero.
        let bare = "[DESTROY] ipv4 2 udp 17 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2 src=10.0.0.2 dst=10.0.0.1 sport=2 dport=1";
        assert_eq!(parse_destroy(bare).unwrap().original, (0, 0));
        // Not ours: other events, other protocols, noise.
        assert_eq!(parse_destroy(&v4.replace("[DESTROY]", "[NEW]")), None);
        assert_eq!(
            parse_destroy("[DESTROY] ipv4 2 tcp 6 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2"),
            None
        );
        assert_eq!(parse_destroy("conntrack v1.4.7: 2 flow events"), None);
        assert_eq!(parse_destroy("[DESTROY] ipv4 2 udp 17 src=x"), None);
    }

    fn record() -> FlowRecord {
        serde_json::from_value(serde_json::json!({
            "time": "2026-11-30T00:00:00Z", "direction": "incoming",
            "source": {"ip": "fd00::1", "port": 51415}, "destination": {"ip": "fd00::2", "port": 9999},
            "verdict": "allow", "reason": "policy", "policies": [], "encrypt": false,
            "bytes_sent": 0, "bytes_received": 0, "duration_ms": 0, "close_reason": "closed",
        }))
        .unwrap()
    }

    /// A waiting session is completed with the kernel's counters, payload only; with no
    /// events, or a full table, it is given back to be recorded at once.
    #[test]
    fn carried_sessions_wait_for_their_end() {
        let c = Carried::new(1);
        let e = parse_destroy("[DESTROY] ipv6 10 udp 17 src=fd00::1 dst=fd00::2 sport=51415 dport=9999 packets=2 bytes=106 src=fd00::2 dst=fd00::1 sport=9999 dport=51415 packets=1 bytes=53").unwrap();
        assert!(c.wait(e.tuple, record()).is_some(), "no events: at once");
        c.live.store(true, Ordering::Relaxed);
        assert!(c.wait(e.tuple, record()).is_none());
        let other = (
            "10.0.0.1".parse().unwrap(),
            1,
            "10.0.0.2".parse().unwrap(),
            2,
        );
        assert!(c.wait(other, record()).is_some(), "the table is full");
        let r = c.ended(&e).unwrap();
        assert_eq!((r.datagrams_sent, r.datagrams_received), (Some(2), Some(1)));
        assert_eq!((r.bytes_sent, r.bytes_received), (10, 5));
        assert_eq!(r.close_reason, CloseReason::Idle);
        assert_eq!(c.ended(&e), None, "recorded once");
        assert!(c.wait(e.tuple, record()).is_none());
        assert_eq!(c.drain().len(), 1);
    }
}
