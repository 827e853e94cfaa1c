//! Certificate rotation: renew at a fraction (2/3) of the certificate's life through an
//! issuer the caller supplies, and swap the TLS configurations atomically. Connections
//! hold the `Arc<TlsConfigs>` they started with, so established flows are untouched;
//! new connections take the new configuration.
//!
//! Each certificate gets fresh TLS session state (client cache, server cache, ticket
//! keys): a resumed session skips certificate verification and carries the identity
//! and tags of the session it resumes, so resumption must never cross a rotation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use rustls_pki_types::PrivateKeyDer;

use crate::IdentityError;
use crate::ca::{Ca, Issued, KeyAlgorithm, WorkloadKey, certs_from_pem};
use crate::spiffe::SpiffeId;
use crate::tls::{Sessions, TlsConfigs};

/// Signs this workload's CSRs (the console; a local CA in labs and tests).
pub trait CertIssuer: Send + Sync + 'static {
    fn issue(&self, csr_pem: &str) -> Result<Issued, IdentityError>;
}

/// A local CA as issuer, for one fixed identity and tags.
pub struct LocalIssuer {
    pub ca: Ca,
    pub id: SpiffeId,
    pub tags: Vec<String>,
    pub ttl: Duration,
}

impl CertIssuer for LocalIssuer {
    fn issue(&self, csr_pem: &str) -> Result<Issued, IdentityError> {
        self.ca.issue(csr_pem, &self.id, &self.tags, self.ttl)
    }
}

#[derive(Debug, Clone)]
pub struct ManagerOptions {
    /// Key algorithm of the workload's keys. Default ECDSA P-256.
    pub algorithm: KeyAlgorithm,
    /// Renew at this fraction of the certificate's life. Default 2/3.
    pub renew_fraction: f64,
    /// Shortest wait before retrying a failed renewal. Default 1 s.
    pub min_retry: Duration,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            algorithm: KeyAlgorithm::EcdsaP256,
            renew_fraction: 2.0 / 3.0,
            min_retry: Duration::from_secs(1),
        }
    }
}

struct Shared {
    current: RwLock<Arc<TlsConfigs>>,
    stop: Mutex<bool>,
    wake: Condvar,
    issuer: Box<dyn CertIssuer>,
    trust_domain: String,
    opts: ManagerOptions,
    renewals: AtomicU64,
    failures: AtomicU64,
}

/// Keeps a workload's certificate fresh. Dropping it stops the renewal thread.
pub struct IdentityManager {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A new key, a CSR, a certificate from the issuer, new configurations.
fn obtain(
    issuer: &dyn CertIssuer,
    trust_domain: &str,
    alg: KeyAlgorithm,
) -> Result<TlsConfigs, IdentityError> {
    let sessions = Sessions::new()?;
    let key = WorkloadKey::generate(alg)?;
    let issued = issuer.issue(&key.csr_pem("segmesh-workload")?)?;
    TlsConfigs::new(
        certs_from_pem(&issued.chain_pem)?,
        PrivateKeyDer::Pkcs8(key.der().into()),
        &certs_from_pem(&issued.bundle_pem)?,
        trust_domain,
        &sessions,
    )
}

impl Shared {
    fn obtain(&self) -> Result<TlsConfigs, IdentityError> {
        obtain(&*self.issuer, &self.trust_domain, self.opts.algorithm)
    }

    fn renew(&self) -> Result<(), IdentityError> {
        match self.obtain() {
            Ok(c) => {
                *self.current.write().expect("lock poisoned") = Arc::new(c);
                self.renewals.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Waits until `deadline` or a stop; true if stopped.
    fn sleep_until(&self, deadline: SystemTime) -> bool {
        let mut stopped = self.stop.lock().expect("lock poisoned");
        loop {
            if *stopped {
                return true;
            }
            let Ok(left) = deadline.duration_since(SystemTime::now()) else {
                return false;
            };
            stopped = self
                .wake
                .wait_timeout(stopped, left)
                .expect("lock poisoned")
                .0;
        }
    }

    fn run(&self) {
        let mut next = None;
        loop {
            let identity = self.current.read().expect("lock poisoned").identity.clone();
            let at = next
                .take()
                .unwrap_or_else(|| identity.renew_at(self.opts.renew_fraction));
            if self.sleep_until(at) {
                return;
            }
            if let Err(e) = self.renew() {
                // Keep the current certificate and retry: a tenth of what is left, at
                // least `min_retry`.
                let left = identity
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                let wait = (left / 10).max(self.opts.min_retry);
                tracing::warn!(error = %e, retry_in = ?wait, "certificate renewal failed");
                next = Some(SystemTime::now() + wait);
            } else {
                tracing::info!(
                    renewals = self.renewals.load(Ordering::Relaxed),
                    "certificate renewed"
                );
            }
        }
    }
}

impl IdentityManager {
    /// Obtains the first certificate (an error if that fails) and starts renewing.
    pub fn start(
        issuer: impl CertIssuer,
        trust_domain: &str,
        opts: ManagerOptions,
    ) -> Result<Self, IdentityError> {
        let first = obtain(&issuer, trust_domain, opts.algorithm)?;
        let shared = Shared {
            current: RwLock::new(Arc::new(first)),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            issuer: Box::new(issuer),
            trust_domain: trust_domain.to_owned(),
            opts,
            renewals: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        };
        let shared = Arc::new(shared);
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("segmesh-identity".into())
            .spawn(move || worker.run())
            .map_err(|e| IdentityError::Io("thread".into(), e))?;
        Ok(IdentityManager {
            shared,
            thread: Some(thread),
        })
    }

    /// The configurations to use for a new connection.
    pub fn current(&self) -> Arc<TlsConfigs> {
        self.shared.current.read().expect("lock poisoned").clone()
    }

    /// Renews now (e.g. after the console changed this workload's tags).
    pub fn renew_now(&self) -> Result<(), IdentityError> {
        self.shared.renew()
    }

    /// Successful renewals so far (the first certificate not counted).
    pub fn renewals(&self) -> u64 {
        self.shared.renewals.load(Ordering::Relaxed)
    }

    /// Failed renewal attempts so far.
    pub fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Relaxed)
    }
}

impl Drop for IdentityManager {
    fn drop(&mut self) {
        *self.shared.stop.lock().expect("lock poisoned") = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
