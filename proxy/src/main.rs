//! `segmesh-proxy`: the enforcer of one workload (sidecar) or one host.

use std::path::PathBuf;

use clap::Parser;
use segmesh_proxy::enforcer::Enforcer;

#[derive(Parser)]
#[command(
    name = "segmesh-proxy",
    version,
    about = "segmesh enforcer: capture, decide, relay"
)]
struct Cli {
    /// The local configuration file (PU, identity, registry, policies, listeners).
    #[arg(long, env = "SEGMESH_LOCAL_CONFIG")]
    local_config: PathBuf,
    /// `plain` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "plain")]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
    tracing::info!(config = %cli.local_config.display(), "starting");
    let enforcer = Enforcer::start(&cli.local_config).await?;
    tracing::info!(admin = %enforcer.admin_addr, "ready to enforce");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    drop(enforcer);
    Ok(())
}
