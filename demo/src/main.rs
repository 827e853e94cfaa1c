//! `segmesh-demo`: a three-tier shop in network namespaces, protected live.
//!
//! It builds namespaces (internet, admin, web, api, db, two lab workloads, the console),
//! starts the console with its embedded store and one enforcer per workload (capture
//! rules, console mode: each registers with a bootstrap token and its tags), applies
//! `examples/three-tier/policies.yaml` and `services.yaml`, runs real connections
//! between the workloads (PU to PU through the Services' addresses) and
//! prints what happened from the enforcers' flow records; then shows discovery mode and
//! `segmeshctl suggest` on the lab namespace, and an emergency quarantine taking effect
//! on open connections. Everything it creates is removed at the end, on failure and on
//! Ctrl-C. Needs root (network namespaces, iptables).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use segmesh_control::style::Style;
use segmesh_iptables_init::{apply, rules};
use segmesh_testkit::{Host, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const CONSOLE_PORT: u16 = 8443;
/// The demo's admin workstation also has this address, inside the example's `admin`
/// external network (192.0.2.0/24).
const ADMIN_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Bytes each allowed connection sends (and gets echoed back).
const PAYLOAD: usize = 256 * 1024;
/// The servers stop by themselves after this long.
const SERVE_LIMIT: Duration = Duration::from_secs(600);

/// The workloads with enforcers: name, namespace, tags, listening ports.
const PUS: &[(&str, &str, &[&str], &[u16])] = &[
    ("web", "/acme/shop", &["app=web", "env=prod"], &[443, 22]),
    (
        "api",
        "/acme/shop",
        &["app=api", "env=prod"],
        &[8080, 8089, 22],
    ),
    ("db", "/acme/shop", &["app=db", "env=prod"], &[5432, 22]),
    ("lab-client", "/acme/lab", &["app=lab-client"], &[]),
    ("lab-store", "/acme/lab", &["app=lab-store"], &[6379, 22]),
];

/// The shop's Service addresses (`examples/three-tier/services.yaml`): PUs call each
/// other through them, as pods of a cluster call Services.
const SERVICES: &[(&str, Ipv4Addr)] = &[
    ("web", Ipv4Addr::new(10, 96, 1, 10)),
    ("api", Ipv4Addr::new(10, 96, 1, 20)),
    ("db", Ipv4Addr::new(10, 96, 1, 30)),
];

struct Demo {
    topo: Topology,
    dir: PathBuf,
    bins: PathBuf,
    style: Style,
    admin_token: String,
}

impl Drop for Demo {
    fn drop(&mut self) {
        // SEGMESH_DEMO_KEEP=1 keeps the files (flow logs, console data) to look at.
        if std::env::var("SEGMESH_DEMO_KEEP").is_ok_and(|v| v == "1") {
            eprintln!("kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn host_of<'a>(d: &'a Demo, name: &str) -> &'a Host {
    d.topo.host(name)
}

/// Runs a future on a thread inside `h`'s namespace and waits for it.
fn in_ns<T: Send + 'static>(
    h: &Host,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    h.run(f).join().expect("namespace thread")
}

/// Echo servers on `ports` inside `h`, for at most `SERVE_LIMIT`.
fn serve(h: &Host, ports: &'static [u16]) {
    let _ = h.run(async move {
        for &p in ports {
            let Ok(l) = TcpListener::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), p)).await
            else {
                continue;
            };
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    tokio::spawn(async move {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    });
                }
            });
        }
        tokio::time::sleep(SERVE_LIMIT).await;
    });
}

/// What a client saw.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// Every byte came back.
    Echoed(usize),
    Refused,
    Failed(String),
}

/// Connects from `h` (from `source` if given), sends `PAYLOAD` bytes, half-closes,
/// reads the echo. Returns the local port and what happened.
fn exchange(h: &Host, to: SocketAddr, source: Option<IpAddr>) -> (u16, Seen) {
    in_ns(h, async move {
        let sock = match TcpSocket::new_v4() {
            Ok(s) => s,
            Err(e) => return (0, Seen::Failed(e.to_string())),
        };
        // Bound first: the local port names the flow in the records even when the
        // enforcer resets it before connect() returns.
        let ip = source.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        if let Err(e) = sock.bind(SocketAddr::new(ip, 0)) {
            return (0, Seen::Failed(e.to_string()));
        }
        let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
        let s = match tokio::time::timeout(Duration::from_secs(5), sock.connect(to)).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => return (port, Seen::Refused),
            Err(_) => return (port, Seen::Failed("connect timed out".into())),
        };
        let (mut r, mut w) = s.into_split();
        let send = async {
            w.write_all(&vec![7u8; PAYLOAD]).await?;
            w.shutdown().await
        };
        let recv = async {
            let mut buf = Vec::new();
            r.read_to_end(&mut buf).await.map(|_| buf.len())
        };
        let out =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(send, recv) }).await;
        let seen = match out {
            Ok((Ok(()), Ok(n))) if n == PAYLOAD => Seen::Echoed(n),
            Ok((_, Ok(0))) | Ok((_, Err(_))) | Ok((Err(_), _)) => Seen::Refused,
            Ok((_, Ok(n))) => Seen::Failed(format!("{n} of {PAYLOAD} bytes came back")),
            Err(_) => Seen::Failed("no answer within 10 s".into()),
        };
        (port, seen)
    })
}

fn flow_log(d: &Demo, pu: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(d.dir.join(format!("{pu}.jsonl")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn is_pu(name: &str) -> bool {
    PUS.iter().any(|(n, ..)| *n == name)
}

fn qualified(name: &str) -> String {
    let ns = PUS.iter().find(|(n, ..)| *n == name).map_or("", |p| p.1);
    format!("{ns}:{name}")
}

/// One row of the table, from what the client saw and the enforcers' records.
struct Row {
    from: String,
    to: String,
    port: u16,
    allowed: bool,
    policy: String,
    decided_by: String,
    path: String,
    bytes: u64,
    note: String,
}

fn names(r: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = r["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str())
        .map(|p| p.rsplit_once(':').map_or(p, |(_, n)| n).to_owned())
        .collect();
    if v.is_empty() {
        v.push(match r["reason"].as_str() {
            Some("default") => "(default deny)".into(),
            Some("discovered") => "(discovery mode)".into(),
            Some(other) => format!("({other})"),
            None => "?".into(),
        });
    }
    v
}

/// Runs one connection and explains it.
fn probe(d: &Demo, from: &str, to: &str, port: u16) -> anyhow::Result<Row> {
    let client = host_of(d, from).clone();
    let server = host_of(d, to);
    let source = (from == "admin").then_some(IpAddr::V4(ADMIN_IP));
    let client_ip = source.unwrap_or(IpAddr::V4(client.ip4));
    // Only records written after this connection started count.
    let (base_c, base_s) = (flow_log(d, from).len(), flow_log(d, to).len());
    // PU → PU through the server's Service where it has one.
    let service = SERVICES
        .iter()
        .find(|(n, _)| *n == to && is_pu(from))
        .map(|(_, ip)| *ip);
    let target = SocketAddr::new(service.unwrap_or(server.ip4).into(), port);
    let (local, seen) = exchange(&client, target, source);
    if let Seen::Failed(why) = &seen {
        bail!("{from} → {to}:{port}: {why}");
    }
    // The records are written when the connection ends; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    let (client_rec, server_rec) = loop {
        let c = is_pu(from).then(|| {
            flow_log(d, from).into_iter().skip(base_c).rev().find(|r| {
                r["direction"] == "outgoing"
                    && r["source"]["port"] == local
                    && r["destination"]["port"] == port
            })
        });
        let s = is_pu(to).then(|| {
            flow_log(d, to).into_iter().skip(base_s).rev().find(|r| {
                r["direction"] == "incoming"
                    && r["destination"]["port"] == port
                    && if is_pu(from) {
                        r["source"]["pu"] == qualified(from).as_str()
                    } else {
                        r["source"]["ip"] == client_ip.to_string().as_str()
                            && r["source"]["port"] == local
                    }
            })
        });
        let c_done = c.as_ref().is_none_or(|c| c.is_some());
        // A flow the client's enforcer refused never reaches the server's.
        let refused_at_client = c
            .as_ref()
            .and_then(|c| c.as_ref())
            .is_some_and(|c| c["verdict"] == "reject" && c["rejected_by"] != "server");
        let s_done = refused_at_client || s.as_ref().is_none_or(|s| s.is_some());
        if (c_done && s_done) || Instant::now() > deadline {
            break (c.flatten(), s.flatten());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let allowed = matches!(seen, Seen::Echoed(_));
    let (policy, decided_by, rec) = if allowed {
        let mut p: Vec<String> = Vec::new();
        for r in [&client_rec, &server_rec].into_iter().flatten() {
            for n in names(r) {
                if !p.contains(&n) {
                    p.push(n);
                }
            }
        }
        let by = match (&client_rec, &server_rec) {
            (Some(_), Some(_)) => "both ends",
            (Some(_), None) => "client",
            (None, Some(_)) => "server",
            _ => "?",
        };
        (
            p.join(", "),
            by.to_owned(),
            client_rec.as_ref().or(server_rec.as_ref()).cloned(),
        )
    } else {
        match (&client_rec, &server_rec) {
            (Some(c), _) if c["rejected_by"] != "server" => {
                (names(c).join(", "), "client".into(), Some(c.clone()))
            }
            (_, Some(s)) => (names(s).join(", "), "server".into(), Some(s.clone())),
            (Some(c), None) => (names(c).join(", "), "server".into(), Some(c.clone())),
            (None, None) => ("?".into(), "?".into(), None),
        }
    };
    let path = rec
        .as_ref()
        .filter(|_| allowed)
        .and_then(|r| r["data_path"].as_str())
        .map_or("-", |p| match p {
            "tls" => "encrypted",
            "spliced" => "spliced",
            "moved" => "moved, spliced",
            other => other,
        })
        .to_owned();
    let bytes = rec.as_ref().filter(|_| allowed).map_or(0, |r| {
        r["bytes_sent"].as_u64().unwrap_or(0) + r["bytes_received"].as_u64().unwrap_or(0)
    });
    let via = client_rec
        .as_ref()
        .and_then(|r| r["destination"]["service"].as_str())
        .map(|s| format!("Service {s}"));
    let note = match (is_pu(from) && is_pu(to) && allowed, via) {
        (true, Some(s)) => format!("mTLS tunnel via {s}"),
        (true, None) => "mTLS tunnel".into(),
        (false, Some(s)) => format!("via {s}"),
        (false, None) => String::new(),
    };
    Ok(Row {
        from: from.into(),
        to: to.into(),
        port,
        allowed,
        policy,
        decided_by,
        path,
        bytes,
        note,
    })
}

fn table(d: &Demo, rows: &[Row]) {
    let s = d.style;
    println!(
        "  {}",
        s.bold(&format!(
            "{:<11} {:<10} {:>5}  {:<7}  {:<30} {:<10} {:<10} {:>8}  {}",
            "from",
            "to",
            "port",
            "verdict",
            "deciding policy",
            "decided by",
            "data path",
            "bytes",
            ""
        ))
    );
    for r in rows {
        let verdict = if r.allowed {
            s.green(&format!("{:<7}", "allow"))
        } else {
            s.red(&format!("{:<7}", "reject"))
        };
        println!(
            "  {:<11} {:<10} {:>5}  {}  {:<30} {:<10} {:<10} {:>8}  {}",
            r.from,
            r.to,
            r.port,
            verdict,
            r.policy,
            r.decided_by,
            r.path,
            r.bytes,
            s.dim(&r.note)
        );
    }
}

fn step(d: &Demo, text: &str) {
    println!("\n{}", d.style.bold(&format!("▶ {text}")));
}

/// `segmeshctl` in the console's namespace with the admin token; its output.
fn run_ctl(d: &Demo, args: &[&str]) -> anyhow::Result<Output> {
    Ok(host_of(d, "console")
        .command(d.bins.join("segmeshctl").to_str().context("path")?)
        .args(args)
        .env(
            "SEGMESH_CONSOLE",
            format!("https://{}:{CONSOLE_PORT}", host_of(d, "console").ip4),
        )
        .env("SEGMESH_TOKEN", &d.admin_token)
        .env("SEGMESH_CA", d.dir.join("console/ca/bundle.crt"))
        .env("NO_COLOR", "1")
        .output()?)
}

/// `segmeshctl`, shown as a command line; fails unless it succeeds.
fn ctl(d: &Demo, args: &[&str]) -> anyhow::Result<String> {
    println!(
        "  {}",
        d.style.dim(&format!("$ segmeshctl {}", args.join(" ")))
    );
    let out = run_ctl(d, args)?;
    if !out.status.success() {
        bail!(
            "segmeshctl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(start.elapsed())
}

fn admin_get(h: &Host, path: &'static str) -> Option<String> {
    in_ns(h, async move {
        let mut s = TcpStream::connect("127.0.0.1:15020").await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    })
}

fn enforcer_config(d: &Demo, pu: &str) -> serde_json::Value {
    admin_get(host_of(d, pu), "/config")
        .and_then(|b| b.split("\r\n\r\n").nth(1).map(str::to_owned))
        .and_then(|j| serde_json::from_str(j.trim()).ok())
        .unwrap_or_default()
}

fn setup(d: &mut Demo) -> anyhow::Result<()> {
    step(
        d,
        "network: one namespace per workload, the internet, an admin workstation and the console",
    );
    let admin = host_of(d, "admin").clone();
    admin.exec_ok(&[
        "ip",
        "addr",
        "add",
        &format!("{ADMIN_IP}/24"),
        "dev",
        "eth0",
    ]);
    for (name, ..) in PUS {
        let h = host_of(d, name);
        h.exec_ok(&["ip", "route", "add", "192.0.2.0/24", "dev", "eth0"]);
        // The Services' range, routed as a cluster's (the enforcer captures it first).
        h.exec_ok(&["ip", "route", "add", "10.96.1.0/24", "dev", "eth0"]);
    }
    for h in [
        "internet",
        "admin",
        "console",
        "web",
        "api",
        "db",
        "lab-client",
        "lab-store",
    ] {
        let h = host_of(d, h);
        println!("  {:<11} {}", h.name, h.ip4);
    }
    println!(
        "  {:<11} {ADMIN_IP} (the example's `admin` external network)",
        "admin"
    );

    step(d, "console: embedded store, its own CA, an admin token");
    let c = host_of(d, "console").clone();
    let mut cmd = c.command(d.bins.join("segmesh-control").to_str().context("path")?);
    cmd.arg("--data-dir")
        .arg(d.dir.join("console"))
        .arg("--listen")
        .arg(format!("{}:{CONSOLE_PORT}", c.ip4))
        .env("RUST_LOG", "warn");
    d.topo.spawn(cmd);
    let addr = SocketAddr::new(c.ip4.into(), CONSOLE_PORT);
    let token_file = d.dir.join("console/admin.token");
    wait_for("the console", Duration::from_secs(20), || {
        token_file.exists() && in_ns(&c, async move { TcpStream::connect(addr).await.is_ok() })
    })?;
    d.admin_token = std::fs::read_to_string(&token_file)?.trim().to_owned();
    std::fs::copy(
        d.dir.join("console/ca/bundle.crt"),
        d.dir.join("console-ca.crt"),
    )?;
    println!("  listening on https://{addr}");

    step(
        d,
        "policies and Services: examples/three-tier/{policies,services}.yaml, applied and committed",
    );
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier/policies.yaml");
    let example = example
        .canonicalize()
        .context("examples/three-tier/policies.yaml")?;
    let services = example.with_file_name("services.yaml");
    ctl(
        d,
        &[
            "apply",
            "-f",
            example.to_str().context("path")?,
            "-f",
            services.to_str().context("path")?,
        ],
    )?;
    print!("{}", indent(&ctl(d, &["commit"])?));
    let boot = ctl(
        d,
        &[
            "token",
            "--name",
            "demo-enforcers",
            "--role",
            "enforcer",
            "--namespace",
            "/acme",
            "--allow-tag",
            "app=*",
            "--allow-tag",
            "env=*",
        ],
    )?
    .trim()
    .to_owned();
    std::fs::write(d.dir.join("bootstrap.token"), &boot)?;

    step(
        d,
        "enforcers: capture rules and segmesh-proxy in each workload, registered with the console",
    );
    for (name, ns, tags, ports) in PUS {
        let h = host_of(d, name).clone();
        h.thread(|| {
            let c = rules::Config::default();
            apply::apply(&c, rules::Family::V4).and_then(|_| apply::apply(&c, rules::Family::V6))
        })
        .join()
        .expect("capture thread")?;
        let mut cmd = h.enforcer_command(&d.bins.join("segmesh-proxy"));
        cmd.args(["--console", &format!("https://{addr}"), "--console-ca"])
            .arg(d.dir.join("console-ca.crt"))
            .arg("--bootstrap-token")
            .arg(format!("@{}", d.dir.join("bootstrap.token").display()))
            .args(["--name", name, "--namespace", ns, "--tag", &tags.join(",")])
            .arg("--state-dir")
            .arg(d.dir.join(format!("{name}-state")))
            .arg("--flow-log")
            .arg(d.dir.join(format!("{name}.jsonl")))
            .arg("--log-all-flows")
            // The demo stops the console before the enforcers; their complaints are noise.
            .env("RUST_LOG", "error");
        d.topo.spawn(cmd);
        serve(&h, ports);
    }
    for (name, ns, tags, _) in PUS {
        let h = host_of(d, name).clone();
        wait_for(
            &format!("{name}'s enforcer"),
            Duration::from_secs(30),
            || admin_get(&h, "/ready").is_some_and(|b| b.starts_with("HTTP/1.1 200")),
        )?;
        println!(
            "  {:<11} {ns:<11} {:<24} registered, certificate issued",
            name,
            tags.join(",")
        );
    }
    let registered = PUS.len() as u64 * 2; // an IPv4 and an IPv6 address each
    for (name, ..) in PUS {
        wait_for(
            "every enforcer to know every workload",
            Duration::from_secs(10),
            || enforcer_config(d, name)["registry"].as_u64() == Some(registered),
        )?;
    }
    serve(host_of(d, "internet"), &[80, 443, 8443]);
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

fn run(d: &mut Demo) -> anyhow::Result<()> {
    setup(d)?;

    step(
        d,
        "real connections between the workloads (256 KiB each way when allowed)",
    );
    let pairs: &[(&str, &str, u16)] = &[
        ("internet", "web", 443),
        ("internet", "api", 8080),
        ("internet", "web", 22),
        ("admin", "web", 22),
        ("admin", "db", 22),
        ("web", "api", 8080),
        ("web", "api", 8089),
        ("web", "db", 5432),
        ("api", "db", 5432),
        ("api", "web", 443),
        ("db", "api", 8080),
        ("db", "internet", 443),
    ];
    let rows = pairs
        .iter()
        .map(|&(f, t, p)| probe(d, f, t, p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    table(d, &rows);

    step(
        d,
        "discovery: /acme/lab is in discovery mode (allowed and recorded, no policy yet)",
    );
    let lab_pairs: &[(&str, &str, u16)] = &[
        ("lab-client", "lab-store", 6379),
        ("lab-client", "internet", 80),
    ];
    let rows = lab_pairs
        .iter()
        .map(|&(f, t, p)| probe(d, f, t, p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    table(d, &rows);
    // Every end's record: lab-client's two (outgoing) and lab-store's (incoming). The
    // suggestions are made of what each end saw, and lab-store's Incoming half is what
    // lets the flow in once discovery is off; suggested without it (its record still
    // on its way), the flow was refused at lab-store (a failed demo test saw it).
    wait_for(
        "the discovered flows at the console, from both ends",
        Duration::from_secs(10),
        || {
            ctl_quiet(d, &["flows", "--pu", "lab-client", "-o", "json"]).is_some_and(|o| {
                let v = serde_json::from_str::<serde_json::Value>(&o).unwrap_or_default();
                let discovered = |direction: &str| {
                    v.as_array().map_or(0, |a| {
                        a.iter()
                            .filter(|f| {
                                f["record"]["reason"] == "discovered"
                                    && f["record"]["direction"] == direction
                            })
                            .count()
                    })
                };
                discovered("outgoing") >= 2 && discovered("incoming") >= 1
            })
        },
    )?;
    let suggested = d.dir.join("suggested.yaml");
    ctl(
        d,
        &[
            "suggest",
            "--namespace",
            "/acme/lab",
            "--since",
            "10m",
            "-o",
            suggested.to_str().context("path")?,
        ],
    )?;
    print!("{}", indent(&std::fs::read_to_string(&suggested)?));
    let off = d.dir.join("lab-off.yaml");
    std::fs::write(&off, "kind: Namespace\nname: /acme/lab\ndiscovery: false\n")?;
    ctl(
        d,
        &[
            "apply",
            "-f",
            suggested.to_str().context("path")?,
            "-f",
            off.to_str().context("path")?,
        ],
    )?;
    let before = enforcer_config(d, "lab-client")["version"].clone();
    print!("{}", indent(&ctl(d, &["commit"])?));
    wait_for(
        "the lab's enforcers to take the commit",
        Duration::from_secs(10),
        || {
            enforcer_config(d, "lab-client")["version"] != before
                && enforcer_config(d, "lab-store")["version"] != before
        },
    )?;
    println!(
        "  discovery off, suggested policies live: the discovered flows stay allowed, the rest is rejected"
    );
    let rows = [
        ("lab-client", "lab-store", 6379),
        ("lab-client", "internet", 80),
        ("lab-client", "lab-store", 22),
        ("lab-client", "internet", 443),
    ]
    .iter()
    .map(|&(f, t, p)| probe(d, f, t, p))
    .collect::<anyhow::Result<Vec<_>>>()?;
    table(d, &rows);

    dns_and_domains(d)?;

    step(
        d,
        "emergency: api is compromised; quarantine it while db has an open session from it",
    );
    let db = SocketAddr::new(host_of(d, "db").ip4.into(), 5432);
    let api = host_of(d, "api").clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let session = api.run(async move {
        let mut s = TcpStream::connect(db).await?;
        s.write_all(b"SELECT 1").await?;
        let mut b = [0u8; 8];
        s.read_exact(&mut b).await?;
        let _ = tx.send(());
        let r = tokio::time::timeout(Duration::from_secs(20), s.read(&mut b)).await;
        Ok::<_, std::io::Error>((Instant::now(), format!("{r:?}")))
    });
    rx.recv_timeout(Duration::from_secs(10))
        .context("the api → db session opens")?;
    println!("  api → db:5432 session open");
    let q = d.dir.join("quarantine.yaml");
    std::fs::write(
        &q,
        "kind: NetworkRuleSet\nname: quarantine-api\nnamespace: /acme/shop\ntier: emergency\n\
         subject: [[$name=api]]\n\
         outgoingRules:\n  - {action: Reject, object: [[$identity=processingunit, $namespace=*], [$identity=externalnetwork]], log: true}\n\
         incomingRules:\n  - {action: Reject, object: [[$identity=processingunit, $namespace=*], [$identity=externalnetwork]], log: true}\n",
    )?;
    ctl(d, &["apply", "-f", q.to_str().context("path")?])?;
    let committed = Instant::now();
    print!("{}", indent(&ctl(d, &["commit"])?));
    let (closed, how) = session.join().expect("session thread")?;
    println!(
        "  the open session was closed {:?} after the commit ({})",
        closed.saturating_duration_since(committed),
        if how.contains("Ok(Ok(0))") {
            "EOF"
        } else {
            "reset"
        }
    );
    let rows = [
        ("web", "api", 8080),
        ("api", "db", 5432),
        ("internet", "web", 443),
    ]
    .iter()
    .map(|&(f, t, p)| probe(d, f, t, p))
    .collect::<anyhow::Result<Vec<_>>>()?;
    table(d, &rows);
    quarantine_udp_icmp(d)?;
    let closed_rec = ["api", "db"]
        .iter()
        .flat_map(|p| flow_log(d, p))
        .find(|r| r["close_reason"] == "policy");
    if let Some(r) = closed_rec {
        println!(
            "  flow record: close_reason {} closed_by {}",
            r["close_reason"], r["closed_by"]
        );
    }
    step(
        d,
        "done: removing every namespace, process and file the demo created",
    );
    Ok(())
}

/// A resolver in the internet namespace answering `names` with the internet host's
/// address (TTL 60 s), NXDOMAIN for anything else, for `SERVE_LIMIT`.
fn resolver(d: &Demo, names: &'static [&'static str]) {
    let h = host_of(d, "internet");
    let ip = h.ip4;
    let _ = h.run(async move {
        let Ok(s) = tokio::net::UdpSocket::bind(SocketAddr::new(ip.into(), 53)).await else {
            return;
        };
        let mut b = [0u8; 1500];
        while let Ok(Ok((n, from))) = tokio::time::timeout(SERVE_LIMIT, s.recv_from(&mut b)).await {
            let known = |n: &str| names.contains(&n);
            if let Some(a) = segmesh_testkit::dns::answer(&b[..n], known, ip, 60) {
                let _ = s.send_to(&a, from).await;
            }
        }
    });
}

/// `name`'s A records, asked from `h` of the resolver at `server`.
fn resolve(h: &Host, server: SocketAddr, name: &str) -> Vec<IpAddr> {
    let Some(query) = segmesh_testkit::dns::query(7, name) else {
        return Vec::new();
    };
    in_ns(h, async move {
        let Ok(s) = tokio::net::UdpSocket::bind("0.0.0.0:0").await else {
            return Vec::new();
        };
        let _ = s.send_to(&query, server).await;
        let mut b = [0u8; 1500];
        match tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut b)).await {
            Ok(Ok((n, _))) => segmesh_testkit::dns::addresses(&b[..n]),
            _ => Vec::new(),
        }
    })
}

/// DNS and a domain-name external network: lab-client may reach `*.example.test` on
/// 8443, which means the addresses it resolved such names to (its enforcer learns them
/// from its DNS answers), nothing else.
fn dns_and_domains(d: &Demo) -> anyhow::Result<()> {
    step(
        d,
        "DNS and a domain: lab-client may reach *.example.test:8443, i.e. what it resolved such a name to",
    );
    resolver(d, &["shop.example.test", "shop.example.org"]);
    let internet = host_of(d, "internet").ip4;
    let file = d.dir.join("domains.yaml");
    std::fs::write(
        &file,
        format!(
            "kind: ExternalNetwork\nname: resolver\nnamespace: /acme/lab\nentries: [\"{internet}\"]\nports: [udp/53]\n---\n\
             kind: ExternalNetwork\nname: example-test\nnamespace: /acme/lab\nentries: [\"*.example.test\"]\nports: [tcp/8443]\n---\n\
             kind: NetworkPolicy\nname: lab-dns\nnamespace: /acme/lab\naction: Allow\nmode: Outgoing\n\
             subject: [[app=lab-client]]\nobject: [[ext:name=resolver]]\nlog: true\n---\n\
             kind: NetworkPolicy\nname: lab-to-example-test\nnamespace: /acme/lab\naction: Allow\nmode: Outgoing\n\
             subject: [[app=lab-client]]\nobject: [[ext:name=example-test]]\nports: [tcp/8443]\nlog: true\n"
        ),
    )?;
    ctl(d, &["apply", "-f", file.to_str().context("path")?])?;
    let before = enforcer_config(d, "lab-client")["version"].clone();
    print!("{}", indent(&ctl(d, &["commit"])?));
    wait_for(
        "lab-client's enforcer to take the commit",
        Duration::from_secs(10),
        || enforcer_config(d, "lab-client")["version"] != before,
    )?;
    let client = host_of(d, "lab-client").clone();
    let server = SocketAddr::new(internet.into(), 53);
    let mut rows = vec![probe(d, "lab-client", "internet", 8443)?];
    println!("  before any lookup: refused (the address alone is no *.example.test)");
    for name in ["shop.example.org.", "shop.example.test."] {
        let got = resolve(&client, server, name);
        if got != [IpAddr::V4(internet)] {
            bail!("lab-client resolved {name} to {got:?}");
        }
        println!("  lab-client resolves {name} → {internet} (the query itself a flow: lab-dns)");
        rows.push(probe(d, "lab-client", "internet", 8443)?);
    }
    table(d, &rows);
    println!(
        "  (rows: before any lookup; after shop.example.org, a name outside the wildcard; after shop.example.test)"
    );
    let rec = flow_log(d, "lab-client")
        .into_iter()
        .rev()
        .find(|r| r["destination"]["port"] == 8443 && r["verdict"] == "allow");
    match rec {
        Some(r) => println!(
            "  flow record: destination.domain {} (policies {})",
            r["destination"]["domain"], r["policies"]
        ),
        None => bail!("no allowed record for lab-client → internet:8443"),
    }
    Ok(())
}

/// The quarantined api sends UDP and pings, over IPv4 and IPv6, to a peer PU (db) and to
/// the internet: nothing arrives (counted by the receivers), and the attempts are in
/// api's flow records with the deciding policy.
fn quarantine_udp_icmp(d: &Demo) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let arrived = Arc::new(AtomicUsize::new(0));
    let targets = [("db", 5432u16), ("internet", 53u16)];
    for (name, port) in targets {
        let h = host_of(d, name);
        for ip in [IpAddr::from(h.ip4), IpAddr::from(h.ip6)] {
            let arrived = arrived.clone();
            let _ = h.run(async move {
                let Ok(s) = tokio::net::UdpSocket::bind(SocketAddr::new(ip, port)).await else {
                    return;
                };
                let mut b = [0u8; 512];
                while let Ok(Ok((n, from))) =
                    tokio::time::timeout(Duration::from_secs(10), s.recv_from(&mut b)).await
                {
                    arrived.fetch_add(1, Ordering::SeqCst);
                    let _ = s.send_to(&b[..n], from).await;
                }
            });
        }
    }
    std::thread::sleep(Duration::from_millis(200)); // the receivers bind (counted below)
    let api = host_of(d, "api");
    let mut lines = Vec::new();
    for (name, port) in targets {
        let h = host_of(d, name);
        for ip in [IpAddr::from(h.ip4), IpAddr::from(h.ip6)] {
            let to = SocketAddr::new(ip, port);
            let answered = in_ns(api, async move {
                let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                    .parse()
                    .expect("an address");
                let Ok(s) = tokio::net::UdpSocket::bind(any).await else {
                    return false;
                };
                let _ = s.send_to(b"quarantine?", to).await;
                let mut b = [0u8; 64];
                tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut b))
                    .await
                    .is_ok()
            });
            let pinged = api
                .exec(&["ping", "-c", "1", "-W", "1", &ip.to_string()])
                .status
                .success();
            if answered || pinged {
                bail!(
                    "the quarantined api reached {name} at {ip} (udp: {answered}, ping: {pinged})"
                );
            }
            lines.push(format!("{name} {ip}"));
        }
    }
    if arrived.load(Ordering::SeqCst) > 0 {
        bail!("a datagram from the quarantined api arrived");
    }
    let recorded = wait_for("api's UDP records", Duration::from_secs(5), || {
        flow_log(d, "api")
            .iter()
            .filter(|r| {
                (r["protocol"] == "udp" || r["protocol"] == "icmp")
                    && names(r).iter().any(|n| n.contains("quarantine-api"))
            })
            .count()
            >= 8
    })
    .is_ok();
    println!(
        "  UDP and ping from api, IPv4 and IPv6, to {}: no answer, nothing arrived{}",
        lines.join(", "),
        if recorded {
            "; the UDP and ping attempts are recorded with quarantine-api"
        } else {
            ""
        }
    );
    Ok(())
}

/// `segmeshctl`, not shown; its output if it succeeded.
fn ctl_quiet(d: &Demo, args: &[&str]) -> Option<String> {
    let out = run_ctl(d, args).ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// On SIGINT/SIGTERM: remove what this process created, then exit.
fn handle_signals(dir: PathBuf) -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    // Blocked here (and in every thread started later), received by the waiter alone.
    set.thread_block()?;
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("\n{sig}: cleaning up");
            segmesh_testkit::teardown_this_process();
            let _ = std::fs::remove_dir_all(&dir);
            std::process::exit(130);
        }
    });
    Ok(())
}

fn main() -> std::process::ExitCode {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("segmesh-demo needs root (network namespaces, iptables): run it with sudo");
        return std::process::ExitCode::from(2);
    }
    let bins = match std::env::current_exe() {
        Ok(p) => p.parent().map(Path::to_owned).unwrap_or_default(),
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    for b in ["segmesh-proxy", "segmesh-control", "segmeshctl"] {
        if !bins.join(b).exists() {
            eprintln!(
                "error: {} is missing: build everything with `cargo build --release --workspace --bins`",
                bins.join(b).display()
            );
            return std::process::ExitCode::from(2);
        }
    }
    let dir = std::env::temp_dir().join(format!("segmesh-demo-{}", std::process::id()));
    if let Err(e) = handle_signals(dir.clone()) {
        eprintln!("error: signals: {e}");
        return std::process::ExitCode::from(2);
    }
    let prepared = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)));
    if let Err(e) = prepared {
        eprintln!("error: {}: {e}", dir.display());
        return std::process::ExitCode::from(2);
    }
    let style = Style::detect();
    println!(
        "{}",
        style.bold("segmesh demo: a three-tier shop, segmented live")
    );
    let topo = Topology::new(&[
        "console",
        "internet",
        "admin",
        "web",
        "api",
        "db",
        "lab-client",
        "lab-store",
    ]);
    let mut demo = Demo {
        topo,
        dir,
        bins,
        style,
        admin_token: String::new(),
    };
    let result = run(&mut demo);
    drop(demo);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}\n(everything it created has been removed)");
            std::process::ExitCode::FAILURE
        }
    }
}
