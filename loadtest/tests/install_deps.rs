//! `scripts/install-deps` keeps the services it installs from starting: for the length of
//! `apt-get install` a `policy-rc.d` answers 101 (Debian's "action forbidden"), and it is
//! gone afterwards; a `policy-rc.d` the machine already had is left as it is. Run against
//! a fake `dpkg` (one package missing), a fake `apt-get` (it runs the policy as a
//! maintainer script would and notes what it answered) and a fake `sudo`, so no package
//! is installed and no root is needed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory of its own, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d =
            std::env::temp_dir().join(format!("segmesh-install-deps-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("bin")).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn script(dir: &Path, name: &str, body: &str) {
    let p = dir.join("bin").join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs the script with `missing` as the one package `dpkg` does not know; what the fake
/// `apt-get install` saw (`policy=<exit code>` or `policy=none`), or `None` when it was
/// not run.
fn install(s: &Scratch, missing: &str) -> Option<String> {
    let dir = &s.0;
    let policy = dir.join("policy-rc.d");
    let log = dir.join("apt.log");
    script(
        dir,
        "dpkg",
        &format!("[ \"$2\" = {missing} ] && exit 1; exit 0"),
    );
    script(dir, "kubectl", "exit 0");
    script(dir, "sudo", "exec \"$@\"");
    script(
        dir,
        "apt-get",
        &format!(
            "[ \"$1\" = install ] || exit 0\n\
             if [ -x {p} ]; then {p} nginx start; echo policy=$? >> {l}; else echo policy=none >> {l}; fi",
            p = policy.display(),
            l = log.display()
        ),
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new("bash")
        .arg(root.join("scripts/install-deps"))
        .env(
            "PATH",
            format!(
                "{}:/usr/sbin:/usr/bin:/sbin:/bin",
                dir.join("bin").display()
            ),
        )
        .env("SEGMESH_POLICY_RC_D", &policy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install-deps: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&log).ok()
}

#[test]
fn no_service_starts_during_the_install_and_the_policy_goes_afterwards() {
    let s = Scratch::new("fresh");
    let seen = install(&s, "nginx-light");
    assert_eq!(
        seen.as_deref(),
        Some("policy=101\n"),
        "what apt-get's install saw"
    );
    assert!(
        !s.0.join("policy-rc.d").exists(),
        "the policy is gone after the install"
    );
}

#[test]
fn a_policy_the_machine_had_is_left_as_it_is() {
    let s = Scratch::new("kept");
    let policy = s.0.join("policy-rc.d");
    let own = "#!/bin/sh\n# the machine's own\nexit 0\n";
    std::fs::write(&policy, own).unwrap();
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let seen = install(&s, "redis-server");
    assert_eq!(
        seen.as_deref(),
        Some("policy=0\n"),
        "its own answer, not ours"
    );
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), own);
}

#[test]
fn nothing_missing_installs_nothing_and_writes_no_policy() {
    let s = Scratch::new("none");
    assert_eq!(
        install(&s, "no-such-package"),
        None,
        "apt-get install was run"
    );
    assert!(!s.0.join("policy-rc.d").exists());
}
