//! The console's HTTPS API (hyper over rustls). Every request carries
//! `Authorization: Bearer <token>`; bodies are JSON.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `POST /v1/apply` | `{"files": [{"name", "text"}]}` | the changes to the draft; 400 with every diagnostic |
//! | `GET /v1/diff` | | the draft against what is live |
//! | `POST /v1/commit` | | `{"version": N}` |
//! | `POST /v1/rollback` | `{"to": N}` (optional) | `{"version": N}` |
//! | `DELETE /v1/policies/<namespace path>/<name>` | | removes it from the draft |
//! | `GET /v1/policies` | | the live version and its policies |
//! | `GET /v1/externalnetworks`, `GET /v1/namespaces` | | the live external networks, namespace settings |
//! | `DELETE /v1/externalnetworks/<namespace path>/<name>` | | removes it from the draft |
//! | `POST /v1/tokens` | `{"name", "role", "namespace"}` | `{"token": ...}` (shown once) |
//! | `DELETE /v1/tokens/<name>` | | revokes the tokens of that name (not the caller's own) |
//! | `GET /v1/audit` | | the audit log (editors of /) |
//! | `POST /v1/enforcers/register` | a [`Registration`] (bearer: a bootstrap token) | a [`Issued`]: certificate, bundle, certified tags |
//! | `GET /v1/processingunits` (also `/v1/enforcers`) | | the registered PUs (each with its enforcer's registration) the caller may see |
//! | `DELETE /v1/processingunits/<namespace path>/<name>` | | deletes a PU (leaves every registry; its renewals are refused) |
//! | `POST /v1/admission` | an `admission.k8s.io/v1` AdmissionReview (no bearer: the Kubernetes API server calls it) | the review's answer: allowed, with a JSON Patch injecting the sidecar |
//! | `POST /v1/flows?pu=<ns>:<name>` | flow records (the enforcer's certificate, no token; only records about that PU are kept) | `{"stored": N, "refused": M}` |
//! | `GET /v1/flows?pu=&verdict=&since=&limit=&before=` | | flow records reported by PUs the caller may see, oldest first: the newest `limit` (at most 10,000) with `seq` below `before`; each carries its `seq` for the next page |
//! | `GET /v1/documents` | | the live policies, external networks and namespace settings that can apply in the caller's subtree |
//! | `GET /v1/snapshot?pu=<ns>:<name>&since=R&wait=S` | (bearer: a bootstrap token or an API token covering the namespace) | the PU's [`segmesh_api::Snapshot`]; waits up to `S` seconds (default 30, at most 60) while the revision is not above `R`; at once without `since` |

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use segmesh_policy::{NamespacePath, Source};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use segmesh_identity::Ca;

use crate::console::{Caller, Console, ConsoleError, FlowFilter, Registration};
use crate::store::{Role, Store};

/// Largest request body accepted (a big policy set fits easily).
/// Body limits per endpoint (a body beyond them is refused while it is read).
const MAX_APPLY: usize = 8 << 20;
const MAX_FLOWS: usize = 4 << 20;
const MAX_ADMISSION: usize = 2 << 20;
const MAX_SMALL: usize = 64 << 10;
/// Flow records in one answer at most.
const MAX_FLOW_PAGE: usize = 10_000;
/// Connections the console serves at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 8192;
/// A request's headers must arrive within this (and an idle keep-alive connection is
/// closed after it).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Deserialize)]
pub struct File {
    pub name: String,
    pub text: String,
}

#[derive(Deserialize)]
struct Apply {
    files: Vec<File>,
}

#[derive(Deserialize)]
struct Rollback {
    to: Option<u64>,
}

#[derive(Deserialize)]
struct NewToken {
    name: String,
    role: Role,
    namespace: String,
    /// For `enforcer` (bootstrap) tokens: the tag patterns a PU may be certified with.
    #[serde(default)]
    allowed_tags: Vec<String>,
    /// For `enforcer` tokens: PUs may register from addresses they do not claim (NAT).
    #[serde(default)]
    any_source: bool,
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!("{v}\n"))))
        .expect("static response parts are valid")
}

fn error(e: ConsoleError) -> Response<Full<Bytes>> {
    let status = match &e {
        ConsoleError::Invalid(_) => StatusCode::BAD_REQUEST,
        ConsoleError::Forbidden(_) => StatusCode::FORBIDDEN,
        ConsoleError::Unauthenticated => StatusCode::UNAUTHORIZED,
        ConsoleError::NotFound { .. } => StatusCode::NOT_FOUND,
        ConsoleError::Namespace(_) => StatusCode::BAD_REQUEST,
        // This replica cannot reach its store now; another may (clients move on).
        ConsoleError::Store(crate::store::StoreError::EtcdUnavailable(_)) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ConsoleError::Store(crate::store::StoreError::Conflict) => StatusCode::CONFLICT,
        ConsoleError::Store(crate::store::StoreError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
        ConsoleError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ConsoleError::Gone(_) => StatusCode::GONE,
        ConsoleError::Conflict(_) => StatusCode::CONFLICT,
    };
    let mut body = serde_json::json!({ "error": e.to_string() });
    if let ConsoleError::Invalid(l) = &e {
        body["diagnostics"] = serde_json::to_value(&l.diagnostics).unwrap_or_default();
    }
    json(status, body)
}

fn bad(msg: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json(
        StatusCode::BAD_REQUEST,
        serde_json::json!({ "error": msg.to_string() }),
    )
}

async fn body<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
    limit: usize,
) -> Result<T, Response<Full<Bytes>>> {
    let bytes = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| bad(format!("body: {e}")))?
        .to_bytes();
    let bytes = if bytes.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        bytes
    };
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("body: {e}")))
}

fn bearer(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

fn caller<S: Store + 'static>(
    console: &Console<S>,
    req: &Request<Incoming>,
) -> Result<Caller, ConsoleError> {
    console.authenticate(&bearer(req).ok_or(ConsoleError::Unauthenticated)?)
}

/// Tells long-polling watchers that the revision moved.
fn changed<S: Store + 'static>(console: &Console<S>, changes: &watch::Sender<u64>) {
    if let Ok(r) = console.revision() {
        // Only a revision that moved wakes the watchers (a renewal that changes nothing
        // does not).
        changes.send_if_modified(|v| {
            let moved = *v != r;
            *v = r;
            moved
        });
    }
}

/// `<prefix>/<namespace path>/<name>`: the namespace and the name, or the answer to a
/// malformed path (400).
#[allow(clippy::result_large_err)] // the error is the answer itself
fn named<'a>(
    path: &'a str,
    prefix: &str,
) -> Result<(NamespacePath, &'a str), Response<Full<Bytes>>> {
    match path[prefix.len()..].rsplit_once('/') {
        Some((ns, name)) if !name.is_empty() => {
            let ns = if ns.is_empty() { "/" } else { ns };
            ns.parse()
                .map(|ns| (ns, name))
                .map_err(|e| error(ConsoleError::Namespace(e)))
        }
        _ => Err(bad(format!("expected {prefix}/<namespace path>/<name>"))),
    }
}

/// A query parameter, percent-decoded.
fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    let raw = req
        .uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?;
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Whether the client's workload certificate names `pu` (`<namespace>:<name>`).
fn holds(peer: Option<&segmesh_identity::WorkloadIdentity>, pu: &str) -> bool {
    peer.is_some_and(|p| format!("{}:{}", p.namespace, p.name) == pu)
}

fn snapshot_answer<S: Store + 'static>(
    console: &Console<S>,
    ns: &NamespacePath,
) -> Response<Full<Bytes>> {
    match console.snapshot_for(ns) {
        Ok(s) => json(StatusCode::OK, serde_json::to_value(s).unwrap_or_default()),
        Err(e) => error(e),
    }
}

async fn snapshot<S: Store + 'static>(
    req: Request<Incoming>,
    console: &Console<S>,
    changes: &watch::Sender<u64>,
    peer: Option<&segmesh_identity::WorkloadIdentity>,
) -> Response<Full<Bytes>> {
    let Some(pu) = query(&req, "pu") else {
        return bad("expected ?pu=<namespace path>:<name>");
    };
    let Some(ns) = pu.rsplit_once(':').map(|(ns, _)| ns.to_owned()) else {
        return bad("expected ?pu=<namespace path>:<name>");
    };
    let ns: NamespacePath = match ns.parse() {
        Ok(n) => n,
        Err(e) => return bad(e),
    };
    // The PU's own certificate (its watch renews its lease), or a token covering its
    // namespace.
    if holds(peer, &pu) {
        if let Some((ns, name)) = pu.rsplit_once(':') {
            console.touch(ns, name);
        }
    } else {
        let Some(token) = bearer(&req) else {
            return error(ConsoleError::Unauthenticated);
        };
        if let Err(e) = console.may_watch(&token, &ns) {
            return error(e);
        }
    }
    // Without `since` (a first fetch), answer at once.
    let Some(since) = query(&req, "since").and_then(|s| s.parse::<u64>().ok()) else {
        return snapshot_answer(console, &ns);
    };
    // A watch ends within a third of the lease, so the next one renews it in time.
    let wait = std::time::Duration::from_secs(
        query(&req, "wait")
            .and_then(|s| s.parse().ok())
            .unwrap_or(30)
            .min(60),
    )
    .min(console.lease / 3);
    let mut rx = changes.subscribe();
    // A revision above ours was counted elsewhere (another replica following a cluster
    // of its own, or a store that started over): answer at once rather than wait for it.
    let current = *rx.borrow_and_update();
    if current == since {
        let _ = tokio::time::timeout(wait, async {
            while rx.changed().await.is_ok() {
                if *rx.borrow_and_update() > since {
                    break;
                }
            }
        })
        .await;
    }
    snapshot_answer(console, &ns)
}

async fn route<S: Store + 'static>(
    req: Request<Incoming>,
    console: Arc<Console<S>>,
    ca: Arc<Ca>,
    changes: Arc<watch::Sender<u64>>,
    inject: Arc<crate::inject::Options>,
    peer: Option<Arc<segmesh_identity::WorkloadIdentity>>,
    remote: std::net::IpAddr,
) -> Response<Full<Bytes>> {
    if req.method() == Method::GET && req.uri().path() == "/v1/snapshot" {
        return snapshot(req, &console, &changes, peer.as_deref()).await;
    }
    if req.method() == Method::POST && req.uri().path() == "/v1/admission" {
        // Called by the Kubernetes API server (its webhook configuration carries the
        // console's CA); it changes nothing here, it only answers with a patch.
        let review: serde_json::Value = match body(req, MAX_ADMISSION).await {
            Ok(r) => r,
            Err(r) => return r,
        };
        return match crate::inject::review(&review, &inject) {
            Ok(answer) => json(StatusCode::OK, answer),
            Err(e) => bad(e),
        };
    }
    if req.method() == Method::POST && req.uri().path() == "/v1/flows" {
        // Only an enforcer, with its PU's certificate, reports flows (checked before
        // the body is read); the console keeps only records about that PU.
        let Some(pu) = query(&req, "pu") else {
            return bad("expected ?pu=<namespace path>:<name>");
        };
        if !holds(peer.as_deref(), &pu) {
            return error(ConsoleError::Forbidden(format!(
                "only the enforcer of {pu}, with its certificate, reports its flows"
            )));
        }
        let records: Vec<segmesh_api::FlowRecord> = match body(req, MAX_FLOWS).await {
            Ok(r) => r,
            Err(r) => return r,
        };
        return match console.store_flows(&pu, records) {
            Ok((n, refused)) => {
                if refused > 0 {
                    tracing::warn!(%pu, refused, "flow records about other PUs refused");
                }
                json(
                    StatusCode::OK,
                    serde_json::json!({ "stored": n, "refused": refused }),
                )
            }
            Err(e) => error(e),
        };
    }
    if req.method() == Method::POST && req.uri().path() == "/v1/enforcers/register" {
        // Enforcers authenticate with a bootstrap token, or renew with their current
        // certificate (verified in the TLS handshake).
        let token = bearer(&req);
        // Authenticated before the body is read: a bootstrap token that exists, or a
        // workload certificate.
        if peer.is_none() {
            match &token {
                Some(t) if console.is_bootstrap_token(t) => {}
                _ => return error(ConsoleError::Unauthenticated),
            }
        }
        let r: Registration = match body(req, MAX_SMALL).await {
            Ok(r) => r,
            Err(r) => return r,
        };
        let done = match (peer.as_deref(), token) {
            (Some(holder), _) if r.renew => console.renew_from(holder, &ca, &r, Some(remote)),
            (_, Some(token)) => console.register_from(&token, &ca, &r, Some(remote)),
            (_, None) => Err(ConsoleError::Unauthenticated),
        };
        return match done {
            Ok(done) => {
                changed(&console, &changes);
                json(
                    StatusCode::OK,
                    serde_json::to_value(done).unwrap_or_default(),
                )
            }
            Err(e) => error(e),
        };
    }
    let who = match caller(&console, &req) {
        Ok(c) => c,
        Err(e) => return error(e),
    };
    let path = req.uri().path().to_owned();
    let r = match (req.method().clone(), path.as_str()) {
        (Method::POST, "/v1/apply") => {
            let a: Apply = match body(req, MAX_APPLY).await {
                Ok(a) => a,
                Err(r) => return r,
            };
            let sources: Vec<Source<'_>> = a.files.iter().map(|f| Source { name: &f.name, text: &f.text }).collect();
            console.apply(&who, &sources).map(|c| serde_json::to_value(c).unwrap_or_default())
        }
        (Method::GET, "/v1/diff") => console.diff(&who).map(|c| serde_json::to_value(c).unwrap_or_default()),
        (Method::POST, "/v1/commit") => console.commit(&who).map(|v| {
            changed(&console, &changes);
            serde_json::json!({ "version": v })
        }),
        (Method::POST, "/v1/rollback") => {
            let r: Rollback = match body(req, MAX_SMALL).await {
                Ok(r) => r,
                Err(r) => return r,
            };
            console.rollback(&who, r.to).map(|v| {
                changed(&console, &changes);
                serde_json::json!({ "version": v })
            })
        }
        (Method::GET, "/v1/policies") => console.live().map(|live| match live {
            None => serde_json::json!({ "version": 0, "policies": [] }),
            Some((v, set)) => {
                let visible: Vec<_> = set.policies().iter().filter(|p| who.namespace.is_ancestor_or_self(&p.namespace)).collect();
                serde_json::json!({ "version": v.version, "committed_at": v.committed_at, "policies": visible })
            }
        }),
        (Method::GET, "/v1/externalnetworks") => console.live().map(|live| match live {
            None => serde_json::json!({ "version": 0, "externalnetworks": [] }),
            Some((v, set)) => {
                let visible: Vec<_> = set.externals().iter().filter(|e| who.namespace.is_ancestor_or_self(&e.namespace)).collect();
                serde_json::json!({ "version": v.version, "externalnetworks": visible })
            }
        }),
        (Method::GET, "/v1/namespaces") => console.live().map(|live| match live {
            None => serde_json::json!({ "version": 0, "namespaces": [] }),
            Some((v, set)) => {
                let visible: Vec<_> = set.namespaces().filter(|n| who.namespace.is_ancestor_or_self(&n.path)).collect();
                serde_json::json!({ "version": v.version, "namespaces": visible })
            }
        }),
        (Method::GET, "/v1/services") => console.services(&who).map(|s| serde_json::json!({ "services": s })),
        (Method::DELETE, p) if p.starts_with("/v1/services/") => match named(p, "/v1/services") {
            Ok((ns, name)) => console.delete(&who, "Service", &ns, name).map(|()| serde_json::json!({ "deleted": true })),
            Err(r) => return r,
        },
        (Method::DELETE, p) if p.starts_with("/v1/externalnetworks/") => match named(p, "/v1/externalnetworks") {
            Ok((ns, name)) => console.delete(&who, "ExternalNetwork", &ns, name).map(|()| serde_json::json!({ "deleted": true })),
            Err(r) => return r,
        },
        (Method::DELETE, p) if p.starts_with("/v1/policies/") => match named(p, "/v1/policies") {
            Ok((ns, name)) => console.delete(&who, "NetworkPolicy", &ns, name).map(|()| serde_json::json!({ "deleted": true })),
            Err(r) => return r,
        },
        (Method::POST, "/v1/tokens") => {
            let t: NewToken = match body(req, MAX_SMALL).await {
                Ok(t) => t,
                Err(r) => return r,
            };
            match t.namespace.parse::<NamespacePath>() {
                Ok(ns) if t.role == Role::Enforcer => console
                    .create_bootstrap_token_with(&who, &t.name, &ns, &t.allowed_tags, t.any_source)
                    .map(|tok| serde_json::json!({ "token": tok })),
                Ok(ns) => console.create_token(Some(&who), &t.name, t.role, &ns).map(|tok| serde_json::json!({ "token": tok })),
                Err(e) => Err(e.into()),
            }
        }
        (Method::DELETE, p) if p.starts_with("/v1/tokens/") => {
            let name = &p["/v1/tokens/".len()..];
            let own = bearer(&req).unwrap_or_default();
            console.revoke_token(&who, &own, name).map(|n| serde_json::json!({ "revoked": n }))
        }
        (Method::GET, "/v1/documents") => console.live().map(|live| match live {
            None => serde_json::json!({ "version": 0, "policies": [], "externals": [], "namespaces": [] }),
            Some((v, set)) => {
                // What can apply to a PU somewhere in the caller's subtree: documents of
                // its ancestors (inherited) and of the subtree itself.
                let relevant = |ns: &NamespacePath| ns.is_ancestor_or_self(&who.namespace) || who.namespace.is_ancestor_or_self(ns);
                serde_json::json!({
                    "version": v.version,
                    "policies": set.policies().iter().filter(|p| relevant(&p.namespace)).collect::<Vec<_>>(),
                    "externals": set.externals().iter().filter(|e| relevant(&e.namespace)).collect::<Vec<_>>(),
                    "namespaces": set.namespaces().filter(|n| relevant(&n.path)).collect::<Vec<_>>(),
                })
            }
        }),
        (Method::DELETE, p) if p.starts_with("/v1/processingunits/") => match named(p, "/v1/processingunits") {
            Ok((ns, name)) => console.delete_pu(&who, &ns, name).map(|()| {
                changed(&console, &changes);
                serde_json::json!({ "deleted": true })
            }),
            Err(r) => return r,
        },
        (Method::GET, "/v1/flows") => {
            let since = match query(&req, "since").map(|s| humantime::parse_duration(&s)).transpose() {
                Ok(s) => s,
                Err(e) => return bad(format!("since: {e}")),
            };
            // Pages: at most MAX_FLOW_PAGE records (the newest matching ones); the next
            // older page with `before=<seq of the first record>`.
            let limit = match query(&req, "limit").map(|s| s.parse::<usize>()).transpose() {
                Ok(l) => Some(l.unwrap_or(MAX_FLOW_PAGE).min(MAX_FLOW_PAGE)),
                Err(e) => return bad(format!("limit: {e}")),
            };
            let before = match query(&req, "before").map(|s| s.parse::<u64>()).transpose() {
                Ok(b) => b,
                Err(e) => return bad(format!("before: {e}")),
            };
            let filter = FlowFilter { pu: query(&req, "pu"), verdict: query(&req, "verdict"), since, limit, before };
            console.flows(&who, &filter).map(|f| serde_json::to_value(f).unwrap_or_default())
        }
        (Method::GET, "/v1/processingunits") | (Method::GET, "/v1/enforcers") => console.store.pus().map_err(Into::into).map(|pus| {
            let visible: Vec<_> = pus
                .into_iter()
                .filter(|p| p.namespace.parse::<NamespacePath>().is_ok_and(|ns| who.namespace.is_ancestor_or_self(&ns)))
                .collect();
            serde_json::to_value(visible).unwrap_or_default()
        }),
        (Method::GET, "/v1/audit") => {
            if who.role == Role::Editor && who.namespace.is_root() {
                console.store.audit_log().map(|l| serde_json::to_value(l).unwrap_or_default()).map_err(Into::into)
            } else {
                Err(ConsoleError::Forbidden("the audit log needs editor rights on /".into()))
            }
        }
        _ => return json(StatusCode::NOT_FOUND, serde_json::json!({ "error": format!("no route {path}") })),
    };
    match r {
        Ok(v) => json(StatusCode::OK, v),
        Err(e) => error(e),
    }
}

/// Serves until the task is dropped. A connection's error never stops the listener.
pub async fn serve<S: Store + 'static>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    console: Arc<Console<S>>,
    ca: Arc<Ca>,
    inject: crate::inject::Options,
) {
    let inject = Arc::new(inject);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let changes = Arc::new(watch::channel(console.revision().unwrap_or(0)).0);
    // Lapsed leases leave the registry (a quarter of the lease apart).
    {
        let (console, changes) = (console.clone(), changes.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(console.lease / 4);
            loop {
                tick.tick().await;
                match console.expire_leases() {
                    Ok(gone) if !gone.is_empty() => {
                        tracing::info!(?gone, "PU leases lapsed: removed from the registry");
                        changed(&console, &changes);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot expire PU leases"),
                }
            }
        });
    }
    // Other replicas' changes (etcd's watch) wake watchers like this one's do.
    if let Some(mut rx) = console.store.follow_revision() {
        let (console, changes) = (console.clone(), changes.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                changed(&console, &changes);
            }
        });
    }
    // The cluster's changes wake watchers like commits do.
    {
        let (console, changes) = (console.clone(), changes.clone());
        let mut rx = console.cluster.subscribe();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                changed(&console, &changes);
            }
        });
    }
    let stop = std::future::pending();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    segmesh_api::net::accept_loop(listener, "console", stop, |tcp, peer| {
        // A bounded number of connections: beyond it, closed at once.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "console connection refused: {MAX_CONNECTIONS} open");
            return;
        };
        let (acceptor, console, ca, changes, inject) = (
            acceptor.clone(),
            console.clone(),
            ca.clone(),
            changes.clone(),
            inject.clone(),
        );
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(t)) => t,
                _ => return tracing::debug!(%peer, "console TLS handshake failed"),
            };
            let remote = peer.ip();
            // A workload certificate, if the client presented one (enforcers renewing).
            let peer = segmesh_identity::peer_identity(tls.get_ref().1)
                .ok()
                .map(Arc::new);
            let svc = hyper::service::service_fn(move |req| {
                let (console, ca, changes, inject, peer) = (
                    console.clone(),
                    ca.clone(),
                    changes.clone(),
                    inject.clone(),
                    peer.clone(),
                );
                async move {
                    Ok::<_, Infallible>(
                        route(req, console, ca, changes, inject, peer, remote).await,
                    )
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(error = %e, "console connection");
            }
        });
    })
    .await
}
