//! `segmesh-proxy`: the enforcer of one workload (sidecar) or one host.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;
use segmesh_proxy::config::{
    ConfigSource, ConsoleConfig, ConsoleSource, LocalConfig, Mode, PuConfig, Settings,
};
use segmesh_proxy::enforcer::Enforcer;

#[derive(Parser)]
#[command(
    name = "segmesh-proxy",
    version,
    about = "segmesh enforcer: capture, decide, relay",
    group = clap::ArgGroup::new("source").required(true).args(["local_config", "console"]),
)]
struct Cli {
    /// The local configuration file (PU, identity, registry, policies, listeners; or a
    /// `console:` section).
    #[arg(long, env = "SEGMESH_LOCAL_CONFIG")]
    local_config: Option<PathBuf>,
    /// Console mode: the console's API, https://host:port. Policies, registry and
    /// identity then come from the console. Repeat it (or separate with commas) for
    /// console replicas: the enforcer watches one and moves to another when it stops
    /// answering.
    #[arg(long, env = "SEGMESH_CONSOLE", value_delimiter = ',', requires_all = ["console_ca", "bootstrap_token", "namespace"])]
    console: Vec<String>,
    /// The console's CA bundle (its data dir's `ca/bundle.crt`).
    #[arg(long, env = "SEGMESH_CONSOLE_CA")]
    console_ca: Option<PathBuf>,
    /// The bootstrap token (`segmeshctl token --role enforcer`), or `@path` to its file.
    #[arg(long, env = "SEGMESH_BOOTSTRAP_TOKEN", hide_env_values = true)]
    bootstrap_token: Option<String>,
    /// The PU's name (a pod's name in Kubernetes). Default in host mode: the host name.
    #[arg(long, env = "SEGMESH_PU_NAME")]
    name: Option<String>,
    /// The PU's namespace path (`/acme/shop`).
    #[arg(long, env = "SEGMESH_NAMESPACE")]
    namespace: Option<String>,
    /// A tag the PU claims (`key=value`); repeatable or comma separated. The console
    /// certifies only those its bootstrap token allows.
    #[arg(long = "tag", env = "SEGMESH_TAGS", value_delimiter = ',')]
    tags: Vec<String>,
    /// An address of the PU to register; repeatable. Default: every non-loopback
    /// address of the interfaces here.
    #[arg(long = "ip", env = "SEGMESH_IPS", value_delimiter = ',')]
    ips: Vec<IpAddr>,
    /// Where the last snapshot and the identity are kept.
    #[arg(long, env = "SEGMESH_STATE_DIR", default_value = "/var/lib/segmesh")]
    state_dir: PathBuf,
    /// Where flow records go besides the console: a path, or `-` for stdout.
    #[arg(long, env = "SEGMESH_FLOW_LOG")]
    flow_log: Option<String>,
    /// Do not close open connections that a new snapshot rejects.
    #[arg(long)]
    no_recheck_open: bool,
    /// Record every flow, not only those of policies with `log: true` (and rejections).
    #[arg(long, env = "SEGMESH_LOG_ALL_FLOWS")]
    log_all_flows: bool,
    /// `sidecar` (in a pod) or `host` (a host's own processes: the admin port on
    /// loopback, the PU named after the host by default).
    #[arg(long, env = "SEGMESH_MODE", value_enum)]
    mode: Option<Mode>,
    /// Threads that run connections. Default: 1 in sidecar mode (fewest wake-ups across
    /// cores; measured faster on the 2-core load-test machine), every core in host mode.
    #[arg(long, env = "SEGMESH_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// `SO_MARK` of every connection the enforcer opens (console mode; the capture
    /// init's `--enforcer-mark`). Decimal or 0x hex.
    #[arg(long, env = "SEGMESH_SOCKET_MARK", default_value = "0x1337", value_parser = parse_mark)]
    socket_mark: u32,
    /// On SIGTERM, how long open flows may finish before they are closed (a second
    /// SIGTERM exits at once).
    #[arg(long, env = "SEGMESH_DRAIN", default_value = "5s", value_parser = humantime::parse_duration)]
    drain: std::time::Duration,
    /// Hand allowed spliced flows to the kernel (BPF sockmap; console mode, the file's
    /// `sockmap:` otherwise): `off` (default: splice), `auto` where the kernel allows
    /// (else it says why and splices), `require` (or do not start).
    #[arg(long, env = "SEGMESH_SOCKMAP", value_enum, default_value = "off")]
    sockmap: segmesh_proxy::config::SockmapMode,
    /// Authenticated-only flows to a PU start in their tunnel stream and move to a
    /// spliced connection of their own after this many bytes of bulk, or of any while
    /// alone on their tunnel connection (console mode; the file's
    /// `move_after:` otherwise); `0`: their own connection from the first byte.
    #[arg(long, env = "SEGMESH_MOVE_AFTER", default_value_t = segmesh_proxy::config::DEFAULT_MOVE_AFTER)]
    move_after: u64,
    /// `plain` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "plain")]
    log_format: String,
    /// The application's probes to make on the kubelet's behalf (console mode; JSON, as
    /// the injector writes it: `{"/app-health/<container>/<kind>": {"httpGet": {"port":
    /// 8080, "path": "/healthz"}}}`).
    #[arg(long, env = "SEGMESH_APP_PROBES", value_parser = parse_probes)]
    app_probes: Option<segmesh_api::AppProbes>,
}

fn parse_probes(s: &str) -> Result<segmesh_api::AppProbes, String> {
    serde_json::from_str(s).map_err(|e| format!("not the probes' JSON: {e}"))
}

impl Cli {
    fn source(&self) -> anyhow::Result<ConfigSource> {
        if let Some(p) = &self.local_config {
            if let Some(m) = self.mode {
                let file = LocalConfig::load(p)?;
                if file.mode != m {
                    anyhow::bail!(
                        "--mode {m:?} but {} says mode {:?}: set it in one place",
                        p.display(),
                        file.mode
                    );
                }
            }
            return Ok(ConfigSource::File(p.clone()));
        }
        let need = |o: &Option<String>| o.clone().expect("clap requires it with --console");
        let mode = self.mode.unwrap_or_default();
        let name = match (&self.name, mode) {
            (Some(n), _) => n.clone(),
            (None, Mode::Host) => nix::unistd::gethostname()?
                .into_string()
                .map_err(|_| anyhow::anyhow!("the host name is not UTF-8; pass --name"))?,
            (None, Mode::Sidecar) => anyhow::bail!("--name is required (the PU's name)"),
        };
        let settings = Settings {
            flow_log: self.flow_log.clone(),
            recheck_open: !self.no_recheck_open,
            log_all_flows: self.log_all_flows,
            mode,
            socket_mark: self.socket_mark,
            app_probes: self.app_probes.clone().unwrap_or_default(),
            sockmap: self.sockmap,
            move_after: self.move_after,
            ..Settings::default()
        };
        Ok(ConfigSource::Console(Box::new(ConsoleSource {
            pu: PuConfig {
                name,
                namespace: need(&self.namespace),
                tags: self.tags.clone(),
            },
            console: ConsoleConfig {
                url: self.console.clone(),
                ca: self
                    .console_ca
                    .clone()
                    .expect("clap requires it with --console"),
                bootstrap_token: need(&self.bootstrap_token),
                state_dir: self.state_dir.clone(),
                ips: self.ips.clone(),
                repoll: std::time::Duration::from_secs(600),
            },
            settings,
        })))
    }
}

fn parse_mark(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("`{s}`: {e}"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mode = cli.mode.unwrap_or_default();
    let workers = cli.worker_threads.unwrap_or(match mode {
        Mode::Sidecar => 1,
        Mode::Host => std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    // One worker: every connection on one thread, no cross-thread wake-ups (a sidecar
    // shares its pod's CPU); more: a work-stealing pool.
    let rt = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()?
    };
    rt.block_on(run(cli, workers))
}

async fn run(cli: Cli, workers: usize) -> anyhow::Result<()> {
    // Every enforcer (console) or connection (enforcer) holds a descriptor: use what the
    // hard limit allows rather than the common soft 1,024.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    match &cli.local_config {
        Some(c) => tracing::info!(config = %c.display(), "starting"),
        None => tracing::info!(console = ?cli.console, "starting in console mode"),
    }
    // Freed relay chunks stay for the next ones (see alloc.rs).
    let kept = segmesh_proxy::alloc::keep_freed_memory(segmesh_proxy::alloc::KEEP);
    tracing::info!(workers, allocator_keeps_freed = kept, "runtime");
    let enforcer = Enforcer::start(cli.source()?).await?;
    tracing::info!(admin = %enforcer.admin_addr, "ready to enforce");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!(drain = ?cli.drain, "stopping: draining open flows (a second signal exits at once)");
    tokio::select! {
        _ = enforcer.shutdown(cli.drain) => {}
        _ = int.recv() => tracing::info!("second signal: exiting at once"),
        _ = term.recv() => tracing::info!("second signal: exiting at once"),
    }
    Ok(())
}
