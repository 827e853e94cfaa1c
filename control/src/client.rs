//! `segmeshctl`'s client for the console API: the shared HTTPS client
//! ([`segmesh_api::client`]), waited on.

use std::time::Duration;

pub use segmesh_api::client::CallError as ClientError;

/// No console request of `segmeshctl` takes longer than this.
const LIMIT: Duration = Duration::from_secs(120);

pub struct Client {
    inner: segmesh_api::client::Client,
}

impl Client {
    /// `url`: `https://host:port`; `ca_file`: the console's CA (its data dir's
    /// `ca/bundle.crt`).
    pub fn new(url: &str, token: &str, ca_file: &str) -> Result<Client, ClientError> {
        let pem = std::fs::read_to_string(ca_file)
            .map_err(|e| ClientError::Setup(format!("CA file {ca_file}: {e}")))?;
        Ok(Client {
            inner: segmesh_api::client::Client::new(url, token, &pem)?,
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
        rt.block_on(self.inner.call(
            method,
            path,
            body.map(|b| b.to_string().into_bytes()),
            LIMIT,
        ))
    }
}
