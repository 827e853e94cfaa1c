//! Property test: the compiled engine and the naive reference evaluator agree on random
//! policy sets and flows, including address resolution against external networks.

use proptest::prelude::*;
use segmesh_policy::network::{Address, Entry, ExternalNetwork};
use segmesh_policy::ports::{FlowPort, PortRange, PortSpec, Ports, Protocol};
use segmesh_policy::{
    Action, Direction, Engine, Mode, Namespace, NamespacePath, NetworkPolicy, Peer, PolicySet,
    PreparedPeer, Pu, Selector, TagPattern, TagSet, Tier, naive,
};

const NAMESPACES: &[&str] = &["/", "/x", "/x/y", "/x/y/z", "/w"];
const PATTERNS: &[&str] = &[
    "a=1",
    "a=2",
    "a=*",
    "b=1",
    "b=2",
    "b=*",
    "c=1",
    "c=*",
    "$identity=processingunit",
    "$identity=externalnetwork",
    "ext:name=n0",
    "ext:name=n1",
    "zone=z",
    "$namespace=/x",
    "$namespace=/x/y",
    "$namespace=*",
];
const TAGS: &[&str] = &["a=1", "a=2", "a=3", "b=1", "b=2", "c=1", "zone=z", "d=9"];
const ENTRIES: &[&str] = &[
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3",
    "0.0.0.0/0",
    "::/0",
    "fd00::/8",
    "fd00::1",
    "a.example.com",
    "*.example.com",
];
const IPS: &[&str] = &[
    "10.1.2.3",
    "10.1.9.9",
    "10.200.0.1",
    "192.0.2.1",
    "fd00::1",
    "fd00::2",
    "2001:db8::1",
    "::ffff:10.1.2.3",
];
const DOMAINS: &[&str] = &[
    "a.example.com",
    "b.example.com",
    "x.y.example.com",
    "example.com",
];

fn ns() -> impl Strategy<Value = NamespacePath> {
    prop::sample::select(NAMESPACES).prop_map(|s| s.parse().unwrap())
}

fn selector() -> impl Strategy<Value = Selector> {
    prop::collection::vec(
        prop::collection::vec(prop::sample::select(PATTERNS), 1..3),
        1..3,
    )
    .prop_map(|cs| {
        Selector(
            cs.into_iter()
                .map(|c| {
                    c.into_iter()
                        .map(|p| p.parse::<TagPattern>().unwrap())
                        .collect()
                })
                .collect(),
        )
    })
}

fn ports() -> impl Strategy<Value = Ports> {
    prop_oneof![
        Just(Ports::Any),
        prop::collection::vec((protocol(), 1u16..8, 0u16..3), 1..3).prop_map(|rs| {
            Ports::from_specs(rs.into_iter().map(|(protocol, s, l)| {
                let (start, end) = match protocol {
                    Protocol::Icmp => (0, 0),
                    _ => (s, s + l),
                };
                PortSpec::Range(PortRange {
                    protocol,
                    start,
                    end,
                })
            }))
        }),
    ]
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Icmp])
}

/// A flow's port: TCP and UDP ports overlap in number, so a protocol mix-up shows.
fn flow_port() -> impl Strategy<Value = FlowPort> {
    (protocol(), 1u16..10).prop_map(|(protocol, port)| match protocol {
        Protocol::Icmp => FlowPort::ICMP_ECHO,
        protocol => FlowPort { protocol, port },
    })
}

fn tier() -> impl Strategy<Value = Tier> {
    prop::sample::select(Tier::ALL.to_vec())
}

fn policy() -> impl Strategy<Value = NetworkPolicy> {
    (
        ns(),
        prop::sample::select(vec![Action::Allow, Action::Reject]),
        prop::sample::select(vec![Mode::Incoming, Mode::Outgoing, Mode::Bidirectional]),
        selector(),
        selector(),
        ports(),
        tier(),
        any::<(bool, bool, bool, bool)>(),
    )
        .prop_map(
            |(
                namespace,
                action,
                mode,
                subject,
                object,
                ports,
                tier,
                (propagate, enforce, encrypt, log),
            )| NetworkPolicy {
                name: String::new(),
                namespace,
                action,
                mode,
                subject,
                object,
                ports,
                tier,
                propagate,
                // Mostly enforced, so decisions are interesting.
                enforce: enforce || propagate,
                encrypt,
                log,
                origin: None,
            },
        )
}

fn external() -> impl Strategy<Value = ExternalNetwork> {
    (
        ns(),
        prop::collection::vec(prop::sample::select(TAGS), 0..2),
        prop::collection::vec(prop::sample::select(ENTRIES), 1..3),
        ports(),
    )
        .prop_map(|(namespace, tags, entries, ports)| ExternalNetwork {
            name: String::new(),
            namespace,
            tags: TagSet::parse(tags).unwrap(),
            entries: entries
                .into_iter()
                .map(|e| e.parse::<Entry>().unwrap())
                .collect(),
            ports,
        })
}

fn set() -> impl Strategy<Value = PolicySet> {
    (
        prop::collection::vec(policy(), 0..40),
        prop::collection::vec(external(), 0..4),
        prop::collection::vec(
            (
                ns(),
                prop::option::of(any::<bool>()),
                prop::option::of(tier()),
            ),
            0..3,
        ),
    )
        .prop_map(|(mut policies, mut externals, namespaces)| {
            for (i, p) in policies.iter_mut().enumerate() {
                p.name = format!("p{i}");
            }
            for (i, e) in externals.iter_mut().enumerate() {
                e.name = format!("n{i}");
            }
            let mut seen = std::collections::HashSet::new();
            let namespaces = namespaces
                .into_iter()
                .filter(|(p, _, _)| seen.insert(p.clone()))
                .map(|(path, discovery, default_tier)| Namespace {
                    path,
                    discovery,
                    default_tier,
                    tag_prefixes: None,
                })
                .collect();
            PolicySet::new(policies, externals, namespaces).unwrap()
        })
}

#[derive(Debug, Clone)]
enum PeerSpec {
    Pu(NamespacePath, Vec<&'static str>),
    Tags(Vec<&'static str>),
    Addr(Option<&'static str>, Option<&'static str>),
}

fn peer() -> impl Strategy<Value = PeerSpec> {
    prop_oneof![
        3 => (ns(), prop::collection::vec(prop::sample::select(TAGS), 0..4)).prop_map(|(n, t)| PeerSpec::Pu(n, t)),
        1 => prop::collection::vec(prop::sample::select(TAGS), 0..3).prop_map(|mut t| { t.push("$identity=externalnetwork"); PeerSpec::Tags(t) }),
        2 => (prop::option::of(prop::sample::select(IPS)), prop::option::of(prop::sample::select(DOMAINS))).prop_map(|(i, d)| PeerSpec::Addr(i, d)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn engine_agrees_with_naive(
        set in set(),
        flows in prop::collection::vec((
            prop::sample::select(vec![Direction::Outgoing, Direction::Incoming]),
            ns(),
            prop::collection::vec(prop::sample::select(TAGS), 0..4),
            peer(),
            flow_port(),
        ), 1..16),
    ) {
        let engine = Engine::compile(set.clone());
        for (dir, own_ns, own_tags, peer, port) in flows {
            let pu = Pu::with_automatic_tags(own_ns, TagSet::parse(own_tags).unwrap());
            let prepared = engine.prepare_pu(&pu);
            let (naive_peer, fast_peer) = match peer {
                PeerSpec::Pu(n, t) => {
                    let p = Peer::Pu(Pu::with_automatic_tags(n, TagSet::parse(t).unwrap()).tags);
                    let f = engine.prepare_peer(&p);
                    (p, f)
                }
                PeerSpec::Tags(t) => {
                    let p = Peer::External(vec![TagSet::parse(t).unwrap()]);
                    let f = engine.prepare_peer(&p);
                    (p, f)
                }
                PeerSpec::Addr(ip, domain) => {
                    let addr = Address { ip: ip.map(|i| i.parse().unwrap()), domain: domain.map(str::to_owned) };
                    let ids = engine.resolve_address(&prepared, &addr, port);
                    let slow_ids = set.resolve_address(&pu.namespace, &addr, port);
                    prop_assert_eq!(ids.iter().map(|&i| i as usize).collect::<Vec<_>>(), slow_ids);
                    (Peer::resolve(&set, &pu.namespace, &addr, port), PreparedPeer::Networks(ids))
                }
            };
            let fast = engine.decide(dir, &prepared, &fast_peer, port);
            let slow = naive::decide(&set, dir, &pu, &naive_peer, port);
            prop_assert_eq!(fast, slow);
        }
    }
}

/// Large selectors, up to and beyond the bounds.
fn big_selector() -> impl Strategy<Value = Selector> {
    (1usize..400, 1usize..80).prop_map(|(clauses, tags)| {
        Selector(
            (0..clauses)
                .map(|i| {
                    (0..tags)
                        .map(|j| format!("k{}=v{}", (i + j) % 97, j % 7).parse().unwrap())
                        .collect()
                })
                .collect(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever the sizes, a set is either refused with a precise bound error or it
    /// compiles and decides; nothing panics.
    #[test]
    fn large_sets_are_refused_or_compile(subject in big_selector(), object in big_selector(), n in 1usize..30) {
        let base = NetworkPolicy {
            name: String::new(),
            namespace: NamespacePath::root(),
            action: Action::Allow,
            mode: Mode::Bidirectional,
            subject: subject.clone(),
            object: object.clone(),
            ports: Ports::Any,
            tier: Tier::Application,
            propagate: true,
            enforce: true,
            encrypt: false,
            log: false,
            origin: None,
        };
        let policies: Vec<_> = (0..n).map(|i| NetworkPolicy { name: format!("p{i}"), ..base.clone() }).collect();
        let within = |s: &Selector| s.0.len() <= segmesh_policy::limits::MAX_CLAUSES
            && s.0.iter().all(|c| c.len() <= segmesh_policy::limits::MAX_CLAUSE_TAGS);
        match PolicySet::new(policies, vec![], vec![]) {
            Ok(set) => {
                prop_assert!(within(&subject) && within(&object));
                let engine = Engine::compile(set);
                let pu = Pu::with_automatic_tags(NamespacePath::root(), TagSet::parse(["k1=v1"]).unwrap());
                let prepared = engine.prepare_pu(&pu);
                let peer = engine.prepare_peer(&Peer::Pu(TagSet::parse(["k2=v1"]).unwrap()));
                let _ = engine.decide(Direction::Outgoing, &prepared, &peer, FlowPort::tcp(80));
            }
            Err(e) => {
                prop_assert!(!(within(&subject) && within(&object)), "refused within bounds: {}", e);
                prop_assert!(e.to_string().contains("at most"), "{}", e);
            }
        }
    }
}
