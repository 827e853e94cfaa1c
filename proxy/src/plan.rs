//! What to do with a captured connection, decided without any I/O: refuse it (and why),
//! send it through the mesh tunnel to the PU registered at its destination (decided
//! there, on that PU's certificate), or forward it to an address outside the mesh
//! (decided here, against the external networks the address falls in).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use segmesh_api::FlowReason;
use segmesh_policy::{Decision, Direction, FlowPort, PreparedPeer, Protocol, Verdict};

use crate::config::Listeners;
use crate::flow::reason_of;
use crate::snapshot::{RegisteredPu, ServiceTarget, Snapshot};

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Refuse at once (RST to the application) and record why, with the decision when
    /// one was made.
    Refuse {
        reason: FlowReason,
        decision: Option<Decision>,
    },
    /// PU → PU through the mesh tunnel (outbound only).
    Tunnel(RegisteredPu),
    /// Allowed to or from an address outside the mesh: connect and relay.
    Forward(Decision),
    /// To a Service's address and port: one of its endpoints, each decided as a flow
    /// of its own (outbound only).
    Service(ToService),
}

/// A Service's port (compared by identity: one per snapshot).
#[derive(Debug, Clone)]
pub(crate) struct ToService(pub Arc<ServiceTarget>);

impl PartialEq for ToService {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ToService {}

/// A plan and what the flow record learns from it about the other end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Planned {
    pub plan: Plan,
    /// `<namespace>:<name>` of the PU registered at the other end's address.
    pub peer_pu: Option<String>,
    /// The external networks (`<namespace>:<name>`) the other end's address fell in.
    pub networks: Vec<String>,
    /// The name our PU resolved to the address that matched a domain entry.
    pub domain: Option<String>,
    /// The names the decision considered (what our PU resolved to the address): an open
    /// flow is re-decided with them.
    pub names: Vec<String>,
    /// `<namespace>:<name>` of the Service the connection was addressed to.
    pub service: Option<String>,
}

impl Planned {
    fn refuse(reason: FlowReason) -> Planned {
        Planned {
            plan: Plan::Refuse {
                reason,
                decision: None,
            },
            peer_pu: None,
            networks: Vec::new(),
            domain: None,
            names: Vec::new(),
            service: None,
        }
    }

    /// Whether a policy decision was made (it is timed by the caller).
    pub fn decided(&self) -> bool {
        matches!(
            self.plan,
            Plan::Forward(_)
                | Plan::Refuse {
                    decision: Some(_),
                    ..
                }
        )
    }
}

/// A connection our PU opened to `target` (its original destination); `names`: what our
/// PU resolved to that address.
pub(crate) fn outbound(
    snap: &Snapshot,
    listeners: &Listeners,
    target: SocketAddr,
    names: &[String],
) -> Planned {
    let ip = target.ip().to_canonical();
    if snap.is_fail_closed() {
        return Planned::refuse(FlowReason::NoSnapshot);
    }
    let own = ip.is_loopback() || listeners.address == Some(ip);
    if own && target.port() == listeners.outbound {
        return Planned::refuse(FlowReason::Loop);
    }
    if let Some(s) = snap.services.get(&(ip, Protocol::Tcp, target.port())) {
        return to_service(s);
    }
    if let Some(r) = snap.registry.get(&ip) {
        return Planned {
            peer_pu: Some(r.qualified()),
            plan: Plan::Tunnel(r.clone()),
            networks: Vec::new(),
            domain: None,
            names: Vec::new(),
            service: None,
        };
    }
    external(snap, Direction::Outgoing, ip, target.port(), names)
}

/// To a Service: refused at once when it has no endpoint.
fn to_service(s: &Arc<ServiceTarget>) -> Planned {
    let plan = if s.endpoints.is_empty() {
        Plan::Refuse {
            reason: FlowReason::NoEndpoint,
            decision: None,
        }
    } else {
        Plan::Service(ToService(s.clone()))
    };
    Planned {
        plan,
        service: Some(s.name.clone()),
        ..Planned::refuse(FlowReason::NoEndpoint)
    }
}

/// A plain connection from `peer` to our PU at `target` (captured inbound); `local`:
/// whether `target`'s address is one of ours.
pub(crate) fn inbound(
    snap: &Snapshot,
    listeners: &Listeners,
    peer: SocketAddr,
    target: SocketAddr,
    local: bool,
) -> Planned {
    let ip = peer.ip().to_canonical();
    if !local {
        // Never a relay: only connections for our own addresses are ours to decide.
        return Planned::refuse(FlowReason::NotLocal);
    }
    if snap.is_fail_closed() {
        return Planned::refuse(FlowReason::NoSnapshot);
    }
    if target.port() == listeners.inbound {
        return Planned::refuse(FlowReason::Loop);
    }
    if let Some(r) = snap.registry.get(&ip) {
        // A registered PU must come through the tunnel with its certificate.
        return Planned {
            peer_pu: Some(r.qualified()),
            ..Planned::refuse(FlowReason::RegisteredPu)
        };
    }
    external(snap, Direction::Incoming, ip, target.port(), &[])
}

/// The first datagram of a UDP session our PU sends to `target`.
pub(crate) fn outbound_udp(snap: &Snapshot, target: SocketAddr, names: &[String]) -> Planned {
    let ip = target.ip().to_canonical();
    if snap.is_fail_closed() {
        return Planned::refuse(FlowReason::NoSnapshot);
    }
    if let Some(s) = snap.services.get(&(ip, Protocol::Udp, target.port())) {
        return to_service(s);
    }
    if let Some(r) = snap.registry.get(&ip) {
        // PU to PU: through the mesh tunnel, decided at both ends on certificates.
        return Planned {
            peer_pu: Some(r.qualified()),
            plan: Plan::Tunnel(r.clone()),
            networks: Vec::new(),
            domain: None,
            names: Vec::new(),
            service: None,
        };
    }
    external(
        snap,
        Direction::Outgoing,
        ip,
        FlowPort::udp(target.port()),
        names,
    )
}

/// Decides against the external networks the peer address (or a name our PU resolved
/// to it) falls in.
pub(crate) fn external(
    snap: &Snapshot,
    dir: Direction,
    ip: IpAddr,
    port: impl Into<FlowPort>,
    names: &[String],
) -> Planned {
    let port = port.into();
    let (ids, domain) = snap.resolve(ip, names, port);
    let networks = ids
        .iter()
        .map(|&i| {
            let e = &snap.engine.set().externals()[i as usize];
            format!("{}:{}", e.namespace, e.name)
        })
        .collect();
    let d = snap
        .engine
        .decide(dir, &snap.prepared, &PreparedPeer::Networks(ids), port);
    let plan = match d.verdict {
        Verdict::Reject => Plan::Refuse {
            reason: reason_of(&d),
            decision: Some(d),
        },
        Verdict::Allow => Plan::Forward(d),
    };
    Planned {
        plan,
        peer_pu: None,
        networks,
        // Said only when a name made the difference to the networks.
        domain,
        names: names.to_vec(),
        service: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use segmesh_policy::Source;

    const POLICIES: &str = r#"
kind: Namespace
name: /acme
---
kind: Namespace
name: /acme/lab
discovery: true
---
kind: ExternalNetwork
name: partner
namespace: /acme
entries: [203.0.113.0/24]
ports: [tcp/443]
---
kind: ExternalNetwork
name: office
namespace: /acme
entries: [198.51.100.0/24, "2001:db8:1::/48"]
---
kind: ExternalNetwork
name: blocked
namespace: /acme
entries: [203.0.113.66]
---
kind: ExternalNetwork
name: examples
namespace: /acme
entries: ["*.example.test"]
ports: [tcp/443]
---
kind: NetworkPolicy
name: web-to-examples
namespace: /acme
action: Allow
mode: Outgoing
subject: [[app=web]]
object: [[ext:name=examples]]
---
kind: NetworkPolicy
name: web-to-partner
namespace: /acme
action: Allow
mode: Outgoing
subject: [[app=web]]
object: [[ext:name=partner]]
ports: [tcp/443]
---
kind: NetworkPolicy
name: never-blocked
namespace: /acme
action: Reject
mode: Outgoing
subject: [[app=web]]
object: [[ext:name=blocked]]
---
kind: NetworkPolicy
name: office-to-web
namespace: /acme
action: Allow
mode: Incoming
subject: [[ext:name=office]]
object: [[app=web]]
ports: [tcp/8080]
"#;

    fn snapshot(namespace: &str) -> Snapshot {
        let loaded = segmesh_policy::load(&[Source {
            name: "plan.yaml",
            text: POLICIES,
        }])
        .unwrap();
        let wire = segmesh_api::Snapshot {
            revision: 1,
            version: 1,
            policies: loaded.set.policies().to_vec(),
            externals: loaded.set.externals().to_vec(),
            namespaces: loaded.set.namespaces().cloned().collect(),
            registry: vec![segmesh_api::RegistryEntry {
                name: "api".into(),
                namespace: "/acme".into(),
                ips: vec!["10.0.0.3".parse().unwrap(), "fd00::3".parse().unwrap()],
            }],
            services: vec![
                segmesh_api::ServiceEntry {
                    name: "/acme:api".into(),
                    addresses: vec!["10.96.0.3".parse().unwrap()],
                    ports: vec![segmesh_policy::ServicePort {
                        protocol: Protocol::Tcp,
                        port: 80,
                        target: 8080,
                    }],
                    endpoints: vec![segmesh_api::ServiceEndpoint {
                        ip: "10.0.0.3".parse().unwrap(),
                        pu: Some("/acme:api".into()),
                    }],
                },
                segmesh_api::ServiceEntry {
                    name: "/acme:none".into(),
                    addresses: vec!["10.96.0.4".parse().unwrap()],
                    ports: vec![segmesh_policy::ServicePort {
                        protocol: Protocol::Udp,
                        port: 53,
                        target: 53,
                    }],
                    endpoints: Vec::new(),
                },
            ],
        };
        Snapshot::from_console("web", namespace, &["app=web".into()], &wire, None, "test").unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The plan's kind and reason, for compact tables.
    fn summary(p: &Planned) -> (&'static str, Option<FlowReason>) {
        match &p.plan {
            Plan::Refuse { reason, .. } => ("refuse", Some(reason.clone())),
            Plan::Tunnel(_) => ("tunnel", None),
            Plan::Forward(d) => ("forward", Some(reason_of(d))),
            Plan::Service(_) => ("service", None),
        }
    }

    /// A Service's address and port (and protocol) lead to the Service; another port of
    /// that address, or the other protocol, is an ordinary destination.
    #[test]
    fn services_by_address_port_and_protocol() {
        let snap = snapshot("/acme");
        let listeners = Listeners::default();
        let p = outbound(&snap, &listeners, sa("10.96.0.3:80"), &[]);
        assert_eq!(summary(&p), ("service", None));
        assert_eq!(p.service.as_deref(), Some("/acme:api"));
        let Plan::Service(s) = &p.plan else {
            unreachable!("checked above")
        };
        assert_eq!(s.0.target, 8080);
        assert_eq!(
            summary(&outbound(&snap, &listeners, sa("10.96.0.3:81"), &[])),
            ("refuse", Some(FlowReason::Default))
        );
        assert_eq!(
            summary(&outbound_udp(&snap, sa("10.96.0.3:80"), &[])),
            ("refuse", Some(FlowReason::Default))
        );
        let none = outbound_udp(&snap, sa("10.96.0.4:53"), &[]);
        assert_eq!(summary(&none), ("refuse", Some(FlowReason::NoEndpoint)));
        assert_eq!(none.service.as_deref(), Some("/acme:none"));
        // Round robin over connections: each starts at the next endpoint and goes on
        // with the others in turn.
        let ep = |i: u8| crate::snapshot::Endpoint {
            ip: std::net::IpAddr::from([10, 0, 0, i]),
            pu: None,
        };
        let three = ServiceTarget::new("/acme:x".into(), 80, vec![ep(1), ep(2), ep(3)]);
        let firsts: Vec<_> = (0..4).map(|_| three.order()).collect();
        assert_eq!(firsts[0], vec![ep(1), ep(2), ep(3)]);
        assert_eq!(firsts[1], vec![ep(2), ep(3), ep(1)]);
        assert_eq!(firsts[2], vec![ep(3), ep(1), ep(2)]);
        assert_eq!(firsts[3], firsts[0]);
    }

    /// (destination, plan, reason, peer PU, external networks)
    type OutboundCase = (
        &'static str,
        &'static str,
        Option<FlowReason>,
        Option<&'static str>,
        &'static [&'static str],
    );

    #[test]
    fn outbound_table() {
        let snap = snapshot("/acme");
        let listeners = Listeners::default();
        let cases: &[OutboundCase] = &[
            // (destination, plan, reason, peer PU, external networks)
            ("10.0.0.3:8080", "tunnel", None, Some("/acme:api"), &[]),
            // The v6 address and the v4-mapped form of the v4 one are the same PU.
            ("[fd00::3]:8080", "tunnel", None, Some("/acme:api"), &[]),
            (
                "[::ffff:10.0.0.3]:8080",
                "tunnel",
                None,
                Some("/acme:api"),
                &[],
            ),
            (
                "203.0.113.9:443",
                "forward",
                Some(FlowReason::Policy),
                None,
                &["/acme:partner"],
            ),
            // The partner's network only covers 443: nothing matches 80.
            (
                "203.0.113.9:80",
                "refuse",
                Some(FlowReason::Default),
                None,
                &[],
            ),
            (
                "203.0.113.66:443",
                "refuse",
                Some(FlowReason::Policy),
                None,
                &["/acme:partner", "/acme:blocked"],
            ),
            (
                "192.0.2.1:443",
                "refuse",
                Some(FlowReason::Default),
                None,
                &[],
            ),
            (
                "127.0.0.1:15001",
                "refuse",
                Some(FlowReason::Loop),
                None,
                &[],
            ),
            ("[::1]:15001", "refuse", Some(FlowReason::Loop), None, &[]),
        ];
        for (dst, kind, reason, pu, nets) in cases {
            let p = outbound(&snap, &listeners, sa(dst), &[]);
            assert_eq!(summary(&p), (*kind, reason.clone()), "to {dst}");
            assert_eq!(p.peer_pu.as_deref(), *pu, "to {dst}");
            let mut got = p.networks.clone();
            let mut want: Vec<String> = nets.iter().map(|s| s.to_string()).collect();
            got.sort();
            want.sort();
            assert_eq!(got, want, "to {dst}");
        }
    }

    #[test]
    fn inbound_table() {
        let snap = snapshot("/acme");
        let listeners = Listeners::default();
        let cases: &[(&str, &str, &str, Option<FlowReason>)] = &[
            // (source, destination, plan, reason)
            (
                "198.51.100.7:40000",
                "10.0.0.2:8080",
                "forward",
                Some(FlowReason::Policy),
            ),
            (
                "[2001:db8:1::7]:40000",
                "[fd00::2]:8080",
                "forward",
                Some(FlowReason::Policy),
            ),
            // The office may reach 8080 only.
            (
                "198.51.100.7:40000",
                "10.0.0.2:22",
                "refuse",
                Some(FlowReason::Default),
            ),
            // A registered PU must use the tunnel, even where its address is allowed.
            (
                "10.0.0.3:40000",
                "10.0.0.2:8080",
                "refuse",
                Some(FlowReason::RegisteredPu),
            ),
            (
                "[::ffff:10.0.0.3]:40000",
                "10.0.0.2:8080",
                "refuse",
                Some(FlowReason::RegisteredPu),
            ),
            (
                "198.51.100.7:40000",
                "10.0.0.2:15006",
                "refuse",
                Some(FlowReason::Loop),
            ),
        ];
        for (src, dst, kind, reason) in cases {
            let p = inbound(&snap, &listeners, sa(src), sa(dst), true);
            assert_eq!(summary(&p), (*kind, reason.clone()), "{src} -> {dst}");
        }
        let from_pu = inbound(
            &snap,
            &listeners,
            sa("10.0.0.3:1"),
            sa("10.0.0.2:8080"),
            true,
        );
        assert_eq!(from_pu.peer_pu.as_deref(), Some("/acme:api"));
    }

    /// A connection for an address that is not ours is refused before anything else,
    /// even one a policy would allow and even without a snapshot: never a relay.
    #[test]
    fn inbound_for_another_address_is_refused() {
        let l = Listeners::default();
        for snap in [snapshot("/acme"), Snapshot::fail_closed()] {
            let p = inbound(
                &snap,
                &l,
                sa("198.51.100.7:1"),
                sa("192.0.2.80:8080"),
                false,
            );
            assert_eq!(summary(&p), ("refuse", Some(FlowReason::NotLocal)));
            assert!(!p.decided());
        }
    }

    /// A domain entry matches an address only through a name our PU resolved to it, and
    /// the plan says which name.
    #[test]
    fn domains_match_only_names_our_pu_resolved() {
        let snap = snapshot("/acme");
        let l = Listeners::default();
        let to = sa("192.0.2.44:443");
        let never = outbound(&snap, &l, to, &[]);
        assert_eq!(summary(&never), ("refuse", Some(FlowReason::Default)));
        let outside = outbound(&snap, &l, to, &["b.other.test".into()]);
        assert_eq!(summary(&outside), ("refuse", Some(FlowReason::Default)));
        assert_eq!(outside.domain, None);
        let names = ["b.other.test".to_owned(), "a.example.test".to_owned()];
        let resolved = outbound(&snap, &l, to, &names);
        assert_eq!(summary(&resolved), ("forward", Some(FlowReason::Policy)));
        assert_eq!(resolved.domain.as_deref(), Some("a.example.test"));
        assert_eq!(resolved.networks, ["/acme:examples"]);
        // One label only: `*.example.test` does not cover a.b.example.test.
        let deep = outbound(&snap, &l, to, &["a.b.example.test".into()]);
        assert_eq!(summary(&deep), ("refuse", Some(FlowReason::Default)));
        // The entry's ports still hold.
        let other_port = outbound(&snap, &l, sa("192.0.2.44:80"), &names);
        assert_eq!(summary(&other_port), ("refuse", Some(FlowReason::Default)));
    }

    /// UDP is decided on `udp/N` ports; to a PU it goes through the tunnel.
    #[test]
    fn udp_table() {
        let snap = snapshot("/acme");
        // Only tcp/443 is allowed to the partner: UDP 443 is not.
        let p = outbound_udp(&snap, sa("203.0.113.9:443"), &[]);
        assert_eq!(summary(&p), ("refuse", Some(FlowReason::Default)));
        let p = outbound_udp(&snap, sa("10.0.0.3:53"), &[]);
        assert_eq!(summary(&p), ("tunnel", None));
        assert_eq!(p.peer_pu.as_deref(), Some("/acme:api"));
        let p = outbound_udp(&Snapshot::fail_closed(), sa("192.0.2.1:53"), &[]);
        assert_eq!(summary(&p), ("refuse", Some(FlowReason::NoSnapshot)));
        let lab = snapshot("/acme/lab");
        let p = outbound_udp(&lab, sa("192.0.2.1:53"), &[]);
        assert_eq!(summary(&p), ("forward", Some(FlowReason::Discovered)));
    }

    #[test]
    fn fail_closed_refuses_everything() {
        let snap = Snapshot::fail_closed();
        let l = Listeners::default();
        for p in [
            outbound(&snap, &l, sa("203.0.113.9:443"), &[]),
            outbound(&snap, &l, sa("127.0.0.1:15001"), &[]),
            inbound(&snap, &l, sa("198.51.100.7:1"), sa("10.0.0.2:8080"), true),
        ] {
            assert_eq!(summary(&p), ("refuse", Some(FlowReason::NoSnapshot)));
            assert!(!p.decided());
        }
    }

    #[test]
    fn discovery_allows_and_says_so() {
        let snap = snapshot("/acme/lab");
        let p = outbound(&snap, &Listeners::default(), sa("192.0.2.1:443"), &[]);
        assert_eq!(summary(&p), ("forward", Some(FlowReason::Discovered)));
        assert!(p.decided());
    }

    #[test]
    fn a_listen_address_is_our_own_for_loops() {
        let l = Listeners {
            address: Some("10.0.0.9".parse().unwrap()),
            ..Listeners::default()
        };
        let snap = snapshot("/acme");
        let p = outbound(&snap, &l, sa("10.0.0.9:15001"), &[]);
        assert_eq!(summary(&p), ("refuse", Some(FlowReason::Loop)));
    }
}
