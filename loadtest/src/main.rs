//! `segmesh-loadtest`: builds its own namespace topology and measures segmesh against a
//! baseline taken in the same run on the same topology. Every load loop is bounded in
//! bytes and time and stops by itself; traffic stays inside the namespaces it creates.
//!
//! Without a scenario it runs them all ([`suite`]) and writes the report ([`report`]);
//! `fanout` alone measures push fan-out (a console on loopback and N simulated
//! enforcers watching it).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, Subcommand};
use segmesh_iptables_init::{apply, rules};
use segmesh_testkit::{Host, Topology, wait_until};

mod clients;
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
    /// The enforcers' `sockmap:` setting: `off` (the default: splice in user space),
    /// `auto` (the kernel relay where it loads) or `require`, to compare the two in
    /// alternating runs.
    #[arg(long, default_value = "off")]
    sockmap: String,
    /// Record the enforcers with `perf record -g` during each scenario of each mesh
    /// path, one file per scenario in this directory (`perf report -i FILE`); the
    /// figures of such a run are not measurements (perf costs the enforcers CPU).
    /// `SEGMESH_PERF_CALL_GRAPH=dwarf` records call graphs through Rust code too.
    #[arg(long)]
    perf: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Option<Scenario>,
}

#[derive(Subcommand)]
enum Scenario {
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
}

fn in_ns<T: Send + 'static>(
    h: &Host,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    h.run(f)
}

/// The body of a 200 answer to `GET path` from the enforcer's admin port in `h`.
fn http_get(h: &Host, path: &'static str) -> Option<String> {
    h.thread(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:15020").ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let body = out.strip_prefix("HTTP/1.1 200")?;
        Some(
            body.split_once("\r\n\r\n")
                .map_or("", |(_, b)| b)
                .to_owned(),
        )
    })
    .join()
    .ok()
    .flatten()
}

fn http_ok(h: &Host, path: &'static str) -> bool {
    http_get(h, path).is_some()
}

/// The enforcer's heap in use (`segmesh_heap_in_use_bytes`) in `h`, in bytes.
fn heap_in_use(h: &Host) -> Option<f64> {
    metric(h, "segmesh_heap_in_use_bytes")
}

/// The value of the enforcer's metric `name` (no labels) in `h`, if it has it.
fn metric(h: &Host, name: &str) -> Option<f64> {
    let body = http_get(h, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
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

/// Capture rules (both families) and an enforcer as uid 1337 in `host`; waits for it
/// and returns its pid.
fn start_enforcer(
    topo: &Topology,
    host: &Host,
    proxy: &std::path::Path,
    cfg: &std::path::Path,
    exclude_ports: &[u16],
) -> anyhow::Result<u32> {
    let exclude = exclude_ports.to_vec();
    host.thread(move || {
        let c = rules::Config {
            exclude_outbound_ports: exclude.clone(),
            exclude_inbound_ports: exclude,
            ..rules::Config::default()
        };
        apply::apply(&c, rules::Family::V4).and_then(|_| apply::apply(&c, rules::Family::V6))
    })
    .join()
    .expect("capture thread")?;
    let mut cmd = host.enforcer_command(proxy);
    cmd.arg("--local-config").arg(cfg).env("RUST_LOG", "warn");
    let pid = topo.spawn(cmd);
    wait_until("an enforcer", Duration::from_secs(20), || {
        http_ok(host, "/ready")
    });
    Ok(pid)
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
    let mut results = Vec::new();
    for setup in [
        fanout::Setup::Redb,
        fanout::Setup::Etcd { replicas: 1 },
        fanout::Setup::Etcd { replicas: 2 },
    ] {
        results.extend(fanout::run(
            &control,
            setup,
            clients,
            rounds,
            Duration::from_secs(30),
        )?);
    }
    println!("push fan-out: commit → every watcher holds the new snapshot ({rounds} commits each)");
    println!(
        "{:>18} {:>8} {:>10} {:>10} {:>10} {:>8} {:>12}",
        "consoles", "watchers", "p50", "p99", "max", "missed", "commit p50"
    );
    for r in &results {
        println!(
            "{:>18} {:>8} {:>10.1?} {:>10.1?} {:>10.1?} {:>8} {:>12.1?}",
            r.setup.name(),
            r.clients,
            r.quantile(0.5),
            r.quantile(0.99),
            r.quantile(1.0),
            r.missed,
            r.commit_p50()
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
        if !["auto", "require", "off"].contains(&cli.sockmap.as_str()) {
            bail!("--sockmap is auto, require or off");
        }
        let mut figures = suite::run(
            &sizes,
            cli.proxy,
            &control,
            cli.install_relay,
            &cli.sockmap,
            cli.perf,
        )?;
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
        Scenario::Fanout {
            clients,
            rounds,
            control,
        } => fanout_report(&clients, rounds, control),
    }
}
