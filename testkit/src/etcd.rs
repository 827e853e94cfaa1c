//! Real etcd clusters for the tests of the console's etcd store: `n` members of
//! Debian's `etcd` (package `etcd-server`, installed by `scripts/install-deps`), each a
//! process of its own on ports of its own, on loopback or inside a test's network
//! namespace, with data in a temporary directory. Members can be killed and started
//! again; everything is killed and removed in `Drop`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::Host;

struct Member {
    name: String,
    client: u16,
    peer: u16,
    /// `/health` over plain HTTP (clients may need TLS).
    metrics: u16,
    child: Option<Child>,
}

/// TLS for the members' client port: their certificate and key, and the CA clients'
/// certificates must chain to (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

pub struct EtcdCluster {
    members: Vec<Member>,
    ip: Ipv4Addr,
    host: Option<Host>,
    dir: PathBuf,
    initial_cluster: String,
    token: String,
    tls: Option<EtcdTlsFiles>,
}

/// Ports for etcd members: below the ephemeral range (32768+) and away from the ranges
/// other tests take (20000+: enforcer tunnel ports), distinct per process and per
/// cluster; a port taken anyway is skipped.
fn next_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = 24000 + (std::process::id() as usize % 200) * 20;
    loop {
        let p = (base + NEXT.fetch_add(1, Ordering::Relaxed) % 4000) as u16;
        if std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok() {
            return p;
        }
    }
}

impl EtcdCluster {
    /// `n` members on loopback; waits until the cluster has a leader.
    pub fn start(n: usize) -> EtcdCluster {
        EtcdCluster::start_on(n, Ipv4Addr::LOCALHOST, None)
    }

    /// `n` members listening on `ip`, run inside `host`'s namespace when given.
    pub fn start_on(n: usize, ip: Ipv4Addr, host: Option<&Host>) -> EtcdCluster {
        EtcdCluster::start_with(n, ip, host, None)
    }

    /// `n` members on loopback whose clients must speak TLS and present a certificate
    /// signed by `tls.client_ca`.
    pub fn start_tls(n: usize, tls: EtcdTlsFiles) -> EtcdCluster {
        EtcdCluster::start_with(n, Ipv4Addr::LOCALHOST, None, Some(tls))
    }

    pub fn start_with(
        n: usize,
        ip: Ipv4Addr,
        host: Option<&Host>,
        tls: Option<EtcdTlsFiles>,
    ) -> EtcdCluster {
        assert!(
            Command::new("etcd")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "these tests run a real etcd: install Debian's etcd-server (scripts/install-deps)"
        );
        static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
        let id = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let token = format!("segmesh-test-{}-{id}", std::process::id());
        let dir = std::env::temp_dir().join(&token);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: next_port(),
                peer: next_port(),
                metrics: next_port(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{ip}:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members,
            ip,
            host: host.cloned(),
            dir,
            initial_cluster,
            token,
            tls,
        };
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_healthy(Duration::from_secs(30));
        c
    }

    fn spawn(&mut self, i: usize) {
        let ip = self.ip;
        let m = &self.members[i];
        let data = self.dir.join(&m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", m.name)))
            .unwrap();
        let mut cmd = match &self.host {
            Some(h) => h.command("etcd"),
            None => Command::new("etcd"),
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.client_ca)
                .arg("--client-cert-auth");
        }
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen-client-urls",
                &format!("{scheme}://{ip}:{}", m.client),
                "--advertise-client-urls",
                &format!("{scheme}://{ip}:{}", m.client),
                "--listen-metrics-urls",
                &format!("http://{ip}:{}", m.metrics),
                "--listen-peer-urls",
                &format!("http://{ip}:{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://{ip}:{}", m.peer),
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &self.token,
                // Quick elections: a killed leader is replaced within about a second.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("start etcd");
        self.members[i].child = Some(child);
    }

    /// Client URLs of every member (dead ones too: clients must cope).
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://{}:{}", self.ip, m.client))
            .collect()
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops member `i` without closing anything (SIGSTOP): its connections stay open and
    /// it answers nothing, as a hung or partitioned member would.
    pub fn stall(&mut self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a stalled member go on (SIGCONT).
    pub fn unstall(&mut self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, i: usize, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.members[i].child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// Starts member `i` again on its data; waits until the cluster is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy(Duration::from_secs(30));
    }

    /// Waits until every running member says the cluster is healthy (`/health`: it has
    /// a leader and answers).
    pub fn wait_healthy(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let addr = format!("{}:{}", self.ip, m.metrics);
            loop {
                if self.health(&addr) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd member {} ({addr}) not healthy within {limit:?}; its log: {}",
                    m.name,
                    std::fs::read_to_string(self.dir.join(format!("{}.log", m.name)))
                        .unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn health(&self, addr: &str) -> bool {
        let addr = addr.to_owned();
        match &self.host {
            Some(h) => h.thread(move || health(&addr)).join().unwrap_or(false),
            None => health(&addr),
        }
    }
}

/// `GET /health` over HTTP/1.0: true when etcd answers that it is healthy.
fn health(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(sock) = addr.parse::<std::net::SocketAddr>() else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.unstall(i);
            self.kill(i);
        }
        // A failing test shows what etcd said.
        if std::thread::panicking() {
            for m in &self.members {
                let log = std::fs::read_to_string(self.dir.join(format!("{}.log", m.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                eprintln!("etcd member {} (last lines, newest first):", m.name);
                for l in tail {
                    eprintln!("  {l}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
