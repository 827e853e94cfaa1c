//! Rotation with 3-second certificates: connections opened before, during and after
//! renewals all complete, and a connection established under the first certificate keeps
//! working after that certificate has expired.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TD, id};
use rustls_pki_types::ServerName;
use segmesh_identity::{
    Ca, CertIssuer, IdentityError, IdentityManager, Issued, KeyAlgorithm, LocalIssuer,
    ManagerOptions, peer_identity,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TTL: Duration = Duration::from_secs(3);
const RUN: Duration = Duration::from_secs(7);

fn manager(ca: &Ca, name: &str) -> Arc<IdentityManager> {
    let ca = Ca::from_pem(TD, &ca.chain_pem(), ca.key_pem(), &ca.bundle_pem()).unwrap();
    let issuer = LocalIssuer {
        ca,
        id: id("/acme", name),
        tags: vec![format!("app={name}")],
        ttl: TTL,
    };
    Arc::new(IdentityManager::start(issuer, TD, ManagerOptions::default()).unwrap())
}

async fn serve(listener: TcpListener, server: Arc<IdentityManager>, until: Instant) {
    while let Ok(Ok((tcp, _))) = tokio::time::timeout(
        until.saturating_duration_since(Instant::now()),
        listener.accept(),
    )
    .await
    {
        let cfg = server.current().server.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                return;
            };
            let mut buf = [0u8; 64];
            while let Ok(n) = tls.read(&mut buf).await {
                if n == 0 || tls.write_all(&buf[..n]).await.is_err() || tls.flush().await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn connect(
    client: &IdentityManager,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(client.current().client.clone())
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
}

async fn echo(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    msg: &[u8],
) -> std::io::Result<()> {
    tls.write_all(msg).await?;
    tls.flush().await?;
    let mut back = vec![0u8; msg.len()];
    tls.read_exact(&mut back).await?;
    assert_eq!(back, msg);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_survive_rotation() {
    let ca = Ca::new_root(TD, KeyAlgorithm::EcdsaP256).unwrap();
    let server = manager(&ca, "api");
    let client = manager(&ca, "web");
    let first_expiry = client.current().identity.not_after;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let start = Instant::now();
    let until = start + RUN + Duration::from_secs(2);
    tokio::spawn(serve(listener, server.clone(), until));

    // One connection for the whole run.
    let long = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut tls = connect(&client, addr).await.expect("long-lived connect");
            let mut rounds = 0;
            while start.elapsed() < RUN {
                echo(&mut tls, format!("round {rounds}").as_bytes())
                    .await
                    .expect("long-lived echo");
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            rounds
        })
    };

    // A new connection every 250 ms.
    let ok = Arc::new(AtomicUsize::new(0));
    let mut tries = 0;
    let mut server_certs = BTreeSet::new();
    let mut resumed = 0;
    while start.elapsed() < RUN {
        tries += 1;
        let mut tls = tokio::time::timeout(Duration::from_secs(5), connect(&client, addr))
            .await
            .expect("bounded")
            .expect("connect");
        let peer = peer_identity(tls.get_ref().1).expect("server identity");
        assert_eq!(peer.name, "api");
        server_certs.insert(peer.not_after);
        resumed +=
            usize::from(tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed));
        echo(&mut tls, b"ping").await.expect("short echo");
        ok.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rounds = tokio::time::timeout(Duration::from_secs(5), long)
        .await
        .expect("bounded")
        .unwrap();

    assert_eq!(
        ok.load(Ordering::Relaxed),
        tries,
        "every new connection completed"
    );
    assert!(
        rounds >= 20,
        "the long-lived connection kept working ({rounds} rounds)"
    );
    assert!(
        std::time::SystemTime::now() > first_expiry,
        "the run outlived the first certificate"
    );
    assert!(
        client.renewals() >= 2 && server.renewals() >= 2,
        "renewals: client {}, server {}",
        client.renewals(),
        server.renewals()
    );
    assert!(
        server_certs.len() >= 3,
        "clients saw {} server certificates",
        server_certs.len()
    );
    assert!(resumed > 0, "resumption works within a certificate's life");
}

/// Fails the first renewals, then works.
struct Flaky {
    inner: LocalIssuer,
    calls: AtomicUsize,
}

impl CertIssuer for Flaky {
    fn issue(&self, csr: &str) -> Result<Issued, IdentityError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if (1..=2).contains(&n) {
            return Err(IdentityError::Issuer("console unreachable".into()));
        }
        self.inner.issue(csr)
    }
}

#[test]
fn a_failed_renewal_keeps_the_certificate_and_retries() {
    let ca = Ca::new_root(TD, KeyAlgorithm::EcdsaP256).unwrap();
    let issuer = Flaky {
        inner: LocalIssuer {
            ca,
            id: id("/acme", "web"),
            tags: vec![],
            ttl: TTL,
        },
        calls: AtomicUsize::new(0),
    };
    let opts = ManagerOptions {
        min_retry: Duration::from_millis(100),
        ..ManagerOptions::default()
    };
    let m = IdentityManager::start(issuer, TD, opts).unwrap();
    let first = m.current().identity.not_after;
    let deadline = Instant::now() + Duration::from_secs(6);
    while m.renewals() == 0 && Instant::now() < deadline {
        assert_eq!(
            m.current().identity.not_after,
            first,
            "the old certificate stays until a renewal succeeds"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(m.failures(), 2);
    assert_eq!(m.renewals(), 1);
    assert!(m.current().identity.not_after > first);
}
