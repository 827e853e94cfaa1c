//! TLS 1.3 mTLS handshakes per second on loopback, full and resumed, with P-256 and
//! Ed25519 keys, against plain TCP connect + one-byte echo in the same run.
//!
//! Each iteration is one connection: TCP connect, handshake (both ends verify), the
//! client writes one byte, the server echoes it (so the server has verified the client
//! and the client has received its session tickets). Client and server run on one
//! current-thread runtime, so a figure is the CPU cost of both ends together.
//! Run: `cargo bench -p segmesh-identity --bench handshake`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use criterion::Criterion;
use rustls::client::Resumption;
use rustls::{ClientConfig, HandshakeKind, ServerConfig};
use rustls_pki_types::ServerName;
use segmesh_identity::{Ca, KeyAlgorithm};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

mod common;
use common::{TD, configs};

async fn tls_server(server: Arc<ServerConfig>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut b = [0u8; 1];
                    if tls.read_exact(&mut b).await.is_ok() {
                        let _ = tls.write_all(&b).await;
                        let _ = tls.flush().await;
                    }
                }
            });
        }
    });
    addr
}

async fn tcp_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if tcp.read_exact(&mut b).await.is_ok() {
                    let _ = tcp.write_all(&b).await;
                }
            });
        }
    });
    addr
}

async fn tls_once(client: &Arc<ClientConfig>, addr: SocketAddr, want: HandshakeKind) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client.clone())
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap();
    tls.write_all(b"x").await.unwrap();
    tls.flush().await.unwrap();
    let mut b = [0u8; 1];
    tls.read_exact(&mut b).await.unwrap();
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(want),
        "measured the wrong handshake kind"
    );
}

async fn tcp_once(addr: SocketAddr) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    tcp.read_exact(&mut b).await.unwrap();
}

struct Setup {
    name: &'static str,
    addr: SocketAddr,
    full: Arc<ClientConfig>,
    resumed: Arc<ClientConfig>,
}

fn setup(rt: &Runtime, ca: &Ca, alg: KeyAlgorithm, name: &'static str) -> Setup {
    let server = configs(ca, "server", alg);
    let client = configs(ca, "client", alg);
    let addr = rt.block_on(tls_server(server.server.clone()));
    let mut full = (*client.client).clone();
    full.resumption = Resumption::disabled();
    let resumed = client.client.clone();
    // Prime the session cache.
    rt.block_on(tls_once(&resumed, addr, HandshakeKind::Full));
    Setup {
        name,
        addr,
        full: Arc::new(full),
        resumed,
    }
}

fn rate(rt: &Runtime, n: u32, f: impl AsyncFnMut()) -> f64 {
    let mut f = f;
    let start = Instant::now();
    rt.block_on(async {
        for _ in 0..n {
            f().await;
        }
    });
    f64::from(n) / start.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca_p256 = Ca::new_root(TD, KeyAlgorithm::EcdsaP256).unwrap();
    let ca_ed = Ca::new_root(TD, KeyAlgorithm::Ed25519).unwrap();
    let setups = [
        setup(&rt, &ca_p256, KeyAlgorithm::EcdsaP256, "p256"),
        setup(&rt, &ca_ed, KeyAlgorithm::Ed25519, "ed25519"),
    ];
    let tcp = rt.block_on(tcp_server());

    const N: u32 = 2000;
    let base = rate(&rt, N, async || tcp_once(tcp).await);
    println!(
        "== segmesh-identity handshake report ({N} connections each, loopback, one thread for both ends)"
    );
    println!("   plain TCP connect + 1-byte echo (baseline): {base:>8.0} /s");
    for s in &setups {
        let full = rate(&rt, N, async || {
            tls_once(&s.full, s.addr, HandshakeKind::Full).await
        });
        let resumed = rate(&rt, N, async || {
            tls_once(&s.resumed, s.addr, HandshakeKind::Resumed).await
        });
        println!(
            "   {:<8} full mTLS handshake: {full:>8.0} /s ({:.1}% of TCP)   resumed: {resumed:>8.0} /s ({:.1}% of TCP, {:.1}x full)",
            s.name,
            100.0 * full / base,
            100.0 * resumed / base,
            resumed / full
        );
    }

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("connect");
    g.bench_function("tcp", |b| b.iter(|| rt.block_on(tcp_once(tcp))));
    for s in &setups {
        g.bench_function(format!("{}/full", s.name), |b| {
            b.iter(|| rt.block_on(tls_once(&s.full, s.addr, HandshakeKind::Full)))
        });
        g.bench_function(format!("{}/resumed", s.name), |b| {
            b.iter(|| rt.block_on(tls_once(&s.resumed, s.addr, HandshakeKind::Resumed)))
        });
    }
    g.finish();
    c.final_summary();
}
