//! The two cryptography providers rustls offers, side by side in one run: ring and
//! aws-lc-rs (ztunnel's choice). In memory, no sockets, so the figures are the
//! cryptography and rustls alone: a full mTLS handshake (P-256 certificates from the
//! same CA, both ends verifying) and bulk transfer (16 MiB one way, full-size records,
//! encrypted by one end and decrypted by the other).
//! Run: `cargo bench -p segmesh-identity --bench provider`.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use rustls::{ClientConnection, ServerConnection};
use rustls_pki_types::ServerName;
use segmesh_identity::{Ca, KeyAlgorithm, Sessions, TlsConfigs};

mod common;
use common::TD;
const BULK: usize = 16 << 20;

fn configs(ca: &Ca, name: &str, provider: &str) -> TlsConfigs {
    use rustls_pki_types::pem::PemObject;
    let (key, issued) = common::issue(ca, name, KeyAlgorithm::EcdsaP256);
    let sessions = Sessions::new().unwrap();
    TlsConfigs::with_provider(
        segmesh_identity::ca::certs_from_pem(&issued.chain_pem).unwrap(),
        rustls_pki_types::PrivateKeyDer::from_pem_slice(key.pem().as_bytes()).unwrap(),
        &segmesh_identity::ca::certs_from_pem(&issued.bundle_pem).unwrap(),
        TD,
        &sessions,
        segmesh_identity::tls::provider_named(provider).unwrap(),
    )
    .unwrap()
}

/// A full handshake (the client keeps no session: nothing is resumed).
fn connect(
    client: &Arc<rustls::ClientConfig>,
    server: &TlsConfigs,
) -> (ClientConnection, ServerConnection) {
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let mut s = ServerConnection::new(server.server.clone()).unwrap();
    let mut buf = Vec::new();
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        c.write_tls(&mut buf).unwrap();
        s.read_tls(&mut buf.as_slice()).unwrap();
        s.process_new_packets().unwrap();
        buf.clear();
        s.write_tls(&mut buf).unwrap();
        c.read_tls(&mut buf.as_slice()).unwrap();
        c.process_new_packets().unwrap();
    }
    (c, s)
}

/// 16 MiB from the client to the server in 64 KiB writes.
fn bulk(c: &mut ClientConnection, s: &mut ServerConnection, data: &[u8], out: &mut [u8]) {
    let mut wire = Vec::with_capacity(128 << 10);
    let mut got = 0;
    for chunk in data.chunks(64 << 10) {
        c.writer().write_all(chunk).unwrap();
        while c.wants_write() {
            wire.clear();
            c.write_tls(&mut wire).unwrap();
            let mut rd = wire.as_slice();
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().unwrap();
                loop {
                    match s.reader().read(out) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }
    }
    assert_eq!(got, data.len());
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(5));
    let ca = Ca::new_root(TD, KeyAlgorithm::EcdsaP256).unwrap();
    let data = vec![0x5au8; BULK];
    let mut out = vec![0u8; 64 << 10];
    for provider in segmesh_identity::tls::PROVIDERS {
        let (client, server) = (
            configs(&ca, "client", provider),
            configs(&ca, "server", provider),
        );
        let mut full = (*client.client).clone();
        full.resumption = rustls::client::Resumption::disabled();
        let client = Arc::new(full);
        let mut g = c.benchmark_group(format!("provider/{provider}"));
        g.bench_function("mtls-handshake", |b| b.iter(|| connect(&client, &server)));
        g.throughput(Throughput::Bytes(BULK as u64));
        g.bench_function("bulk-16MiB", |b| {
            let (mut cc, mut sc) = connect(&client, &server);
            b.iter(|| bulk(&mut cc, &mut sc, &data, &mut out))
        });
        g.finish();
    }
    c.final_summary();
}
