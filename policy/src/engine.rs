//! The compiled evaluator: selectors indexed by tag, so a decision looks only at the
//! policies that name one of the enforcing PU's tags, never at the whole set.
//!
//! Compilation interns every tag and key that a selector mentions into dense ids. For
//! each direction, each clause of a policy's *own-side* selector (the subject when the
//! enforcer connects, the object when it accepts) is filed under exactly one of its
//! patterns, the one filed least often, so a PU's lookup walks short posting lists. A
//! candidate found there is then verified in full: namespace coverage, port, the
//! clause, and the peer-side selector.
//!
//! External networks are indexed by prefix length (one hash map per length in use, the
//! classic longest-prefix layout, scanned over all lengths because every containing
//! network counts, not just the longest) and by domain name.

use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::net::IpAddr;

use crate::decision::{Decision, Direction, Peer, Pu, Reason, Verdict};
use crate::namespace::NamespacePath;
use crate::network::{Address, DomainPattern, Entry};
#[cfg(test)]
use crate::policy::NetworkPolicy;
use crate::policy::{Action, Mode, PolicyId, Tier};
use crate::ports::{FlowPort, Ports};
use crate::selector::Selector;
use crate::set::PolicySet;
use crate::tag::{IDENTITY_EXTERNAL, Tag, TagPattern, TagSet};

/// A compiled [`PolicySet`]. Cheap to query from many threads (`&self` only).
#[derive(Debug)]
pub struct Engine {
    set: PolicySet,
    // FxHash: keys are our own interned strings, hashed on every peer preparation; no
    // untrusted input chooses them at compile time, and lookups of peer tags only read.
    tag_ids: FxHashMap<Tag, u32>,
    key_ids: FxHashMap<String, u32>,
    ns_ids: HashMap<NamespacePath, u32>,
    policies: Vec<CPolicy>,
    /// Indexed by `Direction as usize`.
    index: [DirIndex; 2],
    ext: ExtIndex,
    ext_sets: Vec<IdSet>,
    ext_ns: Vec<u32>,
    bare_external: IdSet,
}

/// A tag set as ids known to the engine (tags no selector mentions are dropped: they
/// cannot change any match). Both lists sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdSet {
    tags: Vec<u32>,
    keys: Vec<u32>,
    /// Ids of the namespace its `$namespace` tag names (`/` without one) and of that
    /// namespace's ancestors, as far as the set mentions them: which policies' subtrees
    /// a PU peer lives in.
    ns_within: Vec<u32>,
}

/// The enforcing PU, prepared once per PU (or per snapshot).
#[derive(Debug, Clone)]
pub struct PreparedPu {
    ns: Option<u32>,
    /// Ids of the PU's namespace and its ancestors that the set mentions.
    ancestors: Vec<u32>,
    discovery: bool,
    set: IdSet,
}

/// The other end, prepared once per connection (or per peer certificate).
#[derive(Debug, Clone)]
pub enum PreparedPeer {
    Pu(IdSet),
    /// External, by explicit tag sets.
    Sets(Vec<IdSet>),
    /// External, by the networks the address falls in (indexes into
    /// [`PolicySet::externals`]); empty: in none, tags `[$identity=externalnetwork]`.
    Networks(Vec<u32>),
}

#[derive(Debug)]
struct Clause {
    exact: Box<[u32]>,
    wild: Box<[u32]>,
    /// The clause names a peer's namespace (`$namespace=…`): it may match PU peers
    /// outside the policy's subtree.
    names_ns: bool,
}

#[derive(Debug)]
struct CPolicy {
    ns: u32,
    propagate: bool,
    mode: Mode,
    action: Action,
    tier: Tier,
    enforce: bool,
    encrypt: bool,
    log: bool,
    ports: Ports,
    subject: Box<[Clause]>,
    object: Box<[Clause]>,
}

/// One posting: a policy's clause, with the policy's namespace, port bounds and one tag
/// the peer must carry copied in, so that most candidates are dismissed without touching
/// the policy (20 bytes; a posting list is scanned sequentially, the policies are not).
#[derive(Debug, Clone, Copy)]
struct Cand {
    policy: u32,
    clause: u16,
    propagate: bool,
    ns: u32,
    port_lo: u32,
    port_hi: u32,
    /// A tag id every PU peer the policy can match carries (the peer-side selector has a
    /// single clause that requires it), or `NO_HINT`.
    peer_hint: u32,
}

const NO_HINT: u32 = u32::MAX;

#[derive(Debug, Default)]
struct DirIndex {
    by_tag: Vec<Vec<Cand>>,
    by_key: Vec<Vec<Cand>>,
}

#[derive(Debug, Default)]
struct ExtIndex {
    v4: Vec<(u8, HashMap<u32, Vec<u32>>)>,
    v6: Vec<(u8, HashMap<u128, Vec<u32>>)>,
    exact: HashMap<String, Vec<u32>>,
    wild: HashMap<String, Vec<u32>>,
}

fn mask4(ip: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        ip & (u32::MAX << (32 - len))
    }
}

fn mask6(ip: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        ip & (u128::MAX << (128 - len))
    }
}

/// The policies a decision found: on the stack up to 16 (the common case), then on the
/// heap, so a decision allocates only what its result holds.
#[derive(Default)]
struct Found {
    inline: [u32; 16],
    len: usize,
    spill: Vec<u32>,
}

impl Found {
    fn push(&mut self, id: u32) {
        if self.len < self.inline.len() {
            self.inline[self.len] = id;
            self.len += 1;
        } else {
            self.spill.push(id);
        }
    }

    /// Sorted and deduplicated.
    fn sorted(&mut self) -> &[u32] {
        if self.spill.is_empty() {
            let s = &mut self.inline[..self.len];
            s.sort_unstable();
            let mut n = 0;
            for i in 0..s.len() {
                if n == 0 || s[i] != s[n - 1] {
                    s[n] = s[i];
                    n += 1;
                }
            }
            &self.inline[..n]
        } else {
            self.spill.extend_from_slice(&self.inline[..self.len]);
            self.spill.sort_unstable();
            self.spill.dedup();
            &self.spill
        }
    }
}

// === impl IdSet ===

impl IdSet {
    fn clause_matches(&self, c: &Clause) -> bool {
        c.exact.iter().all(|t| self.tags.binary_search(t).is_ok())
            && c.wild.iter().all(|k| self.keys.binary_search(k).is_ok())
    }

    fn any_clause(&self, sel: &[Clause]) -> bool {
        sel.iter().any(|c| self.clause_matches(c))
    }

    /// As a PU peer of a policy of namespace `ns`: a clause matches only a peer inside
    /// `ns`'s subtree unless it names the peer's namespace.
    fn any_clause_within(&self, sel: &[Clause], ns: u32) -> bool {
        let inside = self.ns_within.contains(&ns);
        sel.iter()
            .any(|c| (inside || c.names_ns) && self.clause_matches(c))
    }
}

// === impl Engine ===

impl Engine {
    /// Compiles a set. Linear in the size of the set.
    pub fn compile(set: PolicySet) -> Engine {
        let mut e = Engine {
            set: PolicySet::default(),
            tag_ids: FxHashMap::default(),
            key_ids: FxHashMap::default(),
            ns_ids: HashMap::new(),
            policies: Vec::new(),
            index: [DirIndex::default(), DirIndex::default()],
            ext: ExtIndex::default(),
            ext_sets: Vec::new(),
            ext_ns: Vec::new(),
            bare_external: IdSet::default(),
        };
        e.policies = set
            .policies()
            .iter()
            .map(|p| CPolicy {
                ns: e.intern_ns(&p.namespace),
                propagate: p.propagate,
                mode: p.mode,
                action: p.action,
                tier: p.tier,
                enforce: p.enforce,
                encrypt: p.encrypt,
                log: p.log,
                ports: p.ports.clone(),
                subject: e.intern_selector(&p.subject),
                object: e.intern_selector(&p.object),
            })
            .collect();
        for dir in [Direction::Outgoing, Direction::Incoming] {
            e.index[dir as usize] = e.build_index(dir);
        }
        for (i, x) in set.externals().iter().enumerate() {
            let i = i as u32;
            let ns = e.intern_ns(&x.namespace);
            e.ext_ns.push(ns);
            let tags = x.effective_tags();
            e.ext_sets.push(e.id_set(&tags));
            for entry in &x.entries {
                match entry {
                    Entry::Net(ipnet::IpNet::V4(n)) => {
                        let len = n.prefix_len();
                        let key = mask4(u32::from(n.network()), len);
                        let slot = match e.ext.v4.iter().position(|(l, _)| *l == len) {
                            Some(s) => s,
                            None => {
                                e.ext.v4.push((len, HashMap::new()));
                                e.ext.v4.len() - 1
                            }
                        };
                        e.ext.v4[slot].1.entry(key).or_default().push(i);
                    }
                    Entry::Net(ipnet::IpNet::V6(n)) => {
                        let len = n.prefix_len();
                        let key = mask6(u128::from(n.network()), len);
                        let slot = match e.ext.v6.iter().position(|(l, _)| *l == len) {
                            Some(s) => s,
                            None => {
                                e.ext.v6.push((len, HashMap::new()));
                                e.ext.v6.len() - 1
                            }
                        };
                        e.ext.v6[slot].1.entry(key).or_default().push(i);
                    }
                    Entry::Domain(DomainPattern::Exact(d)) => {
                        e.ext.exact.entry(d.clone()).or_default().push(i)
                    }
                    Entry::Domain(DomainPattern::Wildcard(s)) => {
                        e.ext.wild.entry(s.clone()).or_default().push(i)
                    }
                }
            }
        }
        let bare: TagSet = std::iter::once(crate::tag::known(IDENTITY_EXTERNAL)).collect();
        e.bare_external = e.id_set(&bare);
        e.set = set;
        e
    }

    pub fn set(&self) -> &PolicySet {
        &self.set
    }

    fn intern_ns(&mut self, ns: &NamespacePath) -> u32 {
        let next = self.ns_ids.len() as u32;
        *self.ns_ids.entry(ns.clone()).or_insert(next)
    }

    fn intern_key(&mut self, key: &str) -> u32 {
        if let Some(&id) = self.key_ids.get(key) {
            return id;
        }
        let id = self.key_ids.len() as u32;
        self.key_ids.insert(key.to_owned(), id);
        id
    }

    fn intern_pattern(&mut self, p: &TagPattern) -> (Option<u32>, u32) {
        let key = self.intern_key(p.key());
        let tag = p.value().map(|v| {
            let t = Tag::new(p.key(), v).expect("pattern parts form a valid tag");
            let next = self.tag_ids.len() as u32;
            *self.tag_ids.entry(t).or_insert(next)
        });
        (tag, key)
    }

    fn intern_selector(&mut self, sel: &Selector) -> Box<[Clause]> {
        sel.clauses()
            .iter()
            .filter(|c| !c.is_empty())
            .map(|c| {
                let mut exact = Vec::new();
                let mut wild = Vec::new();
                for p in c {
                    match self.intern_pattern(p) {
                        (Some(t), _) => exact.push(t),
                        (None, k) => wild.push(k),
                    }
                }
                exact.sort_unstable();
                exact.dedup();
                wild.sort_unstable();
                wild.dedup();
                Clause {
                    exact: exact.into(),
                    wild: wild.into(),
                    names_ns: crate::selector::names_namespace(c),
                }
            })
            .collect()
    }

    fn own_side(p: &CPolicy, dir: Direction) -> Option<&[Clause]> {
        let fits = matches!(
            (dir, p.mode),
            (_, Mode::Bidirectional)
                | (Direction::Outgoing, Mode::Outgoing)
                | (Direction::Incoming, Mode::Incoming)
        );
        let side = match dir {
            Direction::Outgoing => &*p.subject,
            Direction::Incoming => &*p.object,
        };
        fits.then_some(side)
    }

    fn build_index(&self, dir: Direction) -> DirIndex {
        let mut tag_freq = vec![0u32; self.tag_ids.len()];
        let mut key_freq = vec![0u32; self.key_ids.len()];
        for p in &self.policies {
            for c in Self::own_side(p, dir).unwrap_or(&[]) {
                c.exact.iter().for_each(|&t| tag_freq[t as usize] += 1);
                c.wild.iter().for_each(|&k| key_freq[k as usize] += 1);
            }
        }
        let mut idx = DirIndex {
            by_tag: vec![Vec::new(); self.tag_ids.len()],
            by_key: vec![Vec::new(); self.key_ids.len()],
        };
        for (pi, p) in self.policies.iter().enumerate() {
            for (ci, c) in Self::own_side(p, dir).unwrap_or(&[]).iter().enumerate() {
                let (port_lo, port_hi) = p.ports.key_bounds();
                let peer_side = match dir {
                    Direction::Outgoing => &p.object,
                    Direction::Incoming => &p.subject,
                };
                let peer_hint = match &**peer_side {
                    [only] => only
                        .exact
                        .iter()
                        .copied()
                        .min_by_key(|&t| tag_freq[t as usize])
                        .unwrap_or(NO_HINT),
                    _ => NO_HINT,
                };
                let cand = Cand {
                    peer_hint,
                    policy: pi as u32,
                    // PolicySet::new bounds clauses to limits::MAX_CLAUSES (< u16::MAX).
                    clause: u16::try_from(ci).unwrap_or(u16::MAX),
                    propagate: p.propagate,
                    ns: p.ns,
                    port_lo,
                    port_hi,
                };
                // File the clause under its rarest exact tag; a wildcard-only clause
                // under its rarest key.
                if let Some(&t) = c.exact.iter().min_by_key(|&&t| tag_freq[t as usize]) {
                    idx.by_tag[t as usize].push(cand);
                } else if let Some(&k) = c.wild.iter().min_by_key(|&&k| key_freq[k as usize]) {
                    idx.by_key[k as usize].push(cand);
                }
            }
        }
        idx
    }

    /// Interns a tag set (tags no selector mentions are dropped).
    pub fn id_set(&self, tags: &TagSet) -> IdSet {
        let mut s = IdSet {
            tags: Vec::with_capacity(tags.len()),
            keys: Vec::with_capacity(tags.len()),
            ns_within: crate::selector::pu_namespace(tags)
                .self_and_ancestors()
                .iter()
                .filter_map(|n| self.ns_ids.get(n).copied())
                .collect(),
        };
        for t in tags.iter() {
            if let Some(&id) = self.tag_ids.get(t) {
                s.tags.push(id);
            }
            if let Some(&id) = self.key_ids.get(t.key()) {
                s.keys.push(id);
            }
        }
        s.tags.sort_unstable();
        s.tags.dedup();
        s.keys.sort_unstable();
        s.keys.dedup();
        s
    }

    pub fn prepare_pu(&self, pu: &Pu) -> PreparedPu {
        PreparedPu {
            ns: self.ns_ids.get(&pu.namespace).copied(),
            ancestors: pu
                .namespace
                .self_and_ancestors()
                .iter()
                .filter_map(|n| self.ns_ids.get(n).copied())
                .collect(),
            discovery: self.set.discovery(&pu.namespace),
            set: self.id_set(&pu.tags),
        }
    }

    pub fn prepare_peer(&self, peer: &Peer) -> PreparedPeer {
        match peer {
            Peer::Pu(t) => PreparedPeer::Pu(self.id_set(t)),
            Peer::External(alts) => {
                PreparedPeer::Sets(alts.iter().map(|t| self.id_set(t)).collect())
            }
        }
    }

    /// The external networks visible from the PU's namespace that contain `addr` on
    /// `port` (sorted indexes into [`PolicySet::externals`]).
    pub fn resolve_address(
        &self,
        pu: &PreparedPu,
        addr: &Address,
        port: impl Into<FlowPort>,
    ) -> Vec<u32> {
        let key = port.into().key();
        let mut out = Vec::new();
        match addr.ip.map(|ip| ip.to_canonical()) {
            Some(IpAddr::V4(ip)) => {
                let ip = u32::from(ip);
                for (len, map) in &self.ext.v4 {
                    out.extend(map.get(&mask4(ip, *len)).into_iter().flatten());
                }
            }
            Some(IpAddr::V6(ip)) => {
                let ip = u128::from(ip);
                for (len, map) in &self.ext.v6 {
                    out.extend(map.get(&mask6(ip, *len)).into_iter().flatten());
                }
            }
            None => {}
        }
        if let Some(name) = &addr.domain {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            out.extend(self.ext.exact.get(&name).into_iter().flatten());
            if let Some((first, rest)) = name.split_once('.') {
                if DomainPattern::Wildcard(rest.to_owned()).matches(&name) && !first.is_empty() {
                    out.extend(self.ext.wild.get(rest).into_iter().flatten());
                }
            }
        }
        out.retain(|&i| {
            pu.ancestors.contains(&self.ext_ns[i as usize])
                && self.set.externals()[i as usize].ports.contains_key(key)
        });
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The external peer for an address, as seen from this PU.
    pub fn external_peer(
        &self,
        pu: &PreparedPu,
        addr: &Address,
        port: impl Into<FlowPort>,
    ) -> PreparedPeer {
        PreparedPeer::Networks(self.resolve_address(pu, addr, port))
    }

    fn peer_matches(&self, sel: &[Clause], peer: &PreparedPeer, policy_ns: u32) -> bool {
        match peer {
            PreparedPeer::Pu(s) => s.any_clause_within(sel, policy_ns),
            PreparedPeer::Sets(alts) => alts.iter().any(|s| s.any_clause(sel)),
            PreparedPeer::Networks(ids) if ids.is_empty() => self.bare_external.any_clause(sel),
            PreparedPeer::Networks(ids) => ids
                .iter()
                .any(|&i| self.ext_sets[i as usize].any_clause(sel)),
        }
    }

    fn applies(
        &self,
        c: Cand,
        dir: Direction,
        pu: &PreparedPu,
        peer: &PreparedPeer,
        port: u32,
    ) -> bool {
        // Cheap checks on the posting itself first.
        if port < c.port_lo || port > c.port_hi {
            return false;
        }
        let covered = if c.propagate {
            pu.ancestors.contains(&c.ns)
        } else {
            pu.ns == Some(c.ns)
        };
        if !covered {
            return false;
        }
        if let PreparedPeer::Pu(peer) = peer {
            if c.peer_hint != NO_HINT && peer.tags.binary_search(&c.peer_hint).is_err() {
                return false;
            }
        }
        let p = &self.policies[c.policy as usize];
        let external = !matches!(peer, PreparedPeer::Pu(_));
        if (p.mode == Mode::Bidirectional && external) || !p.ports.contains_key(port) {
            return false;
        }
        let (own, other) = match dir {
            Direction::Outgoing => (&p.subject, &p.object),
            Direction::Incoming => (&p.object, &p.subject),
        };
        pu.set.clause_matches(&own[c.clause as usize]) && self.peer_matches(other, peer, p.ns)
    }

    /// Decides one flow at one enforcer.
    pub fn decide(
        &self,
        dir: Direction,
        pu: &PreparedPu,
        peer: &PreparedPeer,
        port: impl Into<FlowPort>,
    ) -> Decision {
        // Protocol and port as one key (FlowPort::key).
        let port = port.into().key();
        let idx = &self.index[dir as usize];
        let mut found = Found::default();
        for &t in &pu.set.tags {
            for &c in &idx.by_tag[t as usize] {
                if self.applies(c, dir, pu, peer, port) {
                    found.push(c.policy);
                }
            }
        }
        for &k in &pu.set.keys {
            for &c in &idx.by_key[k as usize] {
                if self.applies(c, dir, pu, peer, port) {
                    found.push(c.policy);
                }
            }
        }
        let found = found.sorted();
        let tier = found
            .iter()
            .map(|&i| &self.policies[i as usize])
            .filter(|p| p.enforce)
            .map(|p| p.tier)
            .min();
        let matched: Vec<PolicyId> = found.iter().map(|&i| PolicyId(i)).collect();
        let Some(tier) = tier else {
            return Decision {
                verdict: if pu.discovery {
                    Verdict::Allow
                } else {
                    Verdict::Reject
                },
                reason: if pu.discovery {
                    Reason::Discovery
                } else {
                    Reason::Default
                },
                tier: None,
                policies: Vec::new(),
                matched,
                encrypt: true,
                log: true,
            };
        };
        let deciding = |action: Option<Action>| {
            found.iter().copied().filter(move |&i| {
                let p = &self.policies[i as usize];
                p.enforce && p.tier == tier && action.is_none_or(|a| p.action == a)
            })
        };
        let rejects: Vec<PolicyId> = deciding(Some(Action::Reject)).map(PolicyId).collect();
        if !rejects.is_empty() {
            return Decision {
                verdict: Verdict::Reject,
                reason: Reason::Policy,
                tier: Some(tier),
                policies: rejects,
                matched,
                encrypt: true,
                log: true,
            };
        }
        let allows: Vec<PolicyId> = deciding(None).map(PolicyId).collect();
        Decision {
            verdict: Verdict::Allow,
            reason: Reason::Policy,
            tier: Some(tier),
            encrypt: allows.iter().any(|id| self.policies[id.0 as usize].encrypt),
            log: allows.iter().any(|id| self.policies[id.0 as usize].log),
            policies: allows,
            matched,
        }
    }

    /// Prepares both ends and decides (convenience for tools and tests; enforcers keep
    /// the prepared forms).
    pub fn decide_flow(
        &self,
        dir: Direction,
        pu: &Pu,
        peer: &Peer,
        port: impl Into<FlowPort>,
    ) -> Decision {
        self.decide(dir, &self.prepare_pu(pu), &self.prepare_peer(peer), port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_sorts_and_dedups_inline_and_spilled() {
        let mut f = Found::default();
        for id in [5, 3, 5, 1, 3] {
            f.push(id);
        }
        assert_eq!(f.sorted(), &[1, 3, 5]);
        let mut f = Found::default();
        for id in (0..40).rev().chain(0..40) {
            f.push(id);
        }
        assert_eq!(f.sorted(), (0..40).collect::<Vec<_>>().as_slice());
    }

    /// A decision that matches more policies than fit inline agrees with the naive
    /// evaluator.
    #[test]
    fn many_matches_spill() {
        let policies = (0..40)
            .map(|i| NetworkPolicy {
                name: format!("p{i:02}"),
                namespace: NamespacePath::root(),
                action: Action::Allow,
                mode: Mode::Bidirectional,
                subject: Selector(vec![vec!["a=1".parse().unwrap()]]),
                object: Selector(vec![vec!["b=*".parse().unwrap()]]),
                ports: Ports::Any,
                tier: Tier::Application,
                propagate: true,
                enforce: true,
                encrypt: i % 2 == 0,
                log: false,
                origin: None,
            })
            .collect();
        let set = PolicySet::new(policies, vec![], vec![]).unwrap();
        let engine = Engine::compile(set.clone());
        let pu = Pu::with_automatic_tags(NamespacePath::root(), TagSet::parse(["a=1"]).unwrap());
        let peer = Peer::Pu(TagSet::parse(["b=2"]).unwrap());
        let fast = engine.decide_flow(Direction::Outgoing, &pu, &peer, 1);
        assert_eq!(fast.policies.len(), 40);
        assert_eq!(
            fast,
            crate::naive::decide(&set, Direction::Outgoing, &pu, &peer, 1)
        );
    }
}
