//! `report.json`, `report.md` and SVG charts (plotters) from a run's figures, with the
//! machine's description and each figure's ratio to its baseline.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde_json::{Value, json};

use crate::suite::PATHS;

/// What this machine is.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let ktls = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|s| s.split_whitespace().any(|u| u == "tls"));
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": kernel,
        "kernel_tls": ktls,
    })
}

/// The policy crate's decision benchmark, if it ran on this checkout
/// (`cargo bench -p segmesh-policy --bench decision`): criterion's mean estimates.
pub fn decision_bench(target: &Path) -> Value {
    let read = |rel: &str| -> Option<f64> {
        let p = target
            .join("criterion")
            .join(rel)
            .join("new/estimates.json");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
        v["mean"]["point_estimate"].as_f64()
    };
    let mut out = serde_json::Map::new();
    for (name, rel) in [
        ("engine_decision_ns", "decide/compiled"),
        ("naive_decision_ns", "decide/naive"),
        ("compile_10000_policies_ns", "compile_10k-policies"),
    ] {
        if let Some(v) = read(rel) {
            out.insert(name.into(), json!(v));
        }
    }
    if out.is_empty() {
        json!({ "note": "not measured in this run: `cargo bench -p segmesh-policy --bench decision` first" })
    } else {
        Value::Object(out)
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// Grouped bars: one group per label, one bar per series.
fn bars(
    path: &Path,
    title: &str,
    y: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
) -> anyhow::Result<()> {
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = groups.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            groups.get(i).cloned().unwrap_or_default()
        })
        .y_desc(y)
        .draw()?;
    let width = 0.8 / series.len().max(1) as f64;
    for (si, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(si).to_rgba();
        chart
            .draw_series(values.iter().enumerate().map(|(gi, &v)| {
                let x0 = gi as f64 + 0.1 + si as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled())
            }))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

/// A target: what it compares, its threshold, where it stands.
fn target(name: &str, measured: f64, goal: f64, higher_is_better: bool, unit: &str) -> Value {
    let met = if higher_is_better {
        measured >= goal
    } else {
        measured <= goal
    };
    json!({ "target": name, "measured": measured, "goal": goal, "unit": unit, "met": met })
}

/// Writes report.json, report.md and the charts into `out`.
pub fn write(out: &Path, figures: &Value, title: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let b1 = &figures["bulk_gbps"]["1"];
    let b8 = &figures["bulk_gbps"]["8"];
    let lat = &figures["latency"];
    let conn = &figures["connections"];
    let direct1 = f(&b1["direct"]);
    let cpu = &figures["enforcer_cpu"];
    let idle_rss = figures["idle"]["encrypted"]["enforcers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            figures["idle"]["authenticated-only"]["enforcers"]
                .as_array()
                .into_iter()
                .flatten(),
        )
        .map(|e| f(&e["rss_bytes_per_connection"]).max(f(&e["heap_bytes_per_connection"])))
        .fold(0.0, f64::max);
    let fanout_p99 = figures["fanout"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["watchers"] == 1000)
        .map(|r| f(&r["p99_ms"]))
        .fold(None, |worst: Option<f64>, p| {
            Some(worst.map_or(p, |w| w.max(p)))
        });
    let modes = ["authenticated-only", "encrypted"];
    let worst_rate = modes
        .iter()
        .map(|m| f(&conn[*m]["per_second"]))
        .fold(f64::INFINITY, f64::min);
    let worst_cpu_per_conn = modes
        .iter()
        .map(|m| f(&cpu[*m]["ms_per_1000_connections"]) / 1000.0)
        .fold(0.0, f64::max);
    let rtt = |m: &str| f(&lat[m]["mean_us"]) / f(&lat["direct"]["mean_us"]).max(1e-9);
    // Real clients (medians of alternating rounds), when they were measured: the issue
    // measures new connections with wrk (`Connection: close`) and keep-alive latency
    // with wrk; without wrk, the harness's own scenarios stand in (so labelled).
    let real = &figures["clients"]["figures"];
    let real_cpu = &figures["clients"]["enforcer_cpu"];
    let median = |scenario: &str, path: &str| f(&real[scenario][path]["median"]);
    let vs_direct =
        |scenario: &str, path: &str| median(scenario, path) / median(scenario, "direct").max(1e-9);
    let (close, close_cpu) = (
        "http new connections/s",
        "ms per 1,000 new connections (http)",
    );
    let keepalive = "http keep-alive mean latency µs";
    let mut targets = Vec::new();
    if real[close]["direct"].is_object() {
        targets.push(target(
            "new connections/s under wrk (`Connection: close`, 10 connections) vs direct (worse mode, median of the rounds)",
            modes
                .iter()
                .map(|m| vs_direct(close, m))
                .fold(f64::INFINITY, f64::min),
            0.4,
            true,
            "×",
        ));
        targets.push(target(
            "enforcer CPU per new connection under wrk, both ends (worse mode, median of the rounds)",
            modes
                .iter()
                .map(|m| f(&real_cpu[close_cpu][*m]["median"]) / 1000.0)
                .fold(0.0, f64::max),
            0.2,
            false,
            "ms",
        ));
    } else {
        targets.push(target(
            "new connections/s vs direct, one after another (worse mode; wrk not measured)",
            worst_rate / f(&conn["direct"]["per_second"]).max(1e-9),
            0.4,
            true,
            "×",
        ));
        targets.push(target(
            "enforcer CPU per new connection, one after another, both ends (worse mode; wrk not measured)",
            worst_cpu_per_conn,
            0.2,
            false,
            "ms",
        ));
    }
    for (mode, bulk_goal, latency_goal) in
        [("authenticated-only", 0.9, 1.2), ("encrypted", 0.6, 1.5)]
    {
        targets.push(target(
            &format!("{mode} throughput vs direct, 1 stream"),
            f(&b1[mode]) / direct1.max(1e-9),
            bulk_goal,
            true,
            "×",
        ));
        targets.push(if real[keepalive]["direct"].is_object() {
            target(
                &format!("{mode} HTTP keep-alive latency (wrk) vs direct (median of the rounds)"),
                vs_direct(keepalive, mode),
                latency_goal,
                false,
                "×",
            )
        } else {
            target(
                &format!("{mode} 64-byte round trip vs direct (mean; wrk not measured)"),
                rtt(mode),
                latency_goal,
                false,
                "×",
            )
        });
    }
    targets.push(target(
        "memory per idle connection (worst enforcer, either mode; RSS or heap in use, the larger)",
        idle_rss / 1024.0,
        6.0,
        false,
        "KiB",
    ));
    let set = "redis SET, 10 clients, requests/s";
    if real[set]["direct"].is_object() {
        for (mode, goal) in [("authenticated-only", 0.8), ("encrypted", 0.5)] {
            targets.push(target(
                &format!("redis SET (10 clients) vs direct, {mode} (median of the rounds)"),
                vs_direct(set, mode),
                goal,
                true,
                "×",
            ));
        }
    }
    if let Some(p99) = fanout_p99 {
        targets.push(target(
            "push fan-out to 1,000 watchers, p99 (worst setup)",
            p99,
            1000.0,
            false,
            "ms",
        ));
    }
    let report = json!({
        "title": title,
        "date": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "machine": machine(),
        "figures": figures,
        "targets": targets,
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;

    let present: Vec<&str> = PATHS
        .iter()
        .copied()
        .filter(|p| !b1[*p].is_null())
        .collect();
    let groups: Vec<String> = present.iter().map(|s| s.to_string()).collect();
    bars(
        &out.join("throughput.svg"),
        "Bulk throughput (Gbit/s)",
        "Gbit/s",
        &groups,
        &[
            (
                "1 stream".into(),
                present.iter().map(|p| f(&b1[*p])).collect(),
            ),
            (
                "8 streams".into(),
                present.iter().map(|p| f(&b8[*p])).collect(),
            ),
        ],
    )?;
    bars(
        &out.join("latency.svg"),
        "Request/response round trip, 64 B (µs)",
        "µs",
        &groups,
        &["p50_us", "p99_us", "p999_us"]
            .iter()
            .map(|q| {
                (
                    q.trim_end_matches("_us").to_owned(),
                    present.iter().map(|p| f(&lat[*p][*q])).collect(),
                )
            })
            .collect::<Vec<_>>(),
    )?;
    let conn_keys: Vec<String> = conn
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    bars(
        &out.join("connections.svg"),
        "New connections per second (sequential, each decided)",
        "per second",
        &conn_keys,
        &[(
            "connections/s".into(),
            conn_keys
                .iter()
                .map(|k| f(&conn[k]["per_second"]))
                .collect(),
        )],
    )?;
    let fan: Vec<&Value> = figures["fanout"].as_array().into_iter().flatten().collect();
    bars(
        &out.join("fanout.svg"),
        "Push fan-out: commit to every watcher holding the snapshot (ms)",
        "ms",
        &fan.iter()
            .map(|r| {
                format!(
                    "{} watchers, {}",
                    r["watchers"],
                    r["setup"].as_str().unwrap_or("1 console, redb")
                )
            })
            .collect::<Vec<_>>(),
        &["p50_ms", "p99_ms", "max_ms"]
            .iter()
            .map(|q| {
                (
                    q.trim_end_matches("_ms").to_owned(),
                    fan.iter().map(|r| f(&r[*q])).collect(),
                )
            })
            .collect::<Vec<_>>(),
    )?;

    let m = &report["machine"];
    let mut md = format!(
        "# {title}\n\n{}: {} cores ({}), {} GiB, kernel {}, kernel TLS {}; enforcers' `sockmap: {}`.\n\n\
         Every figure below was measured in this run, on one topology (a client and a server \
         network namespace joined by a veth bridge), baselines first. Reproduce with \
         `cargo build --release --workspace --bins && sudo target/release/segmesh-loadtest --out DIR`.\n\n",
        report["date"].as_str().unwrap_or(""),
        m["cores"],
        m["cpu"].as_str().unwrap_or(""),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or(""),
        if m["kernel_tls"] == true {
            "available"
        } else {
            "not available (tunnels encrypt with rustls)"
        },
        report["figures"]["sockmap"].as_str().unwrap_or("off")
    );
    md.push_str("## Targets\n\n| target | measured | goal | state |\n|---|---|---|---|\n");
    for t in report["targets"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {:.2} {} | {} {} | {} |\n",
            t["target"].as_str().unwrap_or(""),
            f(&t["measured"]),
            t["unit"].as_str().unwrap_or(""),
            t["goal"],
            t["unit"].as_str().unwrap_or(""),
            if t["met"] == true {
                "met"
            } else {
                "**missed** (open work)"
            }
        ));
    }
    md.push_str("\n## Bulk throughput\n\n![throughput](throughput.svg)\n\n| path | 1 stream | vs direct | 8 streams | vs direct |\n|---|---|---|---|---|\n");
    for p in &present {
        md.push_str(&format!(
            "| {p} | {:.2} Gbit/s | {:.2}× | {:.2} Gbit/s | {:.2}× |\n",
            f(&b1[*p]),
            f(&b1[*p]) / direct1.max(1e-9),
            f(&b8[*p]),
            f(&b8[*p]) / f(&b8["direct"]).max(1e-9)
        ));
    }
    md.push_str("\n## Request/response latency (64 B, one established connection)\n\n![latency](latency.svg)\n\n| path | p50 | p99 | p999 | mean | added mean vs direct |\n|---|---|---|---|---|---|\n");
    for p in &present {
        let l = &lat[*p];
        md.push_str(&format!(
            "| {p} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs | {:+.1} µs |\n",
            f(&l["p50_us"]),
            f(&l["p99_us"]),
            f(&l["p999_us"]),
            f(&l["mean_us"]),
            f(&l["mean_us"]) - f(&lat["direct"]["mean_us"])
        ));
    }
    conn_table(
        &mut md,
        "New connections (sequential; connect, 6-byte greeting, close)\n\n![connections](connections.svg)",
        "connect p50 | connect p99",
        conn,
        &conn_keys,
    );
    let first = &figures["connections_client_first"];
    if first["direct"].is_object() {
        conn_table(
            &mut md,
            "New connections where the client speaks first (sequential; connect, send 6 bytes, read them echoed, close)",
            "first answer p50 | p99",
            first,
            &conn_keys,
        );
        let shares: Vec<String> = conn_keys
            .iter()
            .filter_map(|k| {
                let s = first[k]["first_bytes_share"].as_f64()?;
                Some(format!("{k} {:.0} %", 100.0 * s))
            })
            .collect();
        if !shares.is_empty() {
            md.push_str(&format!(
                "\nFlows whose first bytes went in their stream before their request's answer came back: {}.\n",
                shares.join(", ")
            ));
        }
    }
    let inbound = &figures["connections_inbound_external"];
    if inbound["enforcer"].is_object() {
        conn_table(
            &mut md,
            "Inbound external connections (sequential, from a host outside the mesh to the server's PU: its enforcer alone; connect, 6-byte greeting, close)",
            "connect p50 | connect p99",
            inbound,
            &["direct".to_string(), "enforcer".to_string()],
        );
        md.push_str(&format!(
            "\nThe server's enforcer: {:.0} ms of CPU per 1,000 inbound external connections.\n",
            f(&inbound["enforcer"]["ms_per_1000_connections"])
        ));
        let (d, e) = (&inbound["direct"], &inbound["enforcer"]);
        if e["bulk_gbps_1"].is_number() {
            md.push_str(&format!(
                "\n### Inbound external bulk and round trips (the same host, the same enforcer alone)\n\n\
                 | measure | direct | through the server's enforcer | vs direct | enforcer CPU |\n|---|---|---|---|---|\n\
                 | one bulk stream | {:.2} Gbit/s | {:.2} Gbit/s | {:.2}× | {:.0} ms per GB |\n\
                 | 64 B round trip, mean | {:.1} µs | {:.1} µs | {:.2}× | {:.1} ms per 1,000 |\n",
                f(&d["bulk_gbps_1"]),
                f(&e["bulk_gbps_1"]),
                f(&e["bulk_gbps_1"]) / f(&d["bulk_gbps_1"]).max(1e-9),
                f(&e["ms_per_gb_1_stream"]),
                f(&d["round_trip"]["mean_us"]),
                f(&e["round_trip"]["mean_us"]),
                f(&e["round_trip"]["mean_us"]) / f(&d["round_trip"]["mean_us"]).max(1e-9),
                f(&e["ms_per_1000_requests"]),
            ));
        }
    }
    if real.is_object() {
        let rounds = &figures["clients"]["rounds"];
        md.push_str(&format!("\n## Real clients (wrk against nginx, redis-benchmark against redis-server; paths alternating, {rounds} rounds: median, range, and the medians' ratio to direct)\n\n| scenario | path | median | range | vs direct |\n|---|---|---|---|---|\n"));
        for (scenario, by_path) in real.as_object().into_iter().flatten() {
            for path in [
                "direct",
                "authenticated-only",
                "encrypted",
                "inbound external",
            ] {
                let v = &by_path[path];
                if !v.is_object() {
                    continue;
                }
                md.push_str(&format!(
                    "| {scenario} | {path} | {:.0} | {:.0}–{:.0} | {:.2}× |\n",
                    f(&v["median"]),
                    f(&v["min"]),
                    f(&v["max"]),
                    f(&v["median"]) / f(&by_path["direct"]["median"]).max(1e-9)
                ));
            }
        }
        md.push_str("\n| enforcer CPU (both; inbound external: the server's alone) | path | median | range |\n|---|---|---|---|\n");
        let cpu = &figures["clients"]["enforcer_cpu"];
        for (unit, by_path) in cpu.as_object().into_iter().flatten() {
            for (path, v) in by_path.as_object().into_iter().flatten() {
                md.push_str(&format!(
                    "| {unit} | {path} | {:.1} ms | {:.1}–{:.1} ms |\n",
                    f(&v["median"]),
                    f(&v["min"]),
                    f(&v["max"])
                ));
            }
        }
    }
    let machine = &figures["clients"]["machine_cpu"];
    if machine.as_object().is_some_and(|m| !m.is_empty()) {
        md.push_str("\nThe whole machine's CPU per unit of work (`/proc/stat`: every process and the kernel's work outside any, such as softirqs and the worker that sends what BPF sockmap redirects; clients and servers included, so the mesh's cost is what a path adds to direct):\n\n| machine CPU | path | median | range | added to direct |\n|---|---|---|---|---|\n");
        for (unit, by_path) in machine.as_object().into_iter().flatten() {
            let direct = f(&by_path["direct"]["median"]);
            for (path, v) in by_path.as_object().into_iter().flatten() {
                md.push_str(&format!(
                    "| {unit} | {path} | {:.1} ms | {:.1}–{:.1} ms | {:+.1} ms |\n",
                    f(&v["median"]),
                    f(&v["min"]),
                    f(&v["max"]),
                    f(&v["median"]) - direct
                ));
            }
        }
    }
    md.push_str("\n## Enforcer CPU time per unit of work (both enforcers, user + system, from /proc/<pid>/stat)\n\n| mode | per GB (1 stream) | per 1,000 requests (64 B round trips) | per 1,000 new connections |\n|---|---|---|---|\n");
    for mode in modes {
        let c = &cpu[mode];
        md.push_str(&format!(
            "| {mode} | {:.0} ms | {:.1} ms | {:.0} ms |\n",
            f(&c["ms_per_gb_1_stream"]),
            f(&c["ms_per_1000_requests"]),
            f(&c["ms_per_1000_connections"])
        ));
    }
    md.push_str("\n## Idle connections held through both enforcers\n\n| mode | connections | enforcer | RSS before → held | RSS per connection | heap in use per connection | fds per connection |\n|---|---|---|---|---|---|---|\n");
    for mode in ["authenticated-only", "encrypted"] {
        let i = &figures["idle"][mode];
        for e in i["enforcers"].as_array().into_iter().flatten() {
            md.push_str(&format!(
                "| {mode} | {} | {} | {} → {} KiB | {:.1} KiB | {:.1} KiB | {:.2} |\n",
                i["connections"],
                e["enforcer"].as_str().unwrap_or(""),
                e["rss_kib_before"],
                e["rss_kib_held"],
                f(&e["rss_bytes_per_connection"]) / 1024.0,
                f(&e["heap_bytes_per_connection"]) / 1024.0,
                f(&e["fds_per_connection"])
            ));
        }
    }
    md.push_str("\n## Push fan-out (consoles on loopback, simulated enforcers watching)\n\nOne console on its redb file, one on etcd (one member on loopback), and two replicas on that etcd with the watchers spread over both (each commit made on the first; the second learns of it through etcd's watch).\n\n![fanout](fanout.svg)\n\n| consoles | watchers | p50 | p99 | max | missed | commit request p50 |\n|---|---|---|---|---|---|---|\n");
    for r in &fan {
        md.push_str(&format!(
            "| {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} | {:.1} ms |\n",
            r["setup"].as_str().unwrap_or("1 console, redb"),
            r["watchers"],
            f(&r["p50_ms"]),
            f(&r["p99_ms"]),
            f(&r["max_ms"]),
            r["missed"],
            f(&r["commit_p50_ms"])
        ));
    }
    md.push_str("\n## Policy decisions\n\n");
    let d = &figures["decision"];
    if let Some(note) = d["note"].as_str() {
        md.push_str(&format!("{note}\n"));
    } else {
        md.push_str(&format!(
            "criterion means (10,000 policies, 100,000 PUs): engine {:.0} ns per decision, naive {:.0} ns ({:.0}×); compile {:.1} ms.\n",
            f(&d["engine_decision_ns"]),
            f(&d["naive_decision_ns"]),
            f(&d["naive_decision_ns"]) / f(&d["engine_decision_ns"]).max(1e-9),
            f(&d["compile_10000_policies_ns"]) / 1e6
        ));
    }
    for n in figures["notes"].as_array().into_iter().flatten() {
        md.push_str(&format!("\nNote: {}\n", n.as_str().unwrap_or("")));
    }
    std::fs::write(out.join("report.md"), md)?;
    Ok(())
}

/// A table of sequential new connections by path: rate, its ratio to direct, and the
/// latency quantiles (`latency` names their two columns).
fn conn_table(md: &mut String, title: &str, latency: &str, conn: &Value, keys: &[String]) {
    md.push_str(&format!(
        "\n## {title}\n\n| path | per second | vs direct | {latency} |\n|---|---|---|---|---|\n"
    ));
    for k in keys {
        let c = &conn[k];
        if !c.is_object() {
            continue;
        }
        md.push_str(&format!(
            "| {k} | {:.0} | {:.3}× | {:.0} µs | {:.0} µs |\n",
            f(&c["per_second"]),
            f(&c["per_second"]) / f(&conn["direct"]["per_second"]).max(1e-9),
            f(&c["connect"]["p50_us"]),
            f(&c["connect"]["p99_us"])
        ));
    }
}
