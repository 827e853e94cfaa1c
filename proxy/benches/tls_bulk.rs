//! Bytes through one TLS connection on loopback, both ends in this process (a
//! figure is the CPU of both ends), against plain TCP in the same run.
//!
//! `tls` is the mesh tunnel's transport alone (tokio-rustls with the enforcer's TLS
//! configuration: TLS 1.3, the default provider, mTLS), with no HTTP/2, relay or capture:
//! the most an encrypted flow could move on this machine with TLS in user space. `tcp`
//! is the baseline. Two workloads: 64 MiB one way (`bulk-64MiB`), and 2,000 round trips
//! of 64 bytes one after another (`round-trips-2000x64B`). A figure's "time" is the
//! process's CPU time (both ends, user and system, from `getrusage`) per run, not its
//! wall time: far steadier on a shared machine, and what an enforcer pays. Run: `cargo
//! bench -p segmesh-proxy --bench tls_bulk`.

use std::time::Duration;

use criterion::{Criterion, Throughput};
use rustls_pki_types::ServerName;
use segmesh_identity::{Ca, KeyAlgorithm, TlsConfigs};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BYTES: usize = 64 << 20;
const CHUNK: usize = 64 << 10;

// The identity benches' certificate set-up (a bench CA, a workload's configurations).
#[path = "../../identity/benches/common/mod.rs"]
mod common;
use common::configs;

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Tcp,
    Tls,
}

/// Sends `BYTES`, ends its side, then waits for the receiver's end (a socket closed
/// with unread bytes, such as TLS session tickets, would reset the receiver).
async fn send(mut w: impl AsyncRead + AsyncWrite + Unpin) {
    let chunk = vec![7u8; CHUNK];
    let mut left = BYTES;
    while left > 0 {
        let n = left.min(CHUNK);
        w.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    w.read_to_end(&mut rest).await.unwrap();
}

async fn receive(mut r: impl AsyncRead + AsyncWrite + Unpin) -> usize {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    loop {
        match r.read(&mut buf).await.unwrap() {
            0 => break,
            n => got += n,
        }
    }
    r.shutdown().await.unwrap();
    got
}

/// Round trips of 64 bytes, one after another.
const TRIPS: usize = 2_000;

/// Sends `TRIPS` messages of 64 bytes, each after the previous one's echo.
async fn ping(mut w: impl AsyncRead + AsyncWrite + Unpin) {
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    for _ in 0..TRIPS {
        w.write_all(&msg).await.unwrap();
        w.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    w.read_to_end(&mut rest).await.unwrap();
}

/// Echoes until the end; what it echoed.
async fn echo(mut r: impl AsyncRead + AsyncWrite + Unpin) -> usize {
    let mut buf = [0u8; 64];
    let mut got = 0;
    loop {
        match r.read(&mut buf).await.unwrap() {
            0 => break,
            n => {
                r.write_all(&buf[..n]).await.unwrap();
                got += n;
            }
        }
    }
    r.shutdown().await.unwrap();
    got
}

#[derive(Clone, Copy, PartialEq)]
enum Work {
    /// `BYTES` one way.
    Bulk,
    /// `TRIPS` round trips of 64 bytes.
    Trips,
}

async fn client(work: Work, s: impl AsyncRead + AsyncWrite + Unpin) {
    match work {
        Work::Bulk => send(s).await,
        Work::Trips => ping(s).await,
    }
}

async fn server(work: Work, s: impl AsyncRead + AsyncWrite + Unpin) -> usize {
    match work {
        Work::Bulk => receive(s).await,
        Work::Trips => echo(s).await,
    }
}

/// One run of `work` from a client to a server over `variant`: the CPU it took.
async fn once(work: Work, variant: Variant, a: &TlsConfigs, b: &TlsConfigs) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server_cfg = b.server.clone();
    let start = cpu();
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
        match variant {
            Variant::Tcp => server(work, tcp).await,
            Variant::Tls => server(work, acceptor.accept(tcp).await.unwrap()).await,
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let connector = tokio_rustls::TlsConnector::from(a.client.clone());
    let name = ServerName::IpAddress(addr.ip().into());
    match variant {
        Variant::Tcp => client(work, tcp).await,
        Variant::Tls => client(work, connector.connect(name, tcp).await.unwrap()).await,
    }
    let expected = match work {
        Work::Bulk => BYTES,
        Work::Trips => TRIPS * 64,
    };
    assert_eq!(server.await.unwrap(), expected);
    cpu() - start
}

/// CPU time this process has used, user and system.
fn cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let d = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    d(u.user_time()) + d(u.system_time())
}

fn bench(c: &mut Criterion) {
    // As the enforcer does at start: freed memory is kept, not given back per record.
    segmesh_proxy::alloc::keep_freed_memory(segmesh_proxy::alloc::KEEP);
    let ca = Ca::new_root(common::TD, KeyAlgorithm::EcdsaP256).unwrap();
    let alg = KeyAlgorithm::EcdsaP256;
    let (a, b) = (configs(&ca, "a", alg), configs(&ca, "b", alg));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (group, work, n) in [
        ("bulk-64MiB", Work::Bulk, BYTES),
        ("round-trips-2000x64B", Work::Trips, TRIPS),
    ] {
        let mut g = c.benchmark_group(group);
        g.throughput(match work {
            Work::Bulk => Throughput::Bytes(n as u64),
            Work::Trips => Throughput::Elements(n as u64),
        });
        g.sample_size(10);
        for (name, v) in [("tcp", Variant::Tcp), ("tls", Variant::Tls)] {
            g.bench_function(name, |bch| {
                bch.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            total += once(work, v, &a, &b).await;
                        }
                        total
                    })
                })
            });
        }
        g.finish();
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
