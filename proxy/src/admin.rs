//! The admin listener: `/healthz` (the process runs), `/ready` (listeners bound and a
//! valid configuration loaded), `/metrics` (Prometheus text), `/config` (the snapshot
//! being enforced), `/app-health/<container>/<kind>` (the application's probes, made on
//! loopback on the kubelet's behalf: the kubelet's own probes come from the node's
//! address, which default deny refuses, and opening the app to the node would let
//! anything on the node in).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::state::Shared;

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let plain = "text/plain; charset=utf-8";
    if let Some(probe) = shared.settings.app_probes.get(req.uri().path()) {
        let limit = shared
            .settings
            .limits
            .connect_timeout
            .max(Duration::from_secs(1));
        return Ok(
            match tokio::time::timeout(limit * 2, app_probe(probe, limit)).await {
                Ok(Ok(status)) => text(StatusCode::OK, plain, format!("probe passed: {status}\n")),
                Ok(Err(why)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    plain,
                    format!("probe failed: {why}\n"),
                ),
                Err(_) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    plain,
                    "probe failed: timed out\n".into(),
                ),
            },
        );
    }
    Ok(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, plain, "ok\n".into()),
        "/ready" => {
            if shared.is_ready() {
                let body = match shared.rejection() {
                    // Still ready: the previous snapshot is enforced.
                    Some(why) => format!(
                        "ready (enforcing {}; the newest snapshot is unusable: {why})\n",
                        shared.snapshot().version
                    ),
                    None => "ready\n".into(),
                };
                text(StatusCode::OK, plain, body)
            } else if shared.is_draining() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    plain,
                    "not ready: shutting down (draining open flows)\n".into(),
                )
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    plain,
                    "not ready: no valid configuration loaded (rejecting everything)\n".into(),
                )
            }
        }
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        "/config" => {
            let s = shared.snapshot();
            let body = serde_json::json!({
                "version": s.version,
                "source": s.source,
                "pu": s.pu_qualified(),
                "tags": s.pu.tags.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                "policies": s.policy_count,
                "registry": s.registry.len(),
                "registry_conflicts": s.registry_conflicts,
                "fail_closed": s.is_fail_closed(),
            });
            text(StatusCode::OK, "application/json", format!("{body}\n"))
        }
        _ => text(StatusCode::NOT_FOUND, plain, "not found\n".into()),
    })
}

/// Makes one of the application's probes on loopback; what passed, or why it failed.
async fn app_probe(probe: &segmesh_api::AppProbe, limit: Duration) -> Result<String, String> {
    let port = match probe {
        segmesh_api::AppProbe::HttpGet { port, .. } | segmesh_api::AppProbe::TcpSocket { port } => {
            *port
        }
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = match tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(format!("connect {addr}: {e}")),
        Err(_) => return Err(format!("connect {addr}: timed out")),
    };
    let segmesh_api::AppProbe::HttpGet { path, headers, .. } = probe else {
        return Ok(format!("{addr} accepts connections"));
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    tokio::spawn(conn);
    let mut req = Request::get(path.as_str())
        .header("host", format!("127.0.0.1:{port}"))
        .header("user-agent", "kube-probe/segmesh");
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| format!("the probe's request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("GET {path} on {addr}: {e}"))?;
    let status = resp.status();
    // The kubelet's rule: 200 to 399 pass.
    if (200..400).contains(&status.as_u16()) {
        Ok(format!("GET {path} on {addr}: {status}"))
    } else {
        Err(format!("GET {path} on {addr}: {status}"))
    }
}

/// Serves until the task is aborted (the admin port answers while the enforcer drains).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let forever = std::future::pending();
    segmesh_api::net::accept_loop(listener, "admin", forever, |tcp, _| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, shared.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await
            {
                tracing::debug!(error = %e, "admin connection");
            }
        });
    })
    .await
}
