//! The admin listener: `/healthz` (the process runs), `/ready` (listeners bound and a
//! valid configuration loaded), `/metrics` (Prometheus text), `/config` (the snapshot
//! being enforced).

use std::convert::Infallible;
use std::sync::Arc;

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
    Ok(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, plain, "ok\n".into()),
        "/ready" => {
            if shared.is_ready() {
                text(StatusCode::OK, plain, "ready\n".into())
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
                "fail_closed": s.is_fail_closed(),
            });
            text(StatusCode::OK, "application/json", format!("{body}\n"))
        }
        _ => text(StatusCode::NOT_FOUND, plain, "not found\n".into()),
    })
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
