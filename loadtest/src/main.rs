//! `segmesh-loadtest`: builds its own namespace topology and measures segmesh against a
//! baseline taken in the same run on the same topology. Every load loop is bounded in
//! bytes and time and stops by itself; traffic stays inside the namespaces it creates.
//!
//! Scenarios so far: `bulk` (one stream, direct veth TCP against the same stream
//! through the client's enforcer) and `tunnel` (PU to PU through both enforcers'
//! mesh tunnel, encrypted and authenticated-only: bulk throughput and new connections
//! per second, against direct veth TCP) and `fanout` (a console on loopback and N
//! simulated enforcers watching it: time from commit to each holding the new snapshot).

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

mod fanout;
mod report;
mod suite;

#[derive(Parser)]
#[command(
    name = "segmesh-loadtest",
    about = "segmesh load tests (needs root: network namespaces)"
)]
struct Cli {
    /// Without a scenario: run every scenario and write report.json, report.md and SVG
    /// charts. `--quick` runs each one small (a smoke run; its figures are no
    /// measurements).
    #[arg(long)]
    quick: bool,
    /// Where the report goes.
    #[arg(long, default_value = "loadtest-report")]
    out: PathBuf,
    /// The enforcer binary (default: `segmesh-proxy` beside this one).
    #[arg(long)]
    proxy: Option<PathBuf>,
    /// The console binary (default: `segmesh-control` beside this one).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Install socat (the relay baseline) with apt-get if it is missing.
    #[arg(long)]
    install_relay: bool,
    #[command(subcommand)]
    scenario: Option<Scenario>,
}

#[derive(Subcommand)]
enum Scenario {
    /// PU to PU through the mesh tunnel: throughput and connections/s, both data modes.
    Tunnel {
        /// Bytes per bulk run.
        #[arg(long, default_value_t = 2 << 30)]
        bytes: u64,
        /// Connections per rate run (each: connect, read a greeting, close).
        #[arg(long, default_value_t = 2000)]
        connections: u32,
        /// Stop any run after this many seconds.
        #[arg(long, default_value_t = 30)]
        max_seconds: u64,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        #[arg(long)]
        proxy: Option<PathBuf>,
    },
    /// Push fan-out: a console on loopback and N simulated enforcers (long-poll
    /// watchers); time from commit to each watcher holding the new snapshot.
    Fanout {
        /// Watcher counts, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "50,100,1000")]
        clients: Vec<usize>,
        /// Commits per count.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// The console binary (default: `segmesh-control` beside this one).
        #[arg(long)]
        control: Option<PathBuf>,
    },
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

/// The enforcer binary: the given path, or `segmesh-proxy` beside this one.
fn proxy_path(proxy: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let p = match proxy {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("segmesh-proxy"),
    };
    if !p.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p segmesh-proxy) or pass --proxy",
            p.display()
        );
    }
    Ok(p)
}

/// Waits until the enforcer in `host` no longer answers on its admin port.
fn wait_admin_down(host: &Host) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_ok(host, "/healthz") {
        if Instant::now() > deadline {
            bail!("the enforcer in {} does not stop", host.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Capture rules (both families) and an enforcer as uid 1337 in `host`; waits for it
/// and returns its pid.
fn start_enforcer(
    topo: &Topology,
    host: &Host,
    proxy: &std::path::Path,
    cfg: &std::path::Path,
) -> anyhow::Result<u32> {
    host.thread(|| {
        let c = rules::Config::default();
        apply::apply(&c, rules::Family::V4).and_then(|_| apply::apply(&c, rules::Family::V6))
    })
    .join()
    .expect("capture thread")?;
    let mut cmd = host.command("setpriv");
    cmd.args([
        "--reuid=1337",
        "--regid=1337",
        "--clear-groups",
        "--inh-caps=+net_admin,+net_raw",
        "--ambient-caps=+net_admin,+net_raw",
        "--",
    ])
    .arg(proxy)
    .arg("--local-config")
    .arg(cfg)
    .env("RUST_LOG", "warn");
    let pid = topo.spawn(cmd);
    wait_until("an enforcer", Duration::from_secs(20), || {
        http_ok(host, "/ready")
    });
    Ok(pid)
}

fn bulk(
    bytes: u64,
    max_seconds: u64,
    repeat: usize,
    proxy: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let proxy = proxy_path(proxy)?;
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
    start_enforcer(&topo, &client, &proxy, &cfg)?;

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

/// Greets connections until `limit` passes.
async fn greeter(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).await?;
    let until = tokio::time::Instant::now() + limit;
    while let Ok(Ok((mut s, _))) = tokio::time::timeout_at(until, l.accept()).await {
        tokio::spawn(async move {
            let _ = s.write_all(b"hello\n").await;
        });
    }
    Ok(())
}

/// Sequential connections (connect, read the greeting, close): connections per second.
fn run_rate(topo: &Topology, port: u16, n: u32, limit: Duration) -> anyhow::Result<f64> {
    let (client, server) = (topo.host("client"), topo.host("server"));
    let addr = SocketAddr::new(server.ip4.into(), port);
    let _srv = in_ns(
        server,
        greeter(
            SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port),
            limit + Duration::from_secs(5),
        ),
    );
    std::thread::sleep(Duration::from_millis(100));
    in_ns(client, async move {
        let start = Instant::now();
        let mut done = 0u32;
        let mut b = [0u8; 6];
        while done < n && start.elapsed() < limit {
            let mut s = TcpStream::connect(addr).await?;
            s.read_exact(&mut b).await?;
            done += 1;
        }
        Ok(f64::from(done) / start.elapsed().as_secs_f64())
    })
    .join()
    .expect("client thread")
}

fn tunnel(
    bytes: u64,
    connections: u32,
    max_seconds: u64,
    repeat: usize,
    proxy: Option<PathBuf>,
) -> anyhow::Result<()> {
    use segmesh_identity::{Ca, KeyAlgorithm, SpiffeId, WorkloadKey};
    let proxy = proxy_path(proxy)?;
    let limit = Duration::from_secs(max_seconds);
    let topo = Topology::new(&["client", "server"]);
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let runs = |f: &dyn Fn(usize) -> anyhow::Result<f64>| {
        (0..repeat).map(f).collect::<anyhow::Result<Vec<f64>>>()
    };

    // Baselines first, on the same topology, before any capture rule exists.
    let direct_bulk = runs(&|i| run_bulk(&topo, 8000 + i as u16, bytes, limit))?;
    let direct_rate = runs(&|i| run_rate(&topo, 8100 + i as u16, connections, limit))?;

    let dir = std::env::temp_dir().join(format!("segmesh-loadtest-tunnel-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let ca = Ca::new_root("segmesh.local", KeyAlgorithm::EcdsaP256)?;
    let registry: String = ["client", "server"]
        .iter()
        .map(|n| {
            format!(
                "  - {{name: {n}, namespace: /lt, ips: [{}]}}\n",
                topo.host(n).ip4
            )
        })
        .collect();
    std::fs::write(
        dir.join("policies.yaml"),
        "kind: NetworkPolicy\nname: encrypted\nnamespace: /lt\naction: Allow\nmode: Bidirectional\nsubject: [[app=client]]\nobject: [[app=server]]\nports: [tcp/9000-9999]\n---\n\
         kind: NetworkPolicy\nname: plain\nnamespace: /lt\naction: Allow\nmode: Bidirectional\nsubject: [[app=client]]\nobject: [[app=server]]\nports: [tcp/10000-10999]\nencrypt: false\n",
    )?;
    for name in ["client", "server"] {
        let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256)?;
        let id = SpiffeId::new("segmesh.local", "/lt", name)?;
        let issued = ca.issue(
            &key.csr_pem(name)?,
            &id,
            &[format!("app={name}")],
            Duration::from_secs(3600),
        )?;
        for f in segmesh_identity::ca::save_issued(&dir.join(name), &issued, &key)? {
            std::os::unix::fs::chown(&f, Some(1337), Some(1337))?;
        }
        let cfg = dir.join(format!("{name}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "pu: {{name: {name}, namespace: /lt, tags: [app={name}]}}\nidentity: {{cert: {name}.crt, key: {name}.key, bundle: {name}.bundle.crt}}\nregistry:\n{registry}policies: [policies.yaml]\n"
            ),
        )?;
        let host = topo.host(name).clone();
        start_enforcer(&topo, &host, &proxy, &cfg)?;
    }
    let tls_bulk = runs(&|i| run_bulk(&topo, 9000 + i as u16, bytes, limit))?;
    let plain_bulk = runs(&|i| run_bulk(&topo, 10000 + i as u16, bytes, limit))?;
    let tls_rate = runs(&|i| run_rate(&topo, 9100 + i as u16, connections, limit))?;
    let plain_rate = runs(&|i| run_rate(&topo, 10100 + i as u16, connections, limit))?;
    let _ = std::fs::remove_dir_all(&dir);

    let (db, dr) = (best(&direct_bulk), best(&direct_rate));
    println!("PU to PU through both enforcers' mesh tunnel; best of {repeat} (runs in brackets)");
    println!("bulk, one stream, {} MiB per run:", bytes >> 20);
    println!("  direct veth TCP              {db:7.2} Gbit/s  {direct_bulk:.2?}");
    println!(
        "  tunnel, encrypted (rustls)   {:7.2} Gbit/s  {tls_bulk:.2?}  ratio {:.3}",
        best(&tls_bulk),
        best(&tls_bulk) / db
    );
    println!(
        "  tunnel, authenticated-only   {:7.2} Gbit/s  {plain_bulk:.2?}  ratio {:.3}",
        best(&plain_bulk),
        best(&plain_bulk) / db
    );
    println!(
        "new connections, sequential, up to {connections} per run (connect, greeting, close):"
    );
    println!("  direct veth TCP              {dr:7.0} /s  {direct_rate:.0?}");
    println!(
        "  tunnel, encrypted            {:7.0} /s  {tls_rate:.0?}  ratio {:.3}",
        best(&tls_rate),
        best(&tls_rate) / dr
    );
    println!(
        "  tunnel, authenticated-only   {:7.0} /s  {plain_rate:.0?}  ratio {:.3}",
        best(&plain_rate),
        best(&plain_rate) / dr
    );
    Ok(())
}

fn fanout_report(clients: &[usize], rounds: usize, control: Option<PathBuf>) -> anyhow::Result<()> {
    let control = match control {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("segmesh-control"),
    };
    if !control.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p segmesh-control) or pass --control",
            control.display()
        );
    }
    let results = fanout::run(&control, clients, rounds, Duration::from_secs(30))?;
    println!("push fan-out: commit → every watcher holds the new snapshot ({rounds} commits each)");
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>8}",
        "watchers", "p50", "p99", "max", "missed"
    );
    for r in &results {
        println!(
            "{:>8} {:>10.1?} {:>10.1?} {:>10.1?} {:>8}",
            r.clients,
            r.quantile(0.5),
            r.quantile(0.99),
            r.quantile(1.0),
            r.missed
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !segmesh_testkit::netns_enabled() {
        return Ok(());
    }
    // 10,000 idle connections need descriptors: as root, lift the limit for this
    // process and the enforcers it starts.
    {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let want = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(1 << 20)
            .min(1 << 20);
        if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
            fanout::raise_nofile();
        }
        if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
            if soft < 65536 {
                eprintln!(
                    "note: only {soft} file descriptors; the idle-connection scenario may fail"
                );
            }
        }
    }
    let Some(scenario) = cli.scenario else {
        let sizes = if cli.quick {
            suite::Sizes::quick()
        } else {
            suite::Sizes::full()
        };
        let control = match cli.control {
            Some(p) => p,
            None => std::env::current_exe()?.with_file_name("segmesh-control"),
        };
        let started = Instant::now();
        let mut figures = suite::run(&sizes, cli.proxy, &control, cli.install_relay)?;
        let target_dir = std::env::current_exe()?
            .parent()
            .and_then(|p| p.parent())
            .map(std::path::Path::to_owned)
            .unwrap_or_default();
        figures["decision"] = report::decision_bench(&target_dir);
        figures["seconds"] = serde_json::json!(started.elapsed().as_secs_f64());
        let title = if cli.quick {
            "segmesh load test (quick: every scenario small; not a measurement)"
        } else {
            "segmesh load test"
        };
        report::write(&cli.out, &figures, title)?;
        println!("{}", std::fs::read_to_string(cli.out.join("report.md"))?);
        eprintln!(
            "wrote {} (report.json, report.md, *.svg) in {:.0} s",
            cli.out.display(),
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    };
    match scenario {
        Scenario::Bulk {
            bytes,
            max_seconds,
            repeat,
            proxy,
            json,
        } => bulk(bytes, max_seconds, repeat, proxy, json),
        Scenario::Tunnel {
            bytes,
            connections,
            max_seconds,
            repeat,
            proxy,
        } => tunnel(bytes, connections, max_seconds, repeat, proxy),
        Scenario::Fanout {
            clients,
            rounds,
            control,
        } => fanout_report(&clients, rounds, control),
    }
}
