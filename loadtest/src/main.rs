//! `segmesh-loadtest`: builds its own namespace topology and measures segmesh against a
//! baseline taken in the same run on the same topology. Every load loop is bounded in
//! bytes and time and stops by itself; traffic stays inside the namespaces it creates.
//!
//! Scenarios so far: `bulk` (one stream, direct veth TCP against the same stream
//! through the client's enforcer).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use segmesh_iptables_init::{apply, rules};
use segmesh_testkit::{Host, Topology, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(
    name = "segmesh-loadtest",
    about = "segmesh load tests (needs root: network namespaces)"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// One bulk TCP stream: direct, then through the client's enforcer (spliced).
    Bulk {
        /// Bytes per run.
        #[arg(long, default_value_t = 4 << 30)]
        bytes: u64,
        /// Stop a run after this many seconds even if not all bytes moved.
        #[arg(long, default_value_t = 30)]
        max_seconds: u64,
        /// Runs of each kind (the best is reported, and all are listed).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// The enforcer binary (default: `segmesh-proxy` beside this one).
        #[arg(long)]
        proxy: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn in_ns<T: Send + 'static>(
    h: &Host,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    h.thread(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    })
}

/// Receives until EOF; returns (bytes, seconds from the first byte to EOF).
async fn sink(addr: SocketAddr, limit: Duration) -> anyhow::Result<(u64, f64)> {
    let l = TcpListener::bind(addr).await?;
    let (mut s, _) = tokio::time::timeout(limit, l.accept())
        .await
        .context("no connection")??;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut start = None;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .context("receive timed out")??;
        if n == 0 {
            break;
        }
        start.get_or_insert_with(Instant::now);
        total += n as u64;
    }
    Ok((total, start.map_or(0.0, |s| s.elapsed().as_secs_f64())))
}

async fn source(to: SocketAddr, bytes: u64, limit: Duration) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(to).await?;
    let buf = vec![0x5au8; 1 << 20];
    let deadline = Instant::now() + limit;
    let mut sent = 0u64;
    while sent < bytes && Instant::now() < deadline {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await?;
        sent += n as u64;
    }
    s.shutdown().await?;
    Ok(())
}

fn run_bulk(topo: &Topology, port: u16, bytes: u64, limit: Duration) -> anyhow::Result<f64> {
    let (client, server) = (topo.host("client"), topo.host("server"));
    let addr = SocketAddr::new(server.ip4.into(), port);
    let rx = in_ns(server, sink(addr, limit + Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(100));
    in_ns(client, source(addr, bytes, limit))
        .join()
        .expect("client thread")?;
    let (got, secs) = rx.join().expect("server thread")?;
    if got == 0 || secs <= 0.0 {
        bail!("nothing arrived");
    }
    Ok(got as f64 * 8.0 / secs / 1e9)
}

fn http_ok(h: &Host, path: &'static str) -> bool {
    h.thread(move || {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect("127.0.0.1:15020") else {
            return false;
        };
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.starts_with("HTTP/1.1 200")
    })
    .join()
    .unwrap_or(false)
}

fn bulk(
    bytes: u64,
    max_seconds: u64,
    repeat: usize,
    proxy: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let proxy = match proxy {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("segmesh-proxy"),
    };
    if !proxy.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p segmesh-proxy) or pass --proxy",
            proxy.display()
        );
    }
    let limit = Duration::from_secs(max_seconds);
    let topo = Topology::new(&["client", "server"]);
    let client = topo.host("client").clone();
    let server = topo.host("server").clone();

    let mut direct = Vec::new();
    for i in 0..repeat {
        direct.push(run_bulk(&topo, 9000 + i as u16, bytes, limit)?);
    }

    let dir = std::env::temp_dir().join(format!("segmesh-loadtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(
        dir.join("policies.yaml"),
        format!(
            "kind: ExternalNetwork\nname: server\nentries: [\"{}\"]\n---\nkind: NetworkPolicy\nname: to-server\naction: Allow\nmode: Outgoing\nsubject: [[app=client]]\nobject: [[ext:name=server]]\n",
            server.ip4
        ),
    )?;
    let cfg = dir.join("enforcer.yaml");
    std::fs::write(
        &cfg,
        "pu: {name: client, namespace: /, tags: [app=client]}\npolicies: [policies.yaml]\n",
    )?;
    client
        .thread(|| {
            let c = rules::Config::default();
            apply::apply(&c, rules::Family::V4).and_then(|_| apply::apply(&c, rules::Family::V6))
        })
        .join()
        .expect("capture thread")?;
    let mut cmd = client.command("setpriv");
    cmd.args([
        "--reuid=1337",
        "--regid=1337",
        "--clear-groups",
        "--inh-caps=+net_admin,+net_raw",
        "--ambient-caps=+net_admin,+net_raw",
        "--",
    ])
    .arg(&proxy)
    .arg("--local-config")
    .arg(&cfg)
    .env("RUST_LOG", "warn");
    topo.spawn(cmd);
    wait_until("the enforcer", Duration::from_secs(20), || {
        http_ok(&client, "/ready")
    });

    let mut through = Vec::new();
    for i in 0..repeat {
        through.push(run_bulk(&topo, 9100 + i as u16, bytes, limit)?);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let (d, t) = (best(&direct), best(&through));
    if json {
        println!(
            "{}",
            serde_json::json!({"scenario": "bulk", "bytes": bytes, "direct_gbps": direct, "enforcer_gbps": through, "ratio": t / d})
        );
    } else {
        println!(
            "bulk, one stream, {} MiB per run, best of {repeat} (all runs in brackets)",
            bytes >> 20
        );
        println!("  direct veth TCP             {d:6.2} Gbit/s  {direct:.2?}");
        println!("  through one enforcer        {t:6.2} Gbit/s  {through:.2?}");
        println!("  ratio                       {:6.3}", t / d);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !segmesh_testkit::netns_enabled() {
        return Ok(());
    }
    match cli.scenario {
        Scenario::Bulk {
            bytes,
            max_seconds,
            repeat,
            proxy,
            json,
        } => bulk(bytes, max_seconds, repeat, proxy, json),
    }
}
