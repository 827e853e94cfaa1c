//! The load harness itself keeps working: `segmesh-loadtest --quick` builds its
//! topology, starts enforcers and a console, runs every scenario small and writes its
//! report. No figure is asserted (a unit test is no benchmark); only that every scenario
//! ran and reported.

#[test]
fn netns_loadtest_quick_runs_every_scenario_and_writes_the_report() {
    if !segmesh_testkit::netns_enabled() {
        return;
    }
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_segmesh-loadtest"));
    for b in ["segmesh-proxy", "segmesh-control"] {
        assert!(
            exe.with_file_name(b).exists(),
            "{b} is built by `cargo test --workspace`"
        );
    }
    let out_dir = std::env::temp_dir().join(format!("segmesh-lt-quick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = std::process::Command::new(exe)
        .args(["--quick", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap())
            .unwrap();
    let fig = &report["figures"];
    for path in ["direct", "authenticated-only", "encrypted"] {
        assert!(
            fig["bulk_gbps"]["1"][path].as_f64().unwrap() > 0.0,
            "{path}: {text}"
        );
        assert!(
            fig["bulk_gbps"]["8"][path].as_f64().unwrap() > 0.0,
            "{path}: {text}"
        );
        assert!(
            fig["latency"][path]["samples"].as_u64().unwrap() > 0,
            "{path}"
        );
        assert!(fig["connections"][path]["per_second"].as_f64().unwrap() > 0.0);
    }
    for path in ["authenticated-only", "encrypted"] {
        let cpu = &fig["enforcer_cpu"][path];
        for unit in [
            "ms_per_gb_1_stream",
            "ms_per_1000_requests",
            "ms_per_1000_connections",
        ] {
            assert!(cpu[unit].as_f64().unwrap() >= 0.0, "{path} {unit}: {cpu}");
        }
    }
    assert!(
        fig["enforcer_cpu"]["encrypted"]["ms_per_1000_connections"]
            .as_f64()
            .unwrap()
            > 0.0,
        "new connections cost the enforcers CPU time"
    );
    for mode in ["authenticated-only", "encrypted"] {
        assert_eq!(fig["idle"][mode]["connections"], 200, "{mode}");
    }
    // Real clients (CI installs them with scripts/install-deps).
    let real = &fig["clients"]["figures"];
    for scenario in [
        "http keep-alive requests/s",
        "http new connections/s",
        "redis SET, 10 clients, requests/s",
        "redis GET, 10 clients, requests/s",
        "redis SET, 10 clients, pipeline 16, requests/s",
    ] {
        for path in [
            "direct",
            "authenticated-only",
            "encrypted",
            "inbound external",
        ] {
            assert!(
                real[scenario][path]["median"].as_f64().unwrap_or(0.0) > 0.0,
                "{scenario} {path}: {real}"
            );
        }
    }
    assert!(
        fig["clients"]["enforcer_cpu"]["ms per 1,000 redis SETs"]["encrypted"]["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // The whole machine's CPU per unit, every path, direct included.
    for unit in [
        "ms per 1,000 http requests",
        "ms per 1,000 new connections (http)",
        "ms per 1,000 redis SETs",
    ] {
        for path in ["direct", "authenticated-only", "encrypted"] {
            let v = fig["clients"]["machine_cpu"][unit][path]["median"]
                .as_f64()
                .unwrap_or(0.0);
            assert!(v > 0.0, "machine CPU {unit} {path}: {v}");
        }
    }
    // Clients outside the mesh, through the server's enforcer alone.
    assert!(
        fig["clients"]["enforcer_cpu"]["ms per 1,000 http requests"]["inbound external"]["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let inbound = &fig["connections_inbound_external"];
    for path in ["direct", "enforcer"] {
        assert!(
            inbound[path]["per_second"].as_f64().unwrap() > 0.0,
            "{inbound}"
        );
        assert!(
            inbound[path]["bulk_gbps_1"].as_f64().unwrap() > 0.0,
            "{inbound}"
        );
        assert!(
            inbound[path]["round_trip"]["samples"].as_u64().unwrap() > 0,
            "{inbound}"
        );
    }
    // Present for the enforcer (not for direct); CPU time comes in clock ticks (10 ms),
    // so a quick run's small bulk can cost "0", as for the mesh paths above.
    for unit in [
        "ms_per_1000_connections",
        "ms_per_gb_1_stream",
        "ms_per_1000_requests",
    ] {
        assert!(
            inbound["enforcer"][unit].as_f64().unwrap() >= 0.0,
            "{unit}: {inbound}"
        );
        assert!(inbound["direct"][unit].is_null(), "{unit}: {inbound}");
    }
    assert_eq!(fig["fanout"][0]["missed"], 0);
    assert!(report["machine"]["cores"].as_u64().unwrap() > 0);
    assert!(report["targets"].as_array().unwrap().len() >= 5);
    for f in [
        "report.md",
        "throughput.svg",
        "latency.svg",
        "connections.svg",
        "fanout.svg",
    ] {
        let body = std::fs::read_to_string(out_dir.join(f)).unwrap();
        assert!(!body.is_empty(), "{f}");
        if f.ends_with(".svg") {
            assert!(
                body.contains("<svg") && body.contains("<rect"),
                "{f} is a chart"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}
