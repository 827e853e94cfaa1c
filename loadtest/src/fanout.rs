//! Push fan-out: console processes on loopback and N simulated enforcers, each holding
//! the same long-poll watch an enforcer holds (`segmesh_api::client::Client`, one TLS
//! connection per request). Each round commits a change and measures, for every
//! watcher, the time from just before the commit request to the moment its long-poll
//! returned the new revision. Three setups: one console on its redb file; one console on
//! etcd; two console replicas on the same etcd with the watchers spread over both (the
//! commit made on the first: the second learns of it through etcd's watch).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use segmesh_api::client::Client;
use tokio::sync::mpsc;

/// Where the consoles keep their state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    Redb,
    /// `replicas` consoles on one etcd member on loopback.
    Etcd {
        replicas: usize,
    },
}

impl Setup {
    pub fn name(&self) -> String {
        match self {
            Setup::Redb => "1 console, redb".into(),
            Setup::Etcd { replicas: 1 } => "1 console, etcd".into(),
            Setup::Etcd { replicas } => format!("{replicas} replicas, etcd"),
        }
    }
}

/// One N: the per-watcher latencies of every round.
pub struct FanoutResult {
    pub setup: Setup,
    pub clients: usize,
    pub latencies: Vec<Duration>,
    /// Watchers that had not seen a round's revision by its deadline.
    pub missed: usize,
    /// How long each round's commit request took (the store's write: on etcd, a quorum
    /// write to disk), part of every latency above.
    pub commits: Vec<Duration>,
}

impl FanoutResult {
    /// The median commit request.
    pub fn commit_p50(&self) -> Duration {
        let mut v = self.commits.clone();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }

    pub fn quantile(&self, q: f64) -> Duration {
        let mut v = self.latencies.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v[((v.len() - 1) as f64 * q).round() as usize]
    }
}

/// Raises this process's open-files soft limit to its hard limit (1,000 watchers need
/// more than the common 1,024).
pub fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

struct Console {
    child: std::process::Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client(c: &Console, token: &str) -> anyhow::Result<Client> {
    let ca = std::fs::read_to_string(c.dir.join("ca/bundle.crt"))?;
    Ok(Client::new(&c.url, token, &ca)?)
}

fn start_console(control: &Path, n: usize, store: &[String]) -> anyhow::Result<Console> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = std::env::temp_dir().join(format!("segmesh-fanout-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let child = std::process::Command::new(control)
        .arg("--data-dir")
        .arg(&dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(store)
        .env("RUST_LOG", "warn")
        .spawn()
        .with_context(|| control.display().to_string())?;
    let c = Console {
        child,
        dir,
        url: format!("https://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(c.dir.join("admin.token").exists()
        && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
    {
        if Instant::now() > deadline {
            bail!("the console did not start within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(c)
}

const POLICY: &str = "kind: NetworkPolicy\nname: fanout\nnamespace: /acme/shop\naction: Allow\nmode: Bidirectional\nsubject: [[app=web]]\nobject: [[app=api]]\n";

async fn publish(admin: &Client, round: usize) -> anyhow::Result<()> {
    let text = format!("{POLICY}ports: [tcp/{}]\n", 10000 + round);
    let body = serde_json::json!({ "files": [{ "name": "fanout.yaml", "text": text }] });
    admin
        .call::<serde_json::Value>(
            "POST",
            "/v1/apply",
            Some(body.to_string().into_bytes()),
            Duration::from_secs(10),
        )
        .await?;
    Ok(())
}

/// Runs `rounds` commits (on the first console) against `clients` watchers spread
/// over `consoles`.
async fn measure(
    setup: Setup,
    consoles: &[Console],
    admin: &Client,
    boot: &str,
    clients: usize,
    rounds: usize,
    round_limit: Duration,
) -> anyhow::Result<FanoutResult> {
    let watchers = consoles
        .iter()
        .map(|c| client(c, boot).map(Arc::new))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, u64, Instant)>();
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let (w, tx) = (watchers[i % watchers.len()].clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let mut since: Option<u64> = None;
            loop {
                let path = match since {
                    None => format!("/v1/snapshot?pu=/acme/shop:w{i}"),
                    Some(r) => format!("/v1/snapshot?pu=/acme/shop:w{i}&since={r}&wait=30"),
                };
                match w
                    .call::<segmesh_api::Snapshot>("GET", &path, None, Duration::from_secs(40))
                    .await
                {
                    Ok(s) => {
                        since = Some(s.revision);
                        if tx.send((i, s.revision, Instant::now())).is_err() {
                            return;
                        }
                    }
                    // Counted as missed if it never recovers within the round.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }));
    }
    // Every watcher holds the current revision and waits.
    let mut seen = vec![0u64; clients];
    let mut connected = vec![false; clients];
    let first_deadline = Instant::now() + round_limit;
    let mut synced = 0;
    while synced < clients {
        let left = first_deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((i, r, _))) => {
                if !connected[i] {
                    connected[i] = true;
                    synced += 1;
                }
                seen[i] = seen[i].max(r);
            }
            _ => bail!("only {synced} of {clients} watchers connected within {round_limit:?}"),
        }
    }
    // Let every watcher park its long-poll again.
    tokio::time::sleep(Duration::from_millis(200 + clients as u64)).await;
    let mut latencies = Vec::with_capacity(clients * rounds);
    let mut commits = Vec::with_capacity(rounds);
    let mut missed = 0;
    for round in 0..rounds {
        publish(admin, round).await?;
        let t0 = Instant::now();
        admin
            .call::<serde_json::Value>("POST", "/v1/commit", None, Duration::from_secs(10))
            .await?;
        commits.push(t0.elapsed());
        let target = seen.iter().copied().max().unwrap_or(0) + 1;
        let mut done = 0;
        let deadline = t0 + round_limit;
        while done < clients {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some((i, r, at))) => {
                    if r >= target && seen[i] < target {
                        latencies.push(at - t0);
                        done += 1;
                    }
                    seen[i] = seen[i].max(r);
                }
                _ => break,
            }
        }
        missed += clients - done;
        tokio::time::sleep(Duration::from_millis(200 + clients as u64)).await;
    }
    for t in tasks {
        t.abort();
    }
    Ok(FanoutResult {
        setup,
        clients,
        latencies,
        missed,
        commits,
    })
}

/// Starts the consoles of `setup` (and etcd for it), then measures each N in
/// `clients`.
pub fn run(
    control: &Path,
    setup: Setup,
    clients: &[usize],
    rounds: usize,
    round_limit: Duration,
) -> anyhow::Result<Vec<FanoutResult>> {
    raise_nofile();
    let etcd;
    let kek = std::env::temp_dir().join(format!("segmesh-fanout-kek-{}", std::process::id()));
    let consoles = match setup {
        Setup::Redb => vec![start_console(control, 0, &[])?],
        Setup::Etcd { replicas } => {
            etcd = segmesh_testkit::etcd::EtcdCluster::start(1);
            std::fs::write(&kek, "6f".repeat(32))?;
            let args = vec![
                "--store".to_owned(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                etcd.endpoints().join(","),
                "--kek-file".into(),
                kek.display().to_string(),
            ];
            // One after the other: the first creates the CA and the admin token.
            (0..replicas)
                .map(|n| start_console(control, n, &args))
                .collect::<anyhow::Result<Vec<_>>>()?
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let c = &consoles[0];
        let token = std::fs::read_to_string(c.dir.join("admin.token"))?;
        let admin = client(c, token.trim())?;
        let t: serde_json::Value = admin
            .call(
                "POST",
                "/v1/tokens",
                Some(
                    serde_json::json!({"name": "fanout", "role": "enforcer", "namespace": "/acme/shop"})
                        .to_string()
                        .into_bytes(),
                ),
                Duration::from_secs(10),
            )
            .await?;
        let boot = t["token"].as_str().context("a bootstrap token")?.to_owned();
        let mut out = Vec::new();
        for &n in clients {
            out.push(measure(setup, &consoles, &admin, &boot, n, rounds, round_limit).await?);
        }
        Ok(out)
    });
    drop(consoles);
    let _ = std::fs::remove_file(&kek);
    result
}
