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
//! Accepted packets go on, refused ones are dropped. A decision is recorded once per
//! peer, direction, port and verdict every [`RECORD_EVERY`] (a flood does not flood the flow log).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// What a queued packet asks for: ICMP echo, or a UDP datagram to this port.
fn kind(packet: &[u8]) -> Option<FlowPort> {
    // The transport header: after the IPv4 header (IHL words), or after the fixed IPv6
    // header when no extension header precedes it (the capture rules queue only UDP and
    // echo, which carry none in practice; anything else is refused).
    let (proto, l4) = match packet.first()? >> 4 {
        4 => (*packet.get(9)?, usize::from(packet[0] & 0x0f) * 4),
        6 => (*packet.get(6)?, 40),
        _ => return None,
    };
    match proto {
        1 | 58 => Some(FlowPort::ICMP_ECHO),
        17 => {
            let p = packet.get(l4 + 2..l4 + 4)?;
            Some(FlowPort::udp(u16::from_be_bytes([p[0], p[1]])))
        }
        _ => None,
    }
}

/// Decides one queued packet from `src` to `dst` on `port`; `incoming`: it arrived for
/// our PU. Returns whether it may pass. Records as [`RECORD_EVERY`] allows.
fn decide(
    shared: &Arc<Shared>,
    src: IpAddr,
    dst: IpAddr,
    port: FlowPort,
    incoming: bool,
    last: &mut HashMap<(bool, IpAddr, FlowPort, bool), Instant>,
) -> bool {
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
    let mut flow = Flow::new(dir, (src, 0).into(), (dst, port.port).into());
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
    // Per verdict too: a verdict that changed (a new snapshot) is recorded at once.
    let due = last
        .get(&(incoming, peer_ip, port, allow))
        .is_none_or(|t| t.elapsed() >= RECORD_EVERY);
    let wanted = !allow || d.log || shared.settings.log_all_flows;
    if due && wanted {
        last.insert((incoming, peer_ip, port, allow), Instant::now());
        let mut rec = Recorder::new(shared, snap.clone(), flow);
        if udp {
            // The session's first datagram; the kernel carries the rest.
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
    std::thread::Builder::new()
        .name("segmesh-echo".into())
        .spawn(move || {
            let mut last = HashMap::new();
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
                let allow = match (addresses(packet), kind(packet)) {
                    (Some((s, d)), Some(port)) => decide(&shared, s, d, port, incoming, &mut last),
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
                if last.len() > 4096 {
                    last.retain(|_, t| t.elapsed() < RECORD_EVERY);
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
    }
}
