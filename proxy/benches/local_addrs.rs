//! Whether a captured inbound connection's destination is one of the namespace's own
//! addresses, asked once per inbound external connection (`proxy/src/local.rs`): the
//! kept list ([`LocalAddrs`], one non-blocking `recv` on its netlink subscription when
//! nothing changed) against listing the interfaces' addresses each time (`getifaddrs`,
//! what the enforcer did before), same run, in this process's namespace. Run: `cargo
//! bench -p segmesh-proxy --bench local_addrs`.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::Criterion;
use segmesh_proxy::local::{LocalAddrs, addresses};

fn bench(c: &mut Criterion) {
    let ours: IpAddr = "127.0.0.1".parse().unwrap();
    let local = LocalAddrs::new();
    let mut g = c.benchmark_group("is-local");
    g.bench_function("listing-each-time", |b| {
        b.iter(|| {
            let list = addresses().expect("getifaddrs");
            assert!(list.contains(black_box(&ours)));
        })
    });
    g.bench_function("kept-list", |b| {
        b.iter(|| assert!(local.contains(black_box(ours))))
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
