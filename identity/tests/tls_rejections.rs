//! Every reason to refuse a peer certificate, each over a real TLS 1.3 handshake on
//! loopback, in both directions where both are possible (the server checking a client,
//! the client checking a server), and the accepted case with resumption.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use segmesh_identity::{Ca, KeyAlgorithm, Rejection, tags};

fn ca() -> Ca {
    Ca::new_root(TD, KeyAlgorithm::EcdsaP256).unwrap()
}

/// Presents `bad` as a client to a good server and as a server to a good client; both
/// verifying ends must refuse it with `want`.
async fn refused_both_ways(ca: &Ca, bad: &Material, want: Rejection) {
    let good = configs(
        &issue(ca, "/acme", "api", &["app=api"], KeyAlgorithm::EcdsaP256),
        ca,
    );
    let (server, _client) = handshake(good.server.clone(), rogue_client(Some(bad))).await;
    assert!(
        server.result.is_err(),
        "server accepted a bad client: {server:?}"
    );
    assert_eq!(server.rejection, Some(want), "server side: {server:?}");
    let (_server, client) = handshake(rogue_server(bad), good.client.clone()).await;
    assert!(
        client.result.is_err(),
        "client accepted a bad server: {client:?}"
    );
    assert_eq!(client.rejection, Some(want), "client side: {client:?}");
}

fn hours(h: u64) -> Duration {
    Duration::from_secs(h * 3600)
}

#[tokio::test]
async fn accepted_peers_see_each_others_identity_and_tags_and_resume() {
    let ca = ca();
    let web = configs(
        &issue(
            &ca,
            "/acme/shop",
            "web",
            &["env=prod", "app=web"],
            KeyAlgorithm::EcdsaP256,
        ),
        &ca,
    );
    let api = configs(
        &issue(
            &ca,
            "/acme/shop",
            "api",
            &["app=api"],
            KeyAlgorithm::Ed25519,
        ),
        &ca,
    );
    let (s, c) = handshake(api.server.clone(), web.client.clone()).await;
    let (s_id, c_id) = (s.result.unwrap(), c.result.unwrap());
    assert_eq!(
        (s_id.namespace.as_str(), s_id.name.as_str()),
        ("/acme/shop", "web")
    );
    assert_eq!(s_id.tags, vec!["app=web", "env=prod"]);
    assert_eq!(c_id.name, "api");
    assert_eq!(c_id.tags, vec!["app=api"]);
    assert_eq!(c.alpn.as_deref(), Some(&b"segmesh/2"[..]));
    assert!(!c.resumed && !s.resumed);
    // The second connection resumes, and both ends still learn the peer's identity.
    let (s, c) = handshake(api.server.clone(), web.client.clone()).await;
    assert!(
        c.resumed && s.resumed,
        "second handshake should resume: {c:?} {s:?}"
    );
    assert_eq!(s.result.unwrap().name, "web");
    assert_eq!(c.result.unwrap().name, "api");
}

#[tokio::test]
async fn intermediate_ca_chains_verify() {
    let root = ca();
    let inter = root.new_intermediate(KeyAlgorithm::EcdsaP256).unwrap();
    let web = configs(
        &issue(
            &inter,
            "/acme",
            "web",
            &["app=web"],
            KeyAlgorithm::EcdsaP256,
        ),
        &root,
    );
    let api = configs(
        &issue(&inter, "/acme", "api", &[], KeyAlgorithm::EcdsaP256),
        &root,
    );
    assert_eq!(web.identity.name, "web");
    let (s, c) = handshake(api.server.clone(), web.client.clone()).await;
    assert_eq!(s.result.unwrap().tags, vec!["app=web"]);
    assert_eq!(c.result.unwrap().name, "api");
}

#[tokio::test]
async fn no_certificate() {
    let ca = ca();
    let good = configs(
        &issue(&ca, "/acme", "api", &[], KeyAlgorithm::EcdsaP256),
        &ca,
    );
    let (server, _) = handshake(good.server.clone(), rogue_client(None)).await;
    assert_eq!(
        server.rejection,
        Some(Rejection::NoCertificate),
        "{server:?}"
    );
}

#[tokio::test]
async fn another_ca() {
    let other = Ca::new_root(TD, KeyAlgorithm::EcdsaP256).unwrap();
    refused_both_ways(
        &ca(),
        &issue(
            &other,
            "/acme",
            "web",
            &["app=web"],
            KeyAlgorithm::EcdsaP256,
        ),
        Rejection::UnknownIssuer,
    )
    .await;
}

#[tokio::test]
async fn expired() {
    let ca = ca();
    let now = SystemTime::now();
    let m = custom(
        &ca,
        &spec(
            &["spiffe://segmesh.local/ns/acme/pu/web"],
            Some(tags::encode(&[]).unwrap()),
            now - hours(2),
            now - hours(1),
        ),
    );
    refused_both_ways(&ca, &m, Rejection::Expired).await;
}

#[tokio::test]
async fn not_yet_valid() {
    let ca = ca();
    let now = SystemTime::now();
    let m = custom(
        &ca,
        &spec(
            &["spiffe://segmesh.local/ns/acme/pu/web"],
            Some(tags::encode(&[]).unwrap()),
            now + hours(1),
            now + hours(2),
        ),
    );
    refused_both_ways(&ca, &m, Rejection::NotYetValid).await;
}

#[tokio::test]
async fn wrong_trust_domain() {
    let ca = ca();
    let now = SystemTime::now();
    let m = custom(
        &ca,
        &spec(
            &["spiffe://evil.example/ns/acme/pu/web"],
            None,
            now,
            now + hours(1),
        ),
    );
    refused_both_ways(&ca, &m, Rejection::WrongTrustDomain).await;
}

#[tokio::test]
async fn no_spiffe_id() {
    let ca = ca();
    let now = SystemTime::now();
    refused_both_ways(
        &ca,
        &custom(&ca, &spec(&[], None, now, now + hours(1))),
        Rejection::NoSpiffeId,
    )
    .await;
}

#[tokio::test]
async fn several_spiffe_ids() {
    let ca = ca();
    let now = SystemTime::now();
    let m = custom(
        &ca,
        &spec(
            &[
                "spiffe://segmesh.local/ns/acme/pu/web",
                "spiffe://segmesh.local/ns/acme/pu/api",
            ],
            None,
            now,
            now + hours(1),
        ),
    );
    refused_both_ways(&ca, &m, Rejection::MultipleSpiffeIds).await;
}

#[tokio::test]
async fn malformed_tags_extension() {
    let ca = ca();
    let now = SystemTime::now();
    let m = custom(
        &ca,
        &spec(
            &["spiffe://segmesh.local/ns/acme/pu/web"],
            Some(b"\x30\x05\x0c\x07ab".to_vec()),
            now,
            now + hours(1),
        ),
    );
    refused_both_ways(&ca, &m, Rejection::MalformedTags).await;
}

#[tokio::test]
async fn tags_altered_after_signing() {
    let ca = ca();
    let mut m = issue(&ca, "/acme", "web", &["role=user"], KeyAlgorithm::EcdsaP256);
    let mut der = m.chain[0].to_vec();
    let at = der
        .windows(9)
        .position(|w| w == b"role=user")
        .expect("tag in the DER");
    der[at + 5..at + 9].copy_from_slice(b"root");
    m.chain[0] = der.into();
    refused_both_ways(&ca, &m, Rejection::InvalidSignature).await;
}

#[tokio::test]
async fn ca_certificate_as_leaf() {
    let ca = ca();
    use rustls_pki_types::pem::PemObject;
    let m = Material {
        chain: ca.bundle().to_vec(),
        key: rustls_pki_types::PrivateKeyDer::from_pem_slice(ca.key_pem().as_bytes()).unwrap(),
    };
    refused_both_ways(&ca, &m, Rejection::CaAsLeaf).await;
}
