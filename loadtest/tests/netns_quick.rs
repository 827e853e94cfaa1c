//! The load harness itself keeps working: `segmesh-loadtest quick` builds its topology,
//! starts enforcers and runs every scenario small. No figure is asserted (a unit test is
//! no benchmark); only that every scenario completes and reports.

#[test]
fn netns_loadtest_quick_runs_every_scenario() {
    if !segmesh_testkit::netns_enabled() {
        return;
    }
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_segmesh-loadtest"));
    let proxy = exe.with_file_name("segmesh-proxy");
    assert!(
        proxy.exists(),
        "{} is built by `cargo test --workspace`",
        proxy.display()
    );
    let out = std::process::Command::new(exe)
        .args(["quick", "--proxy"])
        .arg(&proxy)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for line in [
        "through one enforcer",
        "tunnel, encrypted (rustls)",
        "tunnel, authenticated-only",
        "new connections",
        "push fan-out",
    ] {
        assert!(text.contains(line), "`{line}` missing:\n{text}");
    }
}
