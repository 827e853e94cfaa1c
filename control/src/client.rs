//! `segmeshctl`'s client for the console API: HTTPS (the console's CA from `--ca-file`),
//! a bearer token, JSON.

use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("console URL `{0}`: expected https://host:port")]
    Url(String),
    #[error("CA file {0}: {1}")]
    Ca(String, String),
    #[error("cannot reach the console at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("console: {0}")]
    Http(#[from] hyper::Error),
    #[error("the console answered {status}: {body}")]
    Status {
        status: u16,
        body: serde_json::Value,
    },
    #[error("the console's answer is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

pub struct Client {
    host: String,
    port: u16,
    token: String,
    tls: Arc<rustls::ClientConfig>,
}

impl Client {
    pub fn new(url: &str, token: &str, ca_file: &str) -> Result<Client, ClientError> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| ClientError::Url(url.into()))?
            .trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| ClientError::Url(url.into()))?;
        let port: u16 = port.parse().map_err(|_| ClientError::Url(url.into()))?;
        let pem = std::fs::read_to_string(ca_file)
            .map_err(|e| ClientError::Ca(ca_file.into(), e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in segmesh_identity::ca::certs_from_pem(&pem)
            .map_err(|e| ClientError::Ca(ca_file.into(), e.to_string()))?
        {
            roots
                .add(c)
                .map_err(|e| ClientError::Ca(ca_file.into(), e.to_string()))?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(segmesh_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Ca(ca_file.into(), e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Client {
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            token: token.into(),
            tls: Arc::new(tls),
        })
    }

    /// One request; returns the JSON answer or the console's error.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let addr = format!("{}:{}", self.host, self.port);
            let tcp = tokio::net::TcpStream::connect(&addr)
                .await
                .map_err(|e| ClientError::Connect(addr.clone(), e))?;
            let name = ServerName::try_from(self.host.clone())
                .map_err(|_| ClientError::Url(self.host.clone()))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| ClientError::Connect(addr.clone(), e))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", &self.host)
                .header("authorization", format!("Bearer {}", self.token))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(
                    body.map(|b| b.to_string()).unwrap_or_default(),
                )))
                .expect("request parts are valid");
            let resp = send.send_request(req).await?;
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await?.to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes)?;
            if status == 200 {
                Ok(v)
            } else {
                Err(ClientError::Status { status, body: v })
            }
        })
    }
}
