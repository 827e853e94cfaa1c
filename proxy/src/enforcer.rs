//! Start-up and the accept loops: the enforcer takes its configuration source, builds
//! the first snapshot (failing closed without one), binds every listener before serving
//! any, starts the snapshot source, and hands each accepted connection to its step of
//! the path ([`outbound`](crate::outbound), [`inbound`](crate::inbound), the tunnel
//! [server](crate::mesh::server)). [`Enforcer::shutdown`] drains.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::config::{ConfigError, ConfigSource, ConsoleSource, LocalConfig, Mode, Settings};
use crate::sink::{CONSOLE_QUEUE, FlowLog, Sinks};
use crate::snapshot::Snapshot;
use crate::socket;
use crate::source::{console, file};
use crate::state::Shared;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("cannot open the flow log: {0}")]
    FlowLog(#[source] std::io::Error),
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("sockmap: require, but BPF sockmap is unavailable: {0}")]
    Sockmap(#[source] crate::relay::sockmap::Unavailable),
}

/// What a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// REDIRECTed connections of our PU.
    Outbound,
    /// TPROXYed connections to our PU.
    Inbound,
    /// Mesh tunnel connections from peer enforcers.
    Tunnel,
}

/// A running enforcer. Dropping it stops every listener and source at once (open
/// connections finish on their own); [`shutdown`](Enforcer::shutdown) drains first.
pub struct Enforcer {
    pub shared: Arc<Shared>,
    /// Snapshot sources and the admin listener.
    tasks: Vec<JoinHandle<()>>,
    /// The accept loops (they end when draining starts).
    accepting: std::sync::Mutex<Vec<JoinHandle<()>>>,
    pub admin_addr: SocketAddr,
    /// Where each capture and tunnel listener was bound.
    pub listening: Vec<(Listener, SocketAddr)>,
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        let accepting = self.accepting.get_mut().expect("lock poisoned");
        for t in self.tasks.iter().chain(accepting.iter()) {
            t.abort();
        }
    }
}

fn ipv6_available() -> bool {
    Path::new("/proc/net/if_inet6").exists()
}

/// Every capture and tunnel listener to bind: per address family (IPv6 only where it
/// exists) the loopback outbound listener, the transparent inbound one and the tunnel;
/// or all three on one address (`listeners.address`), none transparent.
fn wanted(settings: &Settings) -> Vec<(SocketAddr, bool, Listener)> {
    let l = &settings.listeners;
    let families: Vec<(IpAddr, IpAddr, bool)> = match l.address {
        Some(a) => vec![(a, a, false)],
        None => {
            let mut f = vec![(
                Ipv4Addr::LOCALHOST.into(),
                Ipv4Addr::UNSPECIFIED.into(),
                true,
            )];
            if ipv6_available() {
                f.push((
                    Ipv6Addr::LOCALHOST.into(),
                    Ipv6Addr::UNSPECIFIED.into(),
                    true,
                ));
            }
            f
        }
    };
    families
        .into_iter()
        .flat_map(|(lo, any, transparent)| {
            [
                (SocketAddr::new(lo, l.outbound), false, Listener::Outbound),
                (
                    SocketAddr::new(any, l.inbound),
                    transparent,
                    Listener::Inbound,
                ),
                (SocketAddr::new(any, l.tunnel), false, Listener::Tunnel),
            ]
        })
        .collect()
}

/// Loads the kernel relay as the settings ask, saying what spliced flows will use.
fn start_kernel_relay(shared: &Shared) -> Result<(), Error> {
    use crate::relay::sockmap::{Sockmap, SockmapMode};
    let mode = shared.settings.sockmap;
    if mode == SockmapMode::Off {
        tracing::info!("sockmap: off; allowed plaintext flows are spliced in user space");
        return Ok(());
    }
    match Sockmap::load(shared.metrics.kernel_flows.clone()) {
        Ok(k) => {
            tracing::info!(
                "BPF sockmap loaded: the kernel moves allowed plaintext flows' bytes (authenticated-only and external), waking the enforcer only at their ends"
            );
            shared.set_kernel(k);
            Ok(())
        }
        Err(e) if mode == SockmapMode::Require => Err(Error::Sockmap(e)),
        Err(e) => {
            tracing::warn!(error = %e, "BPF sockmap unavailable; allowed plaintext flows are spliced in user space");
            Ok(())
        }
    }
}

fn bind(addr: SocketAddr, transparent: bool) -> Result<TcpListener, Error> {
    socket::listener(addr, transparent, 1024).map_err(|e| Error::Bind(addr, e))
}

impl Enforcer {
    /// Builds the first snapshot (failing closed if there is none) and binds every
    /// listener. File mode: from the file, then watching it. Console mode: from the
    /// snapshot cached on disk (or failing closed), then registering and watching.
    pub async fn start(source: ConfigSource) -> Result<Enforcer, Error> {
        // A file with a console section is console mode.
        let source = match source {
            ConfigSource::File(path) => match LocalConfig::load(&path)
                .ok()
                .and_then(|c| c.console_source())
            {
                Some(c) => ConfigSource::Console(c),
                None => ConfigSource::File(path),
            },
            console => console,
        };
        match source {
            ConfigSource::File(path) => {
                let initial = file::initial(&path);
                let settings = initial
                    .config
                    .as_ref()
                    .map(LocalConfig::settings)
                    .unwrap_or_default();
                let log = FlowLog::open(settings.flow_log.as_deref()).map_err(Error::FlowLog)?;
                let shared = Arc::new(Shared::new(settings, initial, Sinks::new(log, None)));
                let mut e = Enforcer::bind(shared.clone())?;
                e.tasks.push(tokio::spawn(file::watch(shared, path)));
                Ok(e)
            }
            ConfigSource::Console(c) => Enforcer::start_console(*c),
        }
    }

    fn start_console(c: ConsoleSource) -> Result<Enforcer, Error> {
        c.check()?;
        let client = console::client(&c.console)?.with_mark(c.settings.socket_mark);
        let state = console::State::load(&c.pu, &c.console);
        let initial = match state.build("cache") {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the cached snapshot is unusable; rejecting everything until the console answers");
                Snapshot::fail_closed()
            }
            None => {
                tracing::info!(
                    "no cached snapshot: rejecting everything until the console answers"
                );
                Snapshot::fail_closed()
            }
        };
        let log = FlowLog::open(c.settings.flow_log.as_deref()).map_err(Error::FlowLog)?;
        let (tx, rx) = tokio::sync::mpsc::channel(CONSOLE_QUEUE);
        let shared = Arc::new(Shared::new(c.settings, initial, Sinks::new(log, Some(tx))));
        let mut e = Enforcer::bind(shared.clone())?;
        e.tasks.extend(console::spawn(shared, client, state, rx));
        Ok(e)
    }

    /// Binds every listener (all before serving any, so a failed bind leaves nothing
    /// running) and starts accepting.
    fn bind(shared: Arc<Shared>) -> Result<Enforcer, Error> {
        if crate::relay::tls::ktls_available() {
            tracing::info!(
                "the kernel offers kernel TLS, but this build encrypts tunnels with rustls in user space"
            );
        } else {
            tracing::info!(
                "no kernel TLS (tls ULP) here: tunnels are encrypted with rustls in user space"
            );
        }
        start_kernel_relay(&shared)?;
        let settings = &shared.settings;
        let bound = wanted(settings)
            .into_iter()
            .map(|(addr, transparent, kind)| Ok((bind(addr, transparent)?, kind)))
            .collect::<Result<Vec<_>, Error>>()?;
        // The admin port on both families (where IPv6 exists): capture leaves it alone,
        // so a workload socket must not be able to take it over on the other family.
        let admin_ips: Vec<IpAddr> = match (settings.listeners.address, settings.mode) {
            (Some(a), _) => vec![a],
            (None, Mode::Sidecar) => {
                vec![Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()]
            }
            (None, Mode::Host) => vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
        };
        let v6 = ipv6_available();
        let mut admins = Vec::new();
        let mut admin_port = settings.listeners.admin;
        for ip in admin_ips.into_iter().filter(|ip| ip.is_ipv4() || v6) {
            let addr = SocketAddr::new(ip, admin_port);
            let l = bind(addr, false)?;
            // An ephemeral admin port (0) is the same number on both families.
            admin_port = l.local_addr().map_err(|e| Error::Bind(addr, e))?.port();
            admins.push(l);
        }
        let admin_addr = admins[0]
            .local_addr()
            .map_err(|e| Error::Bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0), e))?;

        let mut listening = Vec::new();
        let mut accepting = Vec::new();
        for (l, kind) in bound {
            let addr = l.local_addr().map_err(|e| Error::Bind(admin_addr, e))?;
            tracing::info!(%addr, listener = ?kind, "listener established");
            listening.push((kind, addr));
            accepting.push(tokio::spawn(accept(l, kind, shared.clone())));
        }
        let mut tasks: Vec<JoinHandle<()>> = admins
            .into_iter()
            .map(|l| tokio::spawn(crate::admin::serve(l, shared.clone())))
            .collect();
        // Captured UDP and echo requests (not with one listen address: no transparent
        // sockets there, and no capture of its own).
        if settings.listeners.address.is_none() {
            if let Err(e) = crate::queued::start(shared.clone(), settings.echo_queue) {
                tracing::warn!(error = %e, queue = settings.echo_queue, "cannot read the decision queue: ICMP echo and inbound UDP stay dropped");
            }
            for addr in crate::udp::addresses(settings.listeners.outbound, ipv6_available()) {
                let sock = crate::udp::listener(addr).map_err(|e| Error::Bind(addr, e))?;
                tracing::info!(%addr, "udp listener established");
                tasks.push(tokio::spawn(crate::udp::serve(shared.clone(), sock)));
            }
        }
        shared.set_bound();
        Ok(Enforcer {
            shared,
            tasks,
            accepting: std::sync::Mutex::new(accepting),
            admin_addr,
            listening,
        })
    }

    /// Where the first listener of `kind` was bound.
    pub fn address(&self, kind: Listener) -> Option<SocketAddr> {
        self.listening
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, a)| *a)
    }

    /// Serves a connection of our PU whose original destination is already known (what
    /// capture finds with `SO_ORIGINAL_DST`): for embedders that capture connections
    /// themselves, and the in-process tests. Returns once the flow is refused, or decided
    /// and connected: an allowed flow's bytes then move in a task of its own until it
    /// ends (its record is written then).
    pub async fn proxy_outbound(&self, stream: TcpStream, target: SocketAddr) {
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
        crate::outbound::proxy(self.shared.clone(), stream, peer, target).await
    }

    /// Graceful shutdown: stops accepting, lets the connections being served finish for
    /// up to `drain`, then closes the flows still open (close reason `shutdown`), and
    /// writes out every flow record.
    pub async fn shutdown(&self, drain: Duration) {
        let shared = self.shared.clone();
        shared.start_draining();
        let accepting = std::mem::take(&mut *self.accepting.lock().expect("lock poisoned"));
        for t in accepting {
            let _ = t.await;
        }
        let open = shared.active();
        tracing::info!(open, ?drain, "draining: no new connections");
        let deadline = tokio::time::Instant::now() + drain;
        if !shared.wait_idle(deadline).await {
            let stopped = shared.open.stop_all();
            tracing::info!(stopped, "drain period over: closing the flows still open");
            // Their relays end at once; give them a moment to write their records.
            let _ = shared
                .wait_idle(tokio::time::Instant::now() + Duration::from_secs(1))
                .await;
        }
        shared.sinks().flush(Duration::from_secs(5)).await;
        tracing::info!("stopped");
    }
}

/// Accepts until draining starts, with the one accept loop (see
/// [`segmesh_api::net::accept_loop`]).
async fn accept(listener: TcpListener, kind: Listener, shared: Arc<Shared>) {
    let name = match kind {
        Listener::Outbound => "outbound",
        Listener::Inbound => "inbound",
        Listener::Tunnel => "tunnel",
    };
    let stop = shared.stopping();
    segmesh_api::net::accept_loop(listener, name, stop, |stream, peer| {
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        // One spawn per kind: a task's allocation is its future's size, and one async
        // block over the three would make every task as large as the largest (a tunnel
        // port connection took an outbound flow's 6.5 KiB instead of its own 2.9 KiB).
        match kind {
            Listener::Outbound => tokio::spawn(crate::outbound::serve(shared, stream, peer)),
            Listener::Inbound => tokio::spawn(crate::inbound::serve(shared, stream, peer)),
            Listener::Tunnel => tokio::spawn(crate::mesh::server::serve(shared, stream, peer)),
        };
    })
    .await
}
