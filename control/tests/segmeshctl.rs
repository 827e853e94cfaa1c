//! `segmeshctl test` and `explain` run as a user would: the real binary on the example
//! files, checking exit codes and output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier")
}

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_segmeshctl"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run segmeshctl")
}

/// A scratch copy of the example folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "segmeshctl-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["policies.yaml", "cases.yaml"] {
            std::fs::copy(examples().join(f), dir.join(f)).unwrap();
        }
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn the_example_passes() {
    let o = ctl(&["test", "-f", examples().to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    assert!(out.contains("45 passed, 0 failed"), "{out}");
    assert!(out.contains("server: /acme:quarantine/in/0"), "{out}");
}

#[test]
fn a_changed_expectation_fails_with_exit_1() {
    let s = Scratch::new();
    let cases = s.0.join("cases.yaml");
    let t = std::fs::read_to_string(&cases).unwrap();
    let changed = t.replacen(
        "port: tcp/443, expect: allow",
        "port: tcp/443, expect: reject",
        1,
    );
    assert_ne!(t, changed);
    std::fs::write(&cases, changed).unwrap();
    let o = ctl(&["test", "-f", s.0.to_str().unwrap()]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("FAIL   internet reaches web on 443"), "{out}");
    assert!(out.contains("44 passed, 1 failed"), "{out}");
}

#[test]
fn broken_yaml_exits_2_with_file_line_column() {
    let s = Scratch::new();
    let p = s.0.join("policies.yaml");
    let t = std::fs::read_to_string(&p).unwrap();
    // Break line 20's flow sequence (the `internet` network's entries).
    let broken = t.replacen(
        "entries: [0.0.0.0/0, \"::/0\"]",
        "entries: [0.0.0.0/0, \"::/0\"",
        1,
    );
    assert_ne!(t, broken);
    let line = broken
        .lines()
        .position(|l| l.starts_with("entries: [0.0.0.0/0"))
        .unwrap()
        + 1;
    std::fs::write(&p, broken).unwrap();
    let o = ctl(&["test", "-f", s.0.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}\n{err}");
    assert!(out.is_empty(), "nothing is evaluated: {out}");
    let want = format!("{}:", p.display());
    assert!(
        err.contains(&want) && err.contains("YAML syntax error"),
        "{err}"
    );
    // The reported line is at or right after the broken one.
    let reported: usize = err
        .split(&want)
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (line..=line + 2).contains(&reported),
        "line {reported} for a break on {line}: {err}"
    );
}

#[test]
fn invalid_policy_exits_2_naming_the_field() {
    let s = Scratch::new();
    let p = s.0.join("policies.yaml");
    let t = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        t.replacen("ports: [tcp/5432]", "ports: [tcp/54321x]", 1),
    )
    .unwrap();
    let o = ctl(&["test", "-f", s.0.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "field `ports[0]`: expected `tcp/N`, `tcp/N-M`, `udp/N`, `udp/N-M`, `icmp` or `any`, found `tcp/54321x`"
        ),
        "{err}"
    );
}

#[test]
fn json_output() {
    let o = ctl(&[
        "test",
        "-f",
        examples().to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["passed"], 45);
    assert_eq!(v["failed"], 0);
    let first = &v["cases"][0];
    assert_eq!(first["name"], "internet reaches web on 443");
    assert_eq!(first["expect"], "allow");
    assert_eq!(first["actual"], "allow");
    assert_eq!(first["pass"], true);
    assert_eq!(first["policies"][0], "/acme/shop:internet-to-web");
}

#[test]
fn explain_shows_both_ends_tier_by_tier() {
    let o = ctl(&[
        "explain",
        "-f",
        examples().to_str().unwrap(),
        "--from",
        "app=web,env=prod",
        "--to",
        "app=api,env=prod",
        "--port",
        "tcp/8089",
        "--namespace",
        "/acme/shop",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        out.contains("client enforcer, deciding as outgoing"),
        "{out}"
    );
    assert!(
        out.contains("server enforcer, deciding as incoming"),
        "{out}"
    );
    assert!(
        out.contains("beats any Allow (/acme/shop:api-debug-port-closed)"),
        "{out}"
    );
    assert!(out.contains("flow: REJECT"), "{out}");
    // An address end: only the server decides, and the network is named.
    let o = ctl(&[
        "explain",
        "-f",
        examples().to_str().unwrap(),
        "--from-ip",
        "192.0.2.7",
        "--to",
        "app=db,env=prod",
        "--port",
        "tcp/22",
        "--namespace",
        "/acme/shop",
    ]);
    let (out, _) = text(&o);
    assert!(!out.contains("client enforcer"), "{out}");
    assert!(
        out.contains("network(s) /acme:admin, /acme:internet"),
        "{out}"
    );
    assert!(out.contains("flow: ALLOW"), "{out}");
    // Bad flags are invalid input.
    let o = ctl(&[
        "explain",
        "-f",
        examples().to_str().unwrap(),
        "--from",
        "app",
        "--to",
        "a=b",
        "--port",
        "tcp/1",
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn inject_adds_the_sidecar_once_and_leaves_the_rest() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes/shop.yaml");
    let o = ctl(&[
        "inject",
        "-f",
        manifest.to_str().unwrap(),
        "--console-url",
        "https://console:8443",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let report = String::from_utf8_lossy(&o.stderr).into_owned();
    for w in [
        "Deployment web: injected",
        "Deployment api: injected",
        "StatefulSet db: injected",
    ] {
        assert!(report.contains(w), "{report}");
    }
    assert_eq!(out.matches("name: segmesh-proxy").count(), 3, "{out}");
    assert!(
        out.contains("- port: 8080   # the API"),
        "the Service is copied with its comment"
    );
    assert!(out.contains("token: replace-with-the-token"));
    // Through stdin, a second time: nothing changes.
    let mut child = Command::new(env!("CARGO_BIN_EXE_segmeshctl"))
        .args(["inject", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), out.as_bytes()).unwrap();
    let again = child.wait_with_output().unwrap();
    assert!(again.status.success());
    assert_eq!(String::from_utf8_lossy(&again.stdout), out);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already injected"));
}
