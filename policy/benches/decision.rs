//! Decision time of the compiled engine against the naive evaluator on a generated set of
//! 10,000 policies and 100,000 PUs, and the full compile time.
//!
//! Besides criterion's mean times, `main` first prints per-decision percentiles (p50,
//! p99, p99.9) measured one decision at a time with `Instant` (its own cost, printed
//! too, is included in each sample), since criterion reports means, and the targets are
//! percentiles. Run: `cargo bench -p segmesh-policy --bench decision`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion};
use segmesh_policy::network::{Entry, ExternalNetwork};
use segmesh_policy::ports::{PortRange, PortSpec, Ports};
use segmesh_policy::{
    Action, Direction, Engine, Mode, Namespace, NetworkPolicy, Peer, PolicySet, PreparedPeer,
    PreparedPu, Pu, Selector, TagPattern, TagSet, Tier, naive,
};

const POLICIES: usize = 10_000;
const PUS: usize = 100_000;
const TEAMS: usize = 200;
const APPS_PER_TEAM: usize = 10;

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn pat(s: &str) -> TagPattern {
    s.parse().unwrap()
}

fn sel(clauses: Vec<Vec<String>>) -> Selector {
    Selector(
        clauses
            .into_iter()
            .map(|c| c.iter().map(|p| pat(p)).collect())
            .collect(),
    )
}

fn app_of(team: usize, a: usize) -> usize {
    team * APPS_PER_TEAM + a
}

fn env_of(app: usize) -> &'static str {
    if app % 5 == 0 { "staging" } else { "prod" }
}

struct World {
    set: PolicySet,
    pus: Vec<Pu>,
    /// The app and team of each PU.
    meta: Vec<(usize, usize)>,
}

fn generate() -> World {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut policies = Vec::with_capacity(POLICIES);
    let push = |policies: &mut Vec<NetworkPolicy>,
                ns: String,
                tier: Tier,
                action: Action,
                mode: Mode,
                subject: Selector,
                object: Selector,
                ports: Ports,
                enforce: bool| {
        let name = format!("p{}", policies.len());
        policies.push(NetworkPolicy {
            name,
            namespace: ns.parse().unwrap(),
            action,
            mode,
            subject,
            object,
            ports,
            tier,
            propagate: true,
            enforce,
            encrypt: true,
            log: false,
            origin: None,
        });
    };
    let port = |p: u16| {
        Ports::from_specs([PortSpec::Range(PortRange {
            protocol: Default::default(),
            start: p,
            end: p,
        })])
    };
    // Org-wide: emergency quarantines, infrastructure, environment isolation.
    for q in 0..10 {
        push(
            &mut policies,
            "/org".into(),
            Tier::Emergency,
            Action::Reject,
            Mode::Bidirectional,
            sel(vec![vec![format!("quarantine=q{q}")]]),
            sel(vec![vec!["$identity=processingunit".into()]]),
            Ports::Any,
            true,
        );
    }
    for i in 0..40 {
        push(
            &mut policies,
            "/org".into(),
            Tier::Infrastructure,
            Action::Allow,
            Mode::Outgoing,
            sel(vec![vec!["$identity=processingunit".into()]]),
            sel(vec![vec![format!("ext:name=infra{i}")]]),
            port(53 + i as u16),
            true,
        );
    }
    for _ in 0..150 {
        let (t, u) = (rng.below(TEAMS), rng.below(TEAMS));
        push(
            &mut policies,
            "/org".into(),
            Tier::Environment,
            Action::Reject,
            Mode::Bidirectional,
            sel(vec![vec![format!("team=t{t}"), "env=staging".into()]]),
            sel(vec![vec![format!("team=t{u}"), "env=prod".into()]]),
            Ports::Any,
            true,
        );
    }
    // Team policies: app to app, mostly within the team.
    while policies.len() < POLICIES {
        let t = rng.below(TEAMS);
        let a = app_of(t, rng.below(APPS_PER_TEAM));
        let u = if rng.chance(80) { t } else { rng.below(TEAMS) };
        let b = app_of(u, rng.below(APPS_PER_TEAM));
        let mut subject = vec![vec![format!("app=svc{a}")]];
        if rng.chance(20) {
            subject.push(vec![
                format!("team=t{t}"),
                format!("env={}", env_of(a)),
                "version=*".into(),
            ]);
        }
        let object = vec![vec![format!("app=svc{b}"), format!("env={}", env_of(b))]];
        let mode = [
            Mode::Bidirectional,
            Mode::Bidirectional,
            Mode::Outgoing,
            Mode::Incoming,
        ][rng.below(4)];
        let action = if rng.chance(10) {
            Action::Reject
        } else {
            Action::Allow
        };
        let ports = if rng.chance(10) {
            Ports::Any
        } else {
            port(8000 + rng.below(20) as u16)
        };
        push(
            &mut policies,
            format!("/org/t{t}"),
            Tier::Application,
            action,
            mode,
            sel(subject),
            sel(object),
            ports,
            !rng.chance(5),
        );
    }
    let externals = (0..200)
        .map(|i| ExternalNetwork {
            name: format!("infra{i}"),
            namespace: if i < 40 {
                "/org".parse().unwrap()
            } else {
                format!("/org/t{}", i % TEAMS).parse().unwrap()
            },
            tags: TagSet::new(),
            entries: vec![
                format!("10.{}.{}.0/24", i / 256, i % 256)
                    .parse::<Entry>()
                    .unwrap(),
            ],
            ports: Ports::Any,
        })
        .collect();
    let namespaces = vec![Namespace {
        path: "/org/t7".parse().unwrap(),
        discovery: Some(true),
        default_tier: None,
        tag_prefixes: None,
    }];
    let set = PolicySet::new(policies, externals, namespaces).unwrap();
    let mut pus = Vec::with_capacity(PUS);
    let mut meta = Vec::with_capacity(PUS);
    for i in 0..PUS {
        let t = i % TEAMS;
        let app = app_of(t, (i / TEAMS) % APPS_PER_TEAM);
        let mut tags = TagSet::parse([
            format!("app=svc{app}"),
            format!("team=t{t}"),
            format!("env={}", env_of(app)),
            format!("version=v{}", i % 5),
            format!("zone=z{}", i % 3),
            format!("@k8s:sa=sa{app}"),
            format!("$name=pod{i}"),
        ])
        .unwrap();
        if i % 997 == 0 {
            tags.insert(format!("quarantine=q{}", i % 10).parse().unwrap());
        }
        pus.push(Pu::with_automatic_tags(
            format!("/org/t{t}").parse().unwrap(),
            tags,
        ));
        meta.push((app, t));
    }
    World { set, pus, meta }
}

struct Flow {
    dir: Direction,
    own: usize,
    peer: usize,
    port: u16,
}

/// `owners`: how many distinct PUs decide (an enforcer decides for its own PU, so its
/// own prepared tags stay in cache; `PUS` is the cache-cold worst case).
fn flows(w: &World, n: usize, owners: usize) -> Vec<Flow> {
    let mut rng = Rng(0xF10E_5EED_0000_0002);
    (0..n)
        .map(|_| {
            let own = rng.below(owners) * (PUS / owners);
            // Peers mostly in the same team, where policies are dense.
            let team = if rng.chance(80) {
                w.meta[own].1
            } else {
                rng.below(TEAMS)
            };
            let peer = team + TEAMS * rng.below(PUS / TEAMS);
            Flow {
                dir: if rng.chance(50) {
                    Direction::Outgoing
                } else {
                    Direction::Incoming
                },
                own,
                peer,
                port: 8000 + rng.below(20) as u16,
            }
        })
        .collect()
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    (at(0.50), at(0.99), at(0.999))
}

fn report(w: &World, engine: &Engine, prepared: &[PreparedPu], peers: &[PreparedPeer]) {
    let overhead = {
        let mut v = Vec::with_capacity(100_000);
        for _ in 0..100_000 {
            let t = Instant::now();
            v.push(black_box(t.elapsed()));
        }
        percentiles(v).0
    };
    let fs = flows(w, 200_000, PUS);
    let mut fast = Vec::with_capacity(fs.len());
    let mut verdicts = [0usize; 2];
    for f in &fs {
        let t = Instant::now();
        let d = engine.decide(f.dir, &prepared[f.own], &peers[f.peer], f.port);
        fast.push(t.elapsed());
        verdicts[(d.verdict == segmesh_policy::Verdict::Allow) as usize] += 1;
        black_box(d);
    }
    let mut enforcer = Vec::with_capacity(fs.len());
    for f in &flows(w, 200_000, 16) {
        let t = Instant::now();
        black_box(engine.decide(f.dir, &prepared[f.own], &peers[f.peer], f.port));
        enforcer.push(t.elapsed());
    }
    let raw_peers: Vec<Peer> = w.pus.iter().map(|p| Peer::Pu(p.tags.clone())).collect();
    let mut with_peer = Vec::with_capacity(fs.len());
    for f in &flows(w, 200_000, 16) {
        let t = Instant::now();
        let p = engine.prepare_peer(&raw_peers[f.peer]);
        black_box(engine.decide(f.dir, &prepared[f.own], &p, f.port));
        with_peer.push(t.elapsed());
    }
    let mut slow = Vec::with_capacity(2_000);
    for f in fs.iter().take(2_000) {
        let peer = Peer::Pu(w.pus[f.peer].tags.clone());
        let t = Instant::now();
        black_box(naive::decide(
            engine.set(),
            f.dir,
            &w.pus[f.own],
            &peer,
            f.port,
        ));
        slow.push(t.elapsed());
    }
    let compile = {
        let mut v: Vec<Duration> = (0..10)
            .map(|_| {
                let s = w.set.clone();
                let t = Instant::now();
                black_box(Engine::compile(s));
                t.elapsed()
            })
            .collect();
        v.sort_unstable();
        v[v.len() / 2]
    };
    let (f50, f99, f999) = percentiles(fast);
    let (e50, e99, e999) = percentiles(enforcer);
    let (p50, p99, p999) = percentiles(with_peer);
    let (n50, n99, n999) = percentiles(slow);
    println!(
        "== segmesh-policy decision report: {POLICIES} policies, {PUS} PUs, {} external networks",
        w.set.externals().len()
    );
    println!(
        "   flows sampled: 200000 ({} allow, {} reject); Instant overhead per sample ~{overhead:?}",
        verdicts[1], verdicts[0]
    );
    println!(
        "   compiled, enforcer view (16 deciding PUs, peers among all {PUS}): p50 {e50:?}  p99 {e99:?}  p99.9 {e999:?}"
    );
    println!(
        "   compiled, cache-cold (deciding PU random among {PUS}): p50 {f50:?}  p99 {f99:?}  p99.9 {f999:?}"
    );
    println!(
        "   compiled, enforcer view + interning the peer's certificate tags: p50 {p50:?}  p99 {p99:?}  p99.9 {p999:?}"
    );
    println!("   naive (2000 flows)      : p50 {n50:?}  p99 {n99:?}  p99.9 {n999:?}");
    println!(
        "   speed-up at p50: {:.0}x, at p99: {:.0}x",
        n50.as_secs_f64() / f50.as_secs_f64(),
        n99.as_secs_f64() / f99.as_secs_f64()
    );
    println!("   full compile (median of 10): {compile:?}");
}

fn main() {
    let w = generate();
    let engine = Engine::compile(w.set.clone());
    let prepared: Vec<PreparedPu> = w.pus.iter().map(|p| engine.prepare_pu(p)).collect();
    let peers: Vec<PreparedPeer> = w
        .pus
        .iter()
        .map(|p| engine.prepare_peer(&Peer::Pu(p.tags.clone())))
        .collect();
    report(&w, &engine, &prepared, &peers);

    let mut c = Criterion::default().configure_from_args();
    let fs = flows(&w, 4096, PUS);
    let mut g = c.benchmark_group("decide");
    g.bench_function("compiled", |b| {
        let mut i = 0;
        b.iter(|| {
            let f = &fs[i % fs.len()];
            i += 1;
            engine.decide(f.dir, &prepared[f.own], &peers[f.peer], f.port)
        })
    });
    g.bench_function("naive", |b| {
        let naive_peers: Vec<Peer> = fs
            .iter()
            .map(|f| Peer::Pu(w.pus[f.peer].tags.clone()))
            .collect();
        let mut i = 0;
        b.iter(|| {
            let k = i % fs.len();
            i += 1;
            let f = &fs[k];
            naive::decide(engine.set(), f.dir, &w.pus[f.own], &naive_peers[k], f.port)
        })
    });
    g.finish();
    c.bench_function("compile/10k-policies", |b| {
        b.iter_batched(|| w.set.clone(), Engine::compile, BatchSize::LargeInput)
    });
    c.final_summary();
}
