//! Real clients against real servers, all from Debian's packages: wrk against nginx
//! (keep-alive requests, and new connections with `Connection: close`) and
//! redis-benchmark against redis-server (SET and GET with 10 clients, and pipelined
//! SET). The paths alternate within each round (direct, authenticated-only, encrypted)
//! and the rounds repeat, so that the shared machine's drift hits every path alike; the
//! report gives each figure's median and range, and the enforcers' CPU time per unit of
//! work. Every run is bounded: wrk by its duration, redis-benchmark by its request
//! count, both by `timeout`.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use segmesh_testkit::{Host, Topology};
use serde_json::{Value, json};

use crate::suite::{Cost, cost_of};

/// The packages these scenarios need, by the program each provides.
pub const TOOLS: [(&str, &str); 4] = [
    ("wrk", "wrk"),
    ("nginx", "nginx-light"),
    ("redis-server", "redis-server"),
    ("redis-benchmark", "redis-tools"),
];

/// The Debian packages of the tools that are missing here.
pub fn missing() -> Vec<&'static str> {
    TOOLS
        .iter()
        .filter(|(program, _)| {
            !std::process::Command::new("sh")
                .args(["-c", &format!("command -v {program}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect()
}

/// How big the scenarios are.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub rounds: usize,
    /// Each wrk run's duration.
    pub wrk: Duration,
    /// Requests per redis-benchmark run.
    pub redis: u32,
}

/// One path: the host its clients run on, where its servers listen in the server
/// namespace, and the enforcers whose CPU time counts (none for direct).
pub struct Path3 {
    pub name: &'static str,
    pub from: &'static str,
    pub http_port: u16,
    pub redis_port: u16,
    pub pids: Vec<(&'static str, u32)>,
}

/// Starts nginx (one process listening on every path's port) and one redis-server per
/// path in the server namespace.
pub fn start_servers(topo: &Topology, dir: &Path, paths: &[Path3]) -> anyhow::Result<()> {
    let server = topo.host("server");
    let listens: String = paths
        .iter()
        .map(|p| format!("    listen {};\n", p.http_port))
        .collect();
    let d = dir.display();
    // One process (no master and workers): killing it ends nginx, where a killed master
    // would leave its worker running, holding whatever it inherited.
    let conf = format!(
        "master_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n\
           client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n\
           fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n\
           scgi_temp_path {d}/nginx-scgi;\n\
           server {{\n{listens}    location / {{ return 200 \"hello\\n\"; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let mut nginx = server.command("nginx");
    nginx.arg("-c").arg(&path);
    topo.spawn(quiet(nginx));
    for p in paths {
        let mut redis = server.command("redis-server");
        redis.args([
            "--port",
            &p.redis_port.to_string(),
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--dir",
        ]);
        redis.arg(dir);
        topo.spawn(quiet(redis));
    }
    for p in paths {
        crate::suite::wait_listening(server, p.http_port)?;
        crate::suite::wait_listening(server, p.redis_port)?;
    }
    Ok(())
}

/// A server's output goes nowhere: it must not hold the harness's own output open (a
/// test reading the harness's output would wait for it).
fn quiet(mut c: std::process::Command) -> std::process::Command {
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

/// `program args…` in the client namespace, bounded by `limit`; its standard output.
fn run(client: &Host, limit: Duration, program: &str, args: &[String]) -> anyhow::Result<String> {
    let mut c = client.command("timeout");
    c.arg(format!("{}", limit.as_secs().max(1)))
        .arg(program)
        .args(args);
    let out = c.output().with_context(|| program.to_owned())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// A wrk duration (`123.45us`, `1.20ms`, `2.00s`) in microseconds.
fn wrk_us(s: &str) -> Option<f64> {
    let (n, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    n.parse::<f64>().ok().map(|v| v * scale)
}

/// What a wrk run printed: requests per second, mean latency, p50 and p99 (µs), and
/// its error count (socket errors and non-2xx answers).
pub fn parse_wrk(out: &str) -> anyhow::Result<WrkFigures> {
    let mut rps = None;
    let (mut mean, mut p50, mut p99) = (None, None, None);
    let mut errors = 0u64;
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["Requests/sec:", v, ..] => rps = v.parse().ok(),
            // ("Latency Distribution" heads the percentiles.)
            ["Latency", avg, ..] if wrk_us(avg).is_some() => mean = wrk_us(avg),
            ["50%", v] => p50 = wrk_us(v),
            ["99%", v] => p99 = wrk_us(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                errors += rest
                    .iter()
                    .filter_map(|t| t.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    match (rps, mean, p50, p99) {
        (Some(r), Some(m), Some(a), Some(b)) => Ok((r, m, a, b, errors)),
        _ => bail!("no figures in wrk's output:\n{out}"),
    }
}

/// Requests per second of the `test` row of redis-benchmark's `--csv` output.
pub fn parse_redis(out: &str, test: &str) -> anyhow::Result<f64> {
    let row = format!("\"{test}\",");
    out.lines()
        .find(|l| l.starts_with(&row))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .with_context(|| format!("no {test} row in redis-benchmark's output:\n{out}"))
}

/// Median, smallest and largest.
fn spread(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return json!(null);
    }
    json!({ "median": s[s.len() / 2], "min": s[0], "max": s[s.len() - 1], "runs": s.len() })
}

/// Rounds' values by (figure, path) as `{figure: {path: spread}}`, for the paths `keep`
/// takes.
fn by_figure(
    rounds: &std::collections::BTreeMap<(&str, &str), Vec<f64>>,
    keep: impl Fn(&str) -> bool,
) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for ((figure, path), v) in rounds {
        if keep(path) {
            out.entry(figure.to_string())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("object")
                .insert(path.to_string(), spread(v));
        }
    }
    out
}

/// What `parse_wrk` reads: requests/s, mean, p50 and p99 latency (µs), socket errors.
type WrkFigures = (f64, f64, f64, f64, u64);

/// The rounds' costs per 1,000 units of work, by (figure, path): the enforcers' and the
/// whole machine's.
#[derive(Default)]
struct PerUnit<'a> {
    enforcers: std::collections::BTreeMap<(&'a str, &'a str), Vec<f64>>,
    machine: std::collections::BTreeMap<(&'a str, &'a str), Vec<f64>>,
}

impl<'a> PerUnit<'a> {
    fn record(&mut self, figure: &'a str, path: &'a str, cost: Cost, units: f64) {
        let thousands = (units / 1000.0).max(1e-9);
        let key = (figure, path);
        self.enforcers
            .entry(key)
            .or_default()
            .push(cost.enforcers / thousands);
        self.machine
            .entry(key)
            .or_default()
            .push(cost.machine / thousands);
    }
}

/// Runs every scenario on every path, alternating; the figures by scenario and path.
/// With `perf`, the first round's HTTP and redis SET scenarios of each mesh path are
/// recorded there too (`{path}-http-keepalive.data`, `-http-close`, `-redis-set`).
pub fn measure(
    topo: &Topology,
    server_ip: Ipv4Addr,
    paths: &[Path3],
    sizes: &Sizes,
    perf: Option<&std::path::Path>,
) -> anyhow::Result<Value> {
    let secs = sizes.wrk.as_secs().max(1);
    let bound = sizes.wrk + Duration::from_secs(30);
    // redis-benchmark runs to a count, not for a time: its bound allows a floor of 1,000
    // requests/s (a full run's 100,000 requests through a mesh path on this shared VM
    // once took longer than wrk's bound while the hypervisor stole 40 % of the CPU).
    let redis_bound = Duration::from_secs(30) + Duration::from_millis(sizes.redis as u64);
    // Scenario → path → the values of each round; and CPU per unit.
    let mut values: std::collections::BTreeMap<(&str, &str), Vec<f64>> = Default::default();
    // The whole machine's CPU per unit is kept for every path (direct too): clients,
    // servers, enforcers and the kernel's work wherever it ran.
    let mut per_unit = PerUnit::default();
    for round in 0..sizes.rounds {
        for p in paths {
            let client = topo.host(p.from);
            let profile = |scenario: &str| {
                crate::suite::Profile::start(
                    perf.filter(|_| round == 0),
                    &format!("{}-{scenario}", p.name.replace(' ', "-")),
                    &p.pids,
                )
            };
            let url = format!("http://{server_ip}:{}/", p.http_port);
            // wrk's figures and what the run cost.
            let wrk = |extra: &[&str]| -> anyhow::Result<(WrkFigures, Cost)> {
                let mut args: Vec<String> = ["-t1", "-c10", &format!("-d{secs}s"), "--latency"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                args.extend(extra.iter().map(|s| s.to_string()));
                args.push(url.clone());
                let (out, cost) = cost_of(&p.pids, || run(client, bound, "wrk", &args))?;
                Ok((parse_wrk(&out)?, cost))
            };
            let recording = profile("http-keepalive");
            let ((rps, mean, p50, p99, errors), cost) = wrk(&[])?;
            drop(recording);
            if errors > 0 {
                bail!("wrk keep-alive on {}: {errors} errors", p.name);
            }
            values
                .entry(("http keep-alive requests/s", p.name))
                .or_default()
                .push(rps);
            values
                .entry(("http keep-alive mean latency µs", p.name))
                .or_default()
                .push(mean);
            values
                .entry(("http keep-alive p50 µs", p.name))
                .or_default()
                .push(p50);
            values
                .entry(("http keep-alive p99 µs", p.name))
                .or_default()
                .push(p99);
            per_unit.record(
                "ms per 1,000 http requests",
                p.name,
                cost,
                rps * secs as f64,
            );
            let recording = profile("http-close");
            let ((rps, _, _, _, errors), cost) = wrk(&["-H", "Connection: close"])?;
            drop(recording);
            if errors > 0 {
                bail!("wrk Connection: close on {}: {errors} errors", p.name);
            }
            values
                .entry(("http new connections/s", p.name))
                .or_default()
                .push(rps);
            per_unit.record(
                "ms per 1,000 new connections (http)",
                p.name,
                cost,
                rps * secs as f64,
            );
            let n = sizes.redis.to_string();
            let port = p.redis_port.to_string();
            let ip = server_ip.to_string();
            for (scenario, test, extra) in [
                ("redis SET, 10 clients, requests/s", "SET", None),
                ("redis GET, 10 clients, requests/s", "GET", None),
                (
                    "redis SET, 10 clients, pipeline 16, requests/s",
                    "SET",
                    Some("16"),
                ),
            ] {
                let mut args: Vec<String> = [
                    "-h",
                    &ip,
                    "-p",
                    &port,
                    "-c",
                    "10",
                    "-n",
                    &n,
                    "-t",
                    &test.to_lowercase(),
                    "--csv",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                if let Some(depth) = extra {
                    args.extend(["-P".to_string(), depth.to_string()]);
                }
                let recording = (extra.is_none() && test == "SET").then(|| profile("redis-set"));
                let (out, cost) = cost_of(&p.pids, || {
                    run(client, redis_bound, "redis-benchmark", &args)
                })?;
                drop(recording);
                values
                    .entry((scenario, p.name))
                    .or_default()
                    .push(parse_redis(&out, test)?);
                if extra.is_none() && test == "SET" {
                    per_unit.record("ms per 1,000 redis SETs", p.name, cost, sizes.redis as f64);
                }
            }
        }
    }
    // Only paths with enforcers have an enforcer CPU figure (direct has none).
    let enforced = |path: &str| paths.iter().any(|p| p.name == path && !p.pids.is_empty());
    Ok(json!({
        "rounds": sizes.rounds,
        "figures": by_figure(&values, |_| true),
        "enforcer_cpu": by_figure(&per_unit.enforcers, enforced),
        "machine_cpu": by_figure(&per_unit.machine, |_| true),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_and_redis_outputs_are_read() {
        let wrk = "Running 1s test @ http://10.0.0.2:8080/\n  1 threads and 10 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   312.50us  100.01us   2.10ms   90.00%\n    Req/Sec    30.00k     1.00k   32.00k    70.00%\n  Latency Distribution\n     50%  300.00us\n     75%  350.00us\n     90%  400.00us\n     99%    1.20ms\n  30000 requests in 1.00s, 4.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\nRequests/sec:  30000.50\nTransfer/sec:      4.00MB\n";
        let (rps, mean, p50, p99, errors) = parse_wrk(wrk).unwrap();
        assert_eq!(
            (rps, mean, p50, p99, errors),
            (30000.5, 312.5, 300.0, 1200.0, 3)
        );
        assert!(parse_wrk("nothing").is_err());
        let csv = "\"test\",\"rps\",\"avg_latency_ms\"\n\"SET\",\"79365.08\",\"0.071\"\n\"GET\",\"81300.81\",\"0.069\"\n";
        assert_eq!(parse_redis(csv, "SET").unwrap(), 79365.08);
        assert_eq!(parse_redis(csv, "GET").unwrap(), 81300.81);
        assert!(parse_redis(csv, "INCR").is_err());
        assert_eq!(spread(&[3.0, 1.0, 2.0])["median"], 2.0);
    }
}
