//! Network-namespace topologies for tests that need a kernel: capture rules, TPROXY,
//! splice. Each topology is a bridge namespace and one namespace per named host, joined
//! by veth pairs, with IPv4 (`10.77.0.0/24`) and IPv6 (`fd77::/64`) addresses that exist
//! only inside those namespaces. Everything is torn down in `Drop`, also when a test
//! panics, and namespaces left behind by a killed test process are swept on the next
//! run.
//!
//! A network namespace is a property of a thread: [`Host::thread`] runs a closure on a
//! new thread that has entered the namespace (build a tokio runtime inside it);
//! [`Host::command`] runs a program in it through `ip netns exec`.

pub mod dns;
pub mod etcd;
pub mod fuzz;

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Whether netns tests should run: true when root; false (with a note) when the person
/// running them set `SEGMESH_SKIP_NETNS=1`; otherwise a loud failure.
pub fn netns_enabled() -> bool {
    if std::env::var("SEGMESH_SKIP_NETNS").is_ok_and(|v| v == "1") {
        eprintln!("SEGMESH_SKIP_NETNS=1: skipping a network-namespace test");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "network-namespace tests need root (CI runs as root); set SEGMESH_SKIP_NETNS=1 to skip them"
    );
    assert!(
        Command::new("ip")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success()),
        "network-namespace tests need iproute2 (`ip`): run scripts/install-deps"
    );
    true
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deletes namespaces of this harness whose creating process is gone.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("smk-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// One host of a topology.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// The namespace's name (`ip netns`).
    pub ns: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

pub struct Topology {
    bridge: String,
    hosts: Vec<Host>,
    children: Mutex<Vec<Child>>,
}

impl Host {
    /// `program` run inside this host's namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// Runs a command in the namespace and returns its output (not checked).
    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// Whether something listens on TCP `port` (with `udp`: a UDP socket is bound to it)
    /// in the namespace, asked of the kernel with `ss`: no probe connection is made (one
    /// through an enforcer would be decided and recorded like any flow).
    pub fn bound(&self, port: u16, udp: bool) -> bool {
        let flags = if udp { "-Hlun" } else { "-Hltn" };
        let out = self.exec(&["ss", flags, &format!("sport = :{port}")]);
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    }

    /// Runs a command in the namespace and panics unless it succeeds.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a new thread inside this host's network namespace.
    pub fn thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns);
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .expect("spawn thread")
    }
}

impl Topology {
    /// Creates the namespaces and links of `names`; host `i` gets `10.77.0.{10+i}` and
    /// `fd77::{10+i}`.
    pub fn new(names: &[&str]) -> Topology {
        static N: AtomicUsize = AtomicUsize::new(0);
        sweep_stale();
        let id = format!(
            "smk-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let bridge = format!("{id}-br");
        let mut topo = Topology {
            bridge: bridge.clone(),
            hosts: Vec::new(),
            children: Mutex::new(Vec::new()),
        };
        run(&["ip", "netns", "add", &bridge]);
        run(&["ip", "-n", &bridge, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", &bridge, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{id}-{name}");
            let host = Host {
                name: name.to_string(),
                ns: ns.clone(),
                ip4: Ipv4Addr::new(10, 77, 0, 10 + i as u8),
                ip6: format!("fd77::{}", 10 + i).parse().unwrap(),
            };
            // Push first so that Drop removes it even if a later step fails.
            topo.hosts.push(host.clone());
            run(&["ip", "netns", "add", &ns]);
            let port = format!("p{i}");
            run(&[
                "ip", "-n", &bridge, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            run(&[
                "ip", "-n", &bridge, "link", "set", &port, "master", "br0", "up",
            ]);
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", host.ip4),
                "dev",
                "eth0",
            ]);
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/64", host.ip6),
                "dev",
                "eth0",
                "nodad",
            ]);
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        }
        topo
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Starts a long-running process; it is killed when the topology is dropped.
    pub fn spawn(&self, mut cmd: Command) -> u32 {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// Stops a process started with [`spawn`](Self::spawn) (SIGKILL) and waits for it.
    pub fn kill(&self, pid: u32) {
        let mut children = self.children.lock().unwrap();
        if let Some(i) = children.iter().position(|c| c.id() == pid) {
            let mut c = children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for mut c in self
            .children
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.bridge])
            .output();
    }
}

/// Polls `ready` until it returns true or `limit` passes (then panics naming `what`).
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes every namespace this process created (and kills what runs in them): for a
/// signal handler, when the owning [`Topology`] values cannot be dropped.
pub fn teardown_this_process() {
    let prefix = format!("smk-{}-", std::process::id());
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) {
            continue;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
    }
}

/// The uid enforcers run as (the capture rules exclude its traffic).
pub const ENFORCER_UID: u32 = 1337;

impl Host {
    /// `program` in this host's namespace as the enforcer's uid, with only the
    /// capabilities TPROXY needs (what the systemd unit and the sidecar do).
    pub fn enforcer_command(&self, program: &std::path::Path) -> Command {
        let mut c = self.command("setpriv");
        c.args([
            format!("--reuid={ENFORCER_UID}"),
            format!("--regid={ENFORCER_UID}"),
            "--clear-groups".into(),
            // BPF: the kernel relay's verdict program and maps (with NET_ADMIN).
            "--inh-caps=+net_admin,+net_raw,+net_bind_service,+bpf".into(),
            "--ambient-caps=+net_admin,+net_raw,+net_bind_service,+bpf".into(),
            "--".into(),
        ])
        .arg(program);
        c
    }
}

impl Host {
    /// Runs a future to completion on a current-thread tokio runtime, on a new thread
    /// inside this host's namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> JoinHandle<T> {
        self.thread(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(f)
        })
    }
}
