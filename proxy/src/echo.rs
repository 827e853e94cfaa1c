//! ICMP echo requests, queued to the enforcer by the capture rules (NFQUEUE): each
//! request is decided on the `icmp` port of the policies — to or from an external
//! network by its address (and the names our PU resolved to it), to or from a PU by what
//! the registry proves without a certificate (its name and namespace: ICMP carries no
//! identity). Allowed requests are accepted and their replies pass as tracked flows;
//! refused ones are dropped. A decision is recorded once per peer and direction every
//! [`RECORD_EVERY`] (a ping flood does not flood the flow log).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use segmesh_policy::{Direction, FlowPort, PreparedPeer, Tag, TagSet, Verdict};

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

/// Decides one echo request from `src` to `dst`; `incoming`: it arrived for our PU.
/// Returns whether it may pass. Records as [`RECORD_EVERY`] allows.
fn decide(
    shared: &Arc<Shared>,
    src: IpAddr,
    dst: IpAddr,
    incoming: bool,
    last: &mut HashMap<(bool, IpAddr), Instant>,
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
    let mut flow = Flow::new(dir, (src, 0).into(), (dst, 0).into());
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
    let port = FlowPort::ICMP_ECHO;
    let peer = match snap.registry.get(&peer_ip) {
        Some(r) => {
            peer_end.pu = Some(r.qualified());
            let mut tags = TagSet::new();
            for (k, v) in [
                ("$identity", "processingunit"),
                ("$name", r.name.as_str()),
                ("$namespace", r.namespace.as_str()),
            ] {
                if let Ok(t) = Tag::new(k, v) {
                    tags.insert(t);
                }
            }
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
    let due = last
        .get(&(incoming, peer_ip))
        .is_none_or(|t| t.elapsed() >= RECORD_EVERY);
    let wanted = !allow || d.log || shared.settings.log_all_flows;
    if due && wanted {
        last.insert((incoming, peer_ip), Instant::now());
        let mut rec = Recorder::new(shared, snap.clone(), flow);
        rec.protocol = Some("icmp");
        let reason = reason_of(&d);
        rec.decided(d);
        if allow {
            rec.unreachable(segmesh_api::CloseReason::Closed);
        } else {
            rec.refuse(reason, None);
        }
    }
    allow
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
                let allow = addresses(msg.get_payload())
                    .is_some_and(|(s, d)| decide(&shared, s, d, incoming, &mut last));
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
        assert_eq!(addresses(&[0x70; 40]), None);
        assert_eq!(addresses(&[]), None);
    }
}
