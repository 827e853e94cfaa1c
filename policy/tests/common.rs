//! Helpers shared by the policy crate's integration tests.
#![allow(dead_code)]

use segmesh_policy::{
    Address, Decision, Direction, Engine, FlowPort, Loaded, NamespacePath, Peer, PreparedPeer, Pu,
    Source, TagSet, load, naive,
};

pub fn load_str(yaml: &str) -> Loaded {
    load(&[Source {
        name: "test.yaml",
        text: yaml,
    }])
    .unwrap_or_else(|e| panic!("test input is invalid:\n{e}"))
}

pub fn tags(t: &[&str]) -> TagSet {
    TagSet::parse(t).unwrap()
}

pub fn ns(s: &str) -> NamespacePath {
    s.parse().unwrap()
}

/// The other end of a flow in a test.
#[derive(Clone, Copy)]
pub enum P<'a> {
    /// A PU: namespace, listed tags (automatic tags added).
    Pu(&'a str, &'a [&'a str]),
    /// An external end given by tags.
    Ext(&'a [&'a str]),
    /// An address outside the mesh.
    Ip(&'a str),
    Domain(&'a str),
}

/// Decides with both evaluators, asserts they agree, returns the decision.
pub fn decide_both(
    engine: &Engine,
    dir: Direction,
    own_ns: &str,
    own: &[&str],
    peer: P<'_>,
    port: impl Into<FlowPort>,
) -> Decision {
    let port = port.into();
    let pu = Pu::with_automatic_tags(ns(own_ns), tags(own));
    let prepared = engine.prepare_pu(&pu);
    let (naive_peer, engine_peer) = match peer {
        P::Pu(pns, t) => {
            let p = Peer::Pu(Pu::with_automatic_tags(ns(pns), tags(t)).tags);
            let e = engine.prepare_peer(&p);
            (p, e)
        }
        P::Ext(t) => {
            let p = Peer::External(vec![tags(t)]);
            let e = engine.prepare_peer(&p);
            (p, e)
        }
        P::Ip(_) | P::Domain(_) => {
            let addr = match peer {
                P::Ip(ip) => Address {
                    ip: Some(ip.parse().unwrap()),
                    domain: None,
                },
                P::Domain(d) => Address {
                    ip: None,
                    domain: Some(d.to_owned()),
                },
                _ => unreachable!(),
            };
            let p = Peer::resolve(engine.set(), &pu.namespace, &addr, port);
            let ids = engine.resolve_address(&prepared, &addr, port);
            let naive_ids = engine.set().resolve_address(&pu.namespace, &addr, port);
            assert_eq!(
                ids.iter().map(|&i| i as usize).collect::<Vec<_>>(),
                naive_ids,
                "address resolution differs"
            );
            (p, PreparedPeer::Networks(ids))
        }
    };
    let fast = engine.decide(dir, &prepared, &engine_peer, port);
    let slow = naive::decide(engine.set(), dir, &pu, &naive_peer, port);
    assert_eq!(fast, slow, "compiled and naive evaluators disagree");
    fast
}
