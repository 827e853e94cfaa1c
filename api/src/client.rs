//! An HTTPS client of the console API, for the enforcer (async) and `segmeshctl` (which
//! blocks on it): the console's CA, a bearer token or a workload certificate, JSON in
//! and out, one connection per request (a long-poll holds one for up to a minute).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::Deserialize;

/// The console's message in an error answer.
fn error_text(body: &serde_json::Value) -> String {
    body["error"]
        .as_str()
        .map_or_else(|| body.to_string(), str::to_owned)
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach the console: {0}")]
    Unreachable(String),
    #[error("the console answered {status}: {}", error_text(body))]
    Status {
        status: u16,
        /// The console's JSON answer (`{"error": ...}`, and `diagnostics` for a bad
        /// apply).
        body: serde_json::Value,
    },
    #[error("{0}")]
    Setup(String),
    #[error("the console's answer: {0}")]
    Body(String),
}

/// One console replica's address.
#[derive(Debug, Clone)]
struct Endpoint {
    host: String,
    port: u16,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Endpoint, CallError> {
        let bad = || CallError::Setup(format!("console URL `{url}`: expected https://host:port"));
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(bad)?
            .trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        Ok(Endpoint {
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
        })
    }
}

/// How long connecting to one replica may take before the next is tried.
const CONNECT_EACH: Duration = Duration::from_secs(3);

/// An HTTPS client for the console API: one connection per request (a long-poll holds
/// one for up to 30 s; flow batches go once a second at most). Given several console
/// replicas, it talks to one and moves to the next when that one cannot be reached or
/// stops answering; clients derived with [`Client::with_identity`] move together.
pub struct Client {
    endpoints: Arc<[Endpoint]>,
    /// The replica in use (an index into `endpoints`), shared with derived clients.
    current: Arc<std::sync::atomic::AtomicUsize>,
    /// Sent as a bearer token unless empty.
    token: String,
    roots: Arc<rustls::RootCertStore>,
    tls: Arc<rustls::ClientConfig>,
    /// `SO_MARK` of every connection (the enforcer's mark, so that its capture rules
    /// let it out).
    mark: Option<u32>,
}

impl Client {
    /// `url`: `https://host:port`; `token`: sent as a bearer token unless empty;
    /// `ca_pem`: the console's CA.
    pub fn new(url: &str, token: &str, ca_pem: &str) -> Result<Client, CallError> {
        Client::replicas(&[url.to_owned()], token, ca_pem)
    }

    /// A client of several console replicas (`https://host:port` each), tried in turn.
    pub fn replicas(urls: &[String], token: &str, ca_pem: &str) -> Result<Client, CallError> {
        let endpoints = urls
            .iter()
            .map(|u| Endpoint::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(CallError::Setup("no console URL".into()));
        }
        let setup = |e: &dyn std::fmt::Display| CallError::Setup(format!("console CA: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        for c in segmesh_identity::ca::certs_from_pem(ca_pem).map_err(|e| setup(&e))? {
            roots.add(c).map_err(|e| setup(&e))?;
        }
        let roots = Arc::new(roots);
        let tls = rustls::ClientConfig::builder_with_provider(segmesh_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| setup(&e))?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        Ok(Client {
            endpoints: endpoints.into(),
            current: Default::default(),
            token: token.to_owned(),
            roots,
            tls: Arc::new(tls),
            mark: None,
        })
    }

    /// Marks every connection with `SO_MARK` (needs CAP_NET_ADMIN; without it the
    /// connections go unmarked).
    pub fn with_mark(mut self, mark: u32) -> Client {
        self.mark = Some(mark);
        self
    }

    /// How many console replicas this client knows.
    pub fn replica_count(&self) -> usize {
        self.endpoints.len()
    }

    /// The replica in use.
    pub fn console(&self) -> String {
        let e = &self.endpoints[self.current() % self.endpoints.len()];
        format!("https://{}:{}", e.host, e.port)
    }

    fn current(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connects to the replica in use, or else to the next one that answers (which is
    /// then the one in use); the replica's index.
    /// Connecting includes the TLS handshake: a replica that takes connections but does
    /// not answer (hung, stopped) is skipped within [`CONNECT_EACH`] like one that refuses.
    async fn connect(
        &self,
    ) -> Result<
        (
            tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
            usize,
        ),
        CallError,
    > {
        let n = self.endpoints.len();
        let first = self.current() % n;
        let mut errors = Vec::new();
        for i in (first..first + n).map(|i| i % n) {
            let e = &self.endpoints[i];
            let open = async {
                let tcp = self.connect_to(e).await?;
                let name = ServerName::try_from(e.host.clone())
                    .map_err(|err| CallError::Unreachable(format!("{}: {err}", e.host)))?;
                tokio_rustls::TlsConnector::from(self.tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|err| {
                        CallError::Unreachable(format!("{}:{}: TLS: {err}", e.host, e.port))
                    })
            };
            match tokio::time::timeout(CONNECT_EACH, open).await {
                Ok(Ok(tls)) => {
                    if i != first {
                        tracing::info!(console = %format!("https://{}:{}", e.host, e.port), "moved to another console replica");
                        self.current.store(i, std::sync::atomic::Ordering::Relaxed);
                    }
                    return Ok((tls, i));
                }
                Ok(Err(err)) => errors.push(err.to_string()),
                Err(_) => errors.push(format!(
                    "{}:{}: no TLS connection within {CONNECT_EACH:?}",
                    e.host, e.port
                )),
            }
        }
        Err(CallError::Unreachable(errors.join("; ")))
    }

    /// After a failed exchange with replica `i`, the next call starts with the next one.
    fn move_on(&self, i: usize) {
        let next = (i + 1) % self.endpoints.len();
        if self.endpoints.len() > 1
            && self
                .current
                .compare_exchange(
                    i,
                    next,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        {
            let (from, to) = (&self.endpoints[i], &self.endpoints[next]);
            tracing::info!(
                from = %format!("https://{}:{}", from.host, from.port),
                to = %format!("https://{}:{}", to.host, to.port),
                "console replica stopped answering; moving to the next"
            );
        }
    }

    async fn connect_to(&self, e: &Endpoint) -> Result<tokio::net::TcpStream, CallError> {
        let addr = format!("{}:{}", e.host, e.port);
        let unreachable =
            |e: &dyn std::fmt::Display| CallError::Unreachable(format!("{addr}: {e}"));
        let mut last = None;
        for a in tokio::net::lookup_host(&addr)
            .await
            .map_err(|e| unreachable(&e))?
        {
            let sock = match a {
                std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }
            .map_err(|e| unreachable(&e))?;
            if let Some(m) = self.mark {
                if let Err(e) = socket2::SockRef::from(&sock).set_mark(m) {
                    tracing::debug!(error = %e, "cannot mark the console connection");
                }
            }
            match sock.connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => unreachable(&e),
            None => unreachable(&"no address"),
        })
    }

    /// The same console, authenticated by a workload certificate instead of the token
    /// (renewals).
    pub fn with_identity(&self, chain_pem: &str, key_pem: &str) -> Result<Client, String> {
        use rustls_pki_types::PrivateKeyDer;
        use rustls_pki_types::pem::PemObject;
        let chain = segmesh_identity::ca::certs_from_pem(chain_pem).map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
        let tls = rustls::ClientConfig::builder_with_provider(segmesh_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(chain, key)
            .map_err(|e| e.to_string())?;
        Ok(Client {
            endpoints: self.endpoints.clone(),
            current: self.current.clone(),
            token: String::new(),
            roots: self.roots.clone(),
            tls: Arc::new(tls),
            mark: self.mark,
        })
    }

    /// One request with a JSON body (or none) and a JSON answer, within `limit`.
    pub async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        limit: Duration,
    ) -> Result<T, CallError> {
        let used = std::sync::atomic::AtomicUsize::new(usize::MAX);
        let exchange = async {
            let (tls, i) = self.connect().await?;
            used.store(i, std::sync::atomic::Ordering::Relaxed);
            let ep = &self.endpoints[i];
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| CallError::Unreachable(e.to_string()))?;
            tokio::spawn(conn);
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", &ep.host)
                .header("content-type", "application/json");
            if !self.token.is_empty() {
                req = req.header("authorization", format!("Bearer {}", self.token));
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| CallError::Body(e.to_string()))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| CallError::Unreachable(e.to_string()))?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::Unreachable(e.to_string()))?
                .to_bytes();
            if status != 200 {
                let body = serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_else(
                    |_| serde_json::json!({ "error": String::from_utf8_lossy(&bytes) }),
                );
                return Err(CallError::Status { status, body });
            }
            serde_json::from_slice(&bytes).map_err(|e| CallError::Body(e.to_string()))
        };
        let result = tokio::time::timeout(limit, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(CallError::Unreachable(format!(
                    "no answer within {limit:?}"
                )))
            });
        // A replica that took the connection and then broke it, did not answer in time,
        // or cannot reach its store (503): the next call tries another.
        if let Err(CallError::Unreachable(_) | CallError::Status { status: 503, .. }) = &result {
            let i = used.load(std::sync::atomic::Ordering::Relaxed);
            if i != usize::MAX {
                self.move_on(i);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TLS server on loopback answering every request with `status` and `{}`.
    async fn replica(ca: &segmesh_identity::Ca, status: &'static str) -> String {
        use segmesh_identity::{KeyAlgorithm, WorkloadKey};
        let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let issued = ca
            .issue_server(
                &key.csr_pem("console").unwrap(),
                &[],
                &["127.0.0.1".parse().unwrap()],
                Duration::from_secs(600),
            )
            .unwrap();
        let chain = segmesh_identity::ca::certs_from_pem(&issued.chain_pem).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(segmesh_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                chain,
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut req = Vec::new();
                    let mut b = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&b[..n]),
                        }
                    }
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
                    );
                    let _ = s.write_all(answer.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        url
    }

    /// The attack of a replica that stalls: it takes connections (its listening socket
    /// is there) and answers nothing. The call skips it within the connect time and is
    /// answered by the next replica, instead of spending its whole limit on it.
    #[tokio::test]
    async fn a_call_skips_a_replica_that_takes_connections_and_never_answers() {
        let ca = segmesh_identity::Ca::new_root(
            "segmesh.local",
            segmesh_identity::KeyAlgorithm::EcdsaP256,
        )
        .unwrap();
        let good = replica(&ca, "200 OK").await;
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stalled = format!("https://{}", hung.local_addr().unwrap());
        // Accepts and holds every connection, silent.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = hung.accept().await {
                held.push(s);
            }
        });
        let c = Client::replicas(&[stalled, good.clone()], "", &ca.bundle_pem()).unwrap();
        let started = std::time::Instant::now();
        c.call::<serde_json::Value>("GET", "/", None, Duration::from_secs(20))
            .await
            .expect("answered by the live replica within the call");
        assert!(
            started.elapsed() < CONNECT_EACH + Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(c.console(), good);
    }

    /// Given several replicas, the client skips one that refuses connections and moves
    /// on from one that answers 503 (it cannot reach its store); every client derived
    /// from it moves too.
    #[tokio::test]
    async fn a_client_moves_to_a_replica_that_answers() {
        let ca = segmesh_identity::Ca::new_root(
            "segmesh.local",
            segmesh_identity::KeyAlgorithm::EcdsaP256,
        )
        .unwrap();
        let sick = replica(&ca, "503 Service Unavailable").await;
        let good = replica(&ca, "200 OK").await;
        // Nothing listens here: a port taken and released.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("https://{}", l.local_addr().unwrap())
        };
        let limit = Duration::from_secs(5);
        let c = Client::replicas(&[dead.clone(), good.clone()], "", &ca.bundle_pem()).unwrap();
        c.call::<serde_json::Value>("GET", "/", None, limit)
            .await
            .expect("the live replica answers");
        assert_eq!(c.console(), good, "the dead one was skipped");

        let c = Client::replicas(&[sick.clone(), good.clone()], "", &ca.bundle_pem()).unwrap();
        let derived = c.with_identity(&ca.chain_pem(), ca.key_pem()).unwrap();
        let e = c
            .call::<serde_json::Value>("GET", "/", None, limit)
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::Status { status: 503, .. }), "{e}");
        assert_eq!(c.console(), good, "moved on after the 503");
        assert_eq!(derived.console(), good, "derived clients move together");
        c.call::<serde_json::Value>("GET", "/", None, limit)
            .await
            .expect("the next call goes to the live replica");
    }
}
