//! A console process in a namespace of its own and enforcers in console mode, for the
//! tests that need the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use segmesh_testkit::{Host, Topology, wait_until};
use tokio::net::TcpStream;

use super::*;

pub const CONSOLE_PORT: u16 = 8443;

pub struct Lab {
    pub topo: Topology,
    pub dir: Scratch,
    /// Console replica `i` listens on `CONSOLE_PORT + i` with data in `console-data`
    /// (`console-data<i>` for `i > 0`); one unless [`Lab::replicas`].
    pub console_pids: Vec<Option<u32>>,
    /// Extra arguments of the console.
    pub console_args: Vec<String>,
    pub enforcers: std::collections::HashMap<String, u32>,
    pub admin: String,
    pub boot: String,
}

impl Lab {
    /// The namespaces and the console (with `console_args`), its admin token read.
    pub fn new(tag: &str, hosts: &[&str], console_args: &[&str]) -> Lab {
        Lab::replicas(tag, hosts, console_args, 1)
    }

    /// Like [`Lab::new`] with `n` console replicas (their store given in
    /// `console_args`: `--store etcd ...`); the admin token read from whichever replica
    /// wrote it.
    pub fn replicas(tag: &str, hosts: &[&str], console_args: &[&str], n: usize) -> Lab {
        Lab::replicas_in(Topology::new(hosts), tag, console_args, n)
    }

    /// Like [`Lab::replicas`] in namespaces made beforehand (to start etcd in one).
    pub fn replicas_in(topo: Topology, tag: &str, console_args: &[&str], n: usize) -> Lab {
        let mut lab = Lab {
            topo,
            dir: Scratch::new(tag),
            console_pids: vec![None; n],
            console_args: console_args.iter().map(|a| a.to_string()).collect(),
            enforcers: Default::default(),
            admin: String::new(),
            boot: String::new(),
        };
        for i in 0..n {
            lab.start_replica(i);
        }
        lab.admin = std::fs::read_to_string(lab.data().join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        lab
    }

    pub fn host(&self, n: &str) -> Host {
        self.topo.host(n).clone()
    }

    pub fn url(&self) -> String {
        self.url_of(0)
    }

    pub fn url_of(&self, replica: usize) -> String {
        format!(
            "https://{}:{}",
            self.topo.host("console").ip4,
            CONSOLE_PORT + replica as u16
        )
    }

    pub fn data(&self) -> PathBuf {
        self.data_of(0)
    }

    pub fn data_of(&self, replica: usize) -> PathBuf {
        match replica {
            0 => self.dir.0.join("console-data"),
            i => self.dir.0.join(format!("console-data{i}")),
        }
    }

    /// Starts the console (again) on the same data directory.
    pub fn start_console(&mut self) {
        self.start_replica(0);
    }

    /// Starts console replica `i` (again) on its data directory.
    pub fn start_replica(&mut self, i: usize) {
        let c = self.host("console");
        let port = CONSOLE_PORT + i as u16;
        let mut cmd = c.command(bin("segmesh-control").to_str().unwrap());
        cmd.arg("--data-dir")
            .arg(self.data_of(i))
            .arg("--listen")
            .arg(format!("{}:{port}", c.ip4))
            .args(&self.console_args);
        self.console_pids[i] = Some(self.topo.spawn(cmd));
        let addr = SocketAddr::new(c.ip4.into(), port);
        wait_until("the console listens", Duration::from_secs(20), || {
            in_ns(&c, async move { TcpStream::connect(addr).await.is_ok() })
                .join()
                .unwrap()
        });
        // The enforcers (uid 1337) read the console's CA from the scratch folder.
        std::fs::copy(
            self.data_of(i).join("ca/bundle.crt"),
            self.dir.0.join("console-ca.crt"),
        )
        .unwrap();
    }

    pub fn stop_console(&mut self) {
        self.stop_replica(0);
    }

    pub fn stop_replica(&mut self, i: usize) {
        if let Some(pid) = self.console_pids[i].take() {
            self.topo.kill(pid);
        }
    }

    /// `segmeshctl` in the console's namespace with the admin token; its output.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        self.ctl_on(0, args)
    }

    /// `segmeshctl` against replica `i`.
    pub fn ctl_on(&self, i: usize, args: &[&str]) -> std::process::Output {
        let c = self.host("console");
        c.command(bin("segmeshctl").to_str().unwrap())
            .args(args)
            .env("SEGMESH_CONSOLE", self.url_of(i))
            .env("SEGMESH_TOKEN", &self.admin)
            .env("SEGMESH_CA", self.data().join("ca/bundle.crt"))
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    }

    pub fn ctl_ok(&self, args: &[&str]) -> String {
        self.ctl_ok_on(0, args)
    }

    pub fn ctl_ok_on(&self, i: usize, args: &[&str]) -> String {
        let out = self.ctl_on(i, args);
        assert!(
            out.status.success(),
            "segmeshctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A bootstrap token for `/acme/shop` allowing `app=*`, made on replica `i`.
    pub fn shop_token_on(&self, i: usize) -> String {
        self.ctl_ok_on(
            i,
            &[
                "token",
                "--name",
                "b",
                "--role",
                "enforcer",
                "--namespace",
                "/acme/shop",
                "--allow-tag",
                "app=*",
            ],
        )
        .trim()
        .to_owned()
    }

    /// When `name`'s current certificate (in its state folder) expires.
    pub fn not_after(&self, name: &str) -> Option<std::time::SystemTime> {
        let pem = std::fs::read_to_string(self.dir.0.join(format!("{name}-state/identity.crt")))
            .unwrap_or_default();
        segmesh_identity::ca::certs_from_pem(&pem)
            .ok()
            .and_then(|c| segmesh_identity::WorkloadIdentity::from_cert(&c[0]).ok())
            .map(|id| id.not_after)
    }

    /// Writes `text` as a policy file, applies and commits it.
    pub fn publish(&self, file: &str, text: &str) {
        let p = self.dir.0.join(file);
        std::fs::write(&p, text).unwrap();
        self.ctl_ok(&["apply", "-f", p.to_str().unwrap()]);
        self.ctl_ok(&["commit"]);
    }

    /// Starts `name`'s enforcer in console mode as uid 1337; waits until it enforces a
    /// snapshot (ready) unless `wait` is false.
    pub fn start_enforcer(&mut self, name: &str, tags: &[&str], token: &str, wait: bool) {
        let h = self.host(name);
        let token_file = self.dir.0.join(format!("{name}.token"));
        std::fs::write(&token_file, token).unwrap();
        let mut cmd = h.enforcer_command(std::path::Path::new(env!("CARGO_BIN_EXE_segmesh-proxy")));
        for i in 0..self.console_pids.len() {
            cmd.args(["--console", &self.url_of(i)]);
        }
        cmd.args([
            "--console-ca",
            self.dir.0.join("console-ca.crt").to_str().unwrap(),
            "--bootstrap-token",
            &format!("@{}", token_file.display()),
            "--name",
            name,
            "--namespace",
            "/acme/shop",
            "--tag",
            &tags.join(","),
            "--state-dir",
            self.dir.0.join(format!("{name}-state")).to_str().unwrap(),
            "--flow-log",
            self.dir.0.join(format!("{name}.jsonl")).to_str().unwrap(),
        ]);
        let pid = self.topo.spawn(cmd);
        self.enforcers.insert(name.into(), pid);
        if wait {
            wait_until(
                &format!("{name}'s enforcer is ready"),
                Duration::from_secs(30),
                || http_get(&h, "/ready").0 == 200,
            );
        }
    }

    pub fn stop_enforcer(&mut self, name: &str) {
        if let Some(pid) = self.enforcers.remove(name) {
            self.topo.kill(pid);
        }
        let h = self.host(name);
        wait_until("the admin port is free", Duration::from_secs(10), || {
            http_get(&h, "/healthz").0 == 0
        });
    }

    pub fn config(&self, name: &str) -> serde_json::Value {
        let (_, body) = http_get(&self.host(name), "/config");
        let json = body.split("\r\n\r\n").nth(1).unwrap_or("{}");
        serde_json::from_str(json.trim()).unwrap_or_default()
    }

    pub fn log(&self, name: &str) -> Vec<serde_json::Value> {
        flow_log(&self.dir.0.join(format!("{name}.jsonl")))
    }
}
