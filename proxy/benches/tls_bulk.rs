//! Bulk bytes through one TLS connection on loopback, both ends in this process (a
//! figure is the CPU of both ends), against plain TCP in the same run.
//!
//! `tls` is the mesh tunnel's transport alone (tokio-rustls with the enforcer's TLS
//! configuration: TLS 1.3, the default provider, mTLS), with no HTTP/2, relay or capture:
//! the most an encrypted flow could move on this machine with TLS in user space. `tcp`
//! is the baseline. Run: `cargo bench -p segmesh-proxy --bench tls_bulk`.

use std::time::{Duration, Instant};

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

/// One transfer of `BYTES` from a client to a server over `variant`.
async fn once(variant: Variant, a: &TlsConfigs, b: &TlsConfigs) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server_cfg = b.server.clone();
    let start = Instant::now();
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
        match variant {
            Variant::Tcp => receive(tcp).await,
            Variant::Tls => receive(acceptor.accept(tcp).await.unwrap()).await,
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let connector = tokio_rustls::TlsConnector::from(a.client.clone());
    let name = ServerName::IpAddress(addr.ip().into());
    match variant {
        Variant::Tcp => send(tcp).await,
        Variant::Tls => send(connector.connect(name, tcp).await.unwrap()).await,
    }
    assert_eq!(server.await.unwrap(), BYTES);
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let ca = Ca::new_root(common::TD, KeyAlgorithm::EcdsaP256).unwrap();
    let alg = KeyAlgorithm::EcdsaP256;
    let (a, b) = (configs(&ca, "a", alg), configs(&ca, "b", alg));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("bulk-64MiB");
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.sample_size(10);
    for (name, v) in [("tcp", Variant::Tcp), ("tls", Variant::Tls)] {
        g.bench_function(name, |bch| {
            bch.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += once(v, &a, &b).await;
                    }
                    total
                })
            })
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
