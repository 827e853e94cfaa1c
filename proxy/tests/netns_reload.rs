//! Configuration reloads: on file change, on SIGHUP, atomically; a broken file keeps the
//! previous configuration; with none at all the enforcer rejects everything.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use segmesh_testkit::{Host, Topology, netns_enabled, wait_until};

fn get(h: &Host, path: &str) -> (u16, String) {
    let path = path.to_owned();
    h.thread(move || {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect("127.0.0.1:15020") else {
            return (0, String::new());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (
            status,
            out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned(),
        )
    })
    .join()
    .unwrap()
}

fn config(h: &Host) -> serde_json::Value {
    serde_json::from_str(&get(h, "/config").1).unwrap_or(serde_json::Value::Null)
}

fn policy(name: &str) -> String {
    format!(
        "kind: NetworkPolicy\nname: {name}\naction: Allow\nmode: Outgoing\nsubject: [[a=b]]\nobject: [[c=d]]\n---\n"
    )
}

/// Replaces a file atomically (write a sibling, rename), as configuration tools do.
fn put(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(tag: &str, policies: &str) -> (Dir, PathBuf) {
    let d = std::env::temp_dir().join(format!("segmesh-reload-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("policies.yaml"), policies).unwrap();
    let cfg = d.join("enforcer.yaml");
    std::fs::write(
        &cfg,
        "pu: {name: w, namespace: /, tags: [a=b]}\npolicies: [policies.yaml]\n",
    )
    .unwrap();
    (Dir(d), cfg)
}

fn start(topo: &Topology, cfg: &Path) -> u32 {
    let h = topo.host("work");
    let mut cmd = h.command(env!("CARGO_BIN_EXE_segmesh-proxy"));
    cmd.arg("--local-config").arg(cfg);
    let pid = topo.spawn(cmd);
    wait_until("the admin port", Duration::from_secs(20), || {
        get(h, "/healthz").0 == 200
    });
    pid
}

#[test]
fn netns_reload_on_change_and_sighup_keeps_old_on_error() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["work"]);
    let h = topo.host("work");
    let (dir, cfg) = setup("change", &policy("one"));
    let pid = start(&topo, &cfg);
    assert_eq!(get(h, "/ready").0, 200);
    assert_eq!(config(h)["policies"], 1);
    let file = dir.0.join("policies.yaml");

    // A file change is picked up.
    put(&file, &(policy("one") + &policy("two")));
    wait_until("the new policies", Duration::from_secs(10), || {
        config(h)["policies"] == 2
    });
    let good = config(h)["version"].clone();

    // A broken file is refused; the previous configuration stays in force.
    put(&file, "kind: NetworkPolicy\nname: [broken\n");
    wait_until("the rejected reload", Duration::from_secs(10), || {
        get(h, "/metrics")
            .1
            .contains("segmesh_config_reloads_total{result=\"error\"} 1")
    });
    assert_eq!(config(h)["version"], good);
    assert_eq!(config(h)["policies"], 2);
    assert_eq!(get(h, "/ready").0, 200);

    // SIGHUP reloads even when nothing the watcher looks at (size, mtime) changed.
    let text = policy("one") + &policy("two");
    put(&file, &text);
    wait_until("recovery", Duration::from_secs(10), || {
        get(h, "/metrics")
            .1
            .contains("segmesh_config_reloads_total{result=\"ok\"} 2")
    });
    assert_eq!(config(h)["version"], good, "same content, same version");
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    // Same size and mtime, swapped in by rename so the watcher never sees a half state.
    let tmp = dir.0.join("policies.yaml.tmp");
    std::fs::write(&tmp, text.replace("name: two", "name: six")).unwrap();
    File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // two watcher periods: no reload
    assert_eq!(config(h)["version"], good, "the watcher saw no change");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until("the SIGHUP reload", Duration::from_secs(10), || {
        config(h)["version"] != good
    });
    assert_eq!(config(h)["policies"], 2);
}

#[test]
fn netns_no_configuration_fails_closed() {
    if !netns_enabled() {
        return;
    }
    let topo = Topology::new(&["work"]);
    let h = topo.host("work");
    let (dir, cfg) = setup("closed", "kind: NetworkPolicy\nname: [broken\n");
    start(&topo, &cfg);
    assert_eq!(get(h, "/ready").0, 503);
    assert_eq!(config(h)["fail_closed"], true);
    put(&dir.0.join("policies.yaml"), &policy("one"));
    wait_until("a valid configuration", Duration::from_secs(10), || {
        get(h, "/ready").0 == 200
    });
    assert_eq!(config(h)["policies"], 1);
}
