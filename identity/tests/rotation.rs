//! Rotation with 3-second certificates: connections opened before, during and after
//! renewals all complete, and a connection established under the first certificate keeps
//! working after that certificate has expired. The renewal here is the test's own (a
//! new key, a certificate from the CA, fresh TLS configurations and session state swapped
//! in at 2/3 of the life); the enforcer renews the same way through the console.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use common::{TD, id};
use rustls_pki_types::{PrivateKeyDer, ServerName};
use segmesh_identity::ca::certs_from_pem;
use segmesh_identity::{Ca, KeyAlgorithm, Sessions, TlsConfigs, WorkloadKey, peer_identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TTL: Duration = Duration::from_secs(3);
const RUN: Duration = Duration::from_secs(7);

/// A workload's current TLS configurations, renewed at 2/3 of each certificate's life.
struct Rotating {
    current: RwLock<Arc<TlsConfigs>>,
    renewals: AtomicUsize,
}

impl Rotating {
    fn current(&self) -> Arc<TlsConfigs> {
        self.current.read().unwrap().clone()
    }

    fn renewals(&self) -> usize {
        self.renewals.load(Ordering::Relaxed)
    }
}

/// A new key, a certificate, new configurations with fresh session state (a resumed
/// session must never cross a rotation: it would carry the old certificate's identity).
fn obtain(ca: &Ca, name: &str) -> TlsConfigs {
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let issued = ca
        .issue(
            &key.csr_pem(name).unwrap(),
            &id("/acme", name),
            &[format!("app={name}")],
            TTL,
        )
        .unwrap();
    TlsConfigs::new(
        certs_from_pem(&issued.chain_pem).unwrap(),
        PrivateKeyDer::Pkcs8(key.der().into()),
        &certs_from_pem(&issued.bundle_pem).unwrap(),
        TD,
        &Sessions::new().unwrap(),
    )
    .unwrap()
}

fn manager(ca: &Ca, name: &str) -> Arc<Rotating> {
    let ca = Ca::from_pem(TD, &ca.chain_pem(), ca.key_pem(), &ca.bundle_pem()).unwrap();
    let r = Arc::new(Rotating {
        current: RwLock::new(Arc::new(obtain(&ca, name))),
        renewals: AtomicUsize::new(0),
    });
    let (rotating, name) = (r.clone(), name.to_owned());
    tokio::spawn(async move {
        loop {
            let at = rotating.current().identity.renew_at(2.0 / 3.0);
            let wait = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait).await;
            let next = obtain(&ca, &name);
            *rotating.current.write().unwrap() = Arc::new(next);
            rotating.renewals.fetch_add(1, Ordering::Relaxed);
        }
    });
    r
}

async fn serve(listener: TcpListener, server: Arc<Rotating>, until: Instant) {
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
    client: &Rotating,
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
