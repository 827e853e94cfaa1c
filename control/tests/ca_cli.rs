//! `segmeshctl ca` end to end, checked with the openssl command line tool.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_segmeshctl"))
        .args(args)
        .output()
        .expect("run segmeshctl")
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (scripts/install-deps)")
}

struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "segmesh-ca-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn p(&self, s: &str) -> String {
        self.0.join(s).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn mode(p: &str) -> u32 {
    std::fs::metadata(Path::new(p))
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn init_issue_inspect_and_openssl_agrees() {
    let d = Dir::new();
    ok(&ctl(&["ca", "init", "--dir", &d.p("ca")]));
    assert_eq!(mode(&d.p("ca/ca.key")), 0o600);
    let out = ok(&ctl(&[
        "ca",
        "issue",
        "--dir",
        &d.p("ca"),
        "--name",
        "web",
        "--namespace",
        "/acme/shop",
        "--tag",
        "app=web",
        "--tag",
        "env=prod",
        "--ttl",
        "2h",
        "--out",
        &d.p("out/web"),
    ]));
    assert!(
        out.contains("spiffe://segmesh.local/ns/acme/shop/pu/web"),
        "{out}"
    );
    assert_eq!(mode(&d.p("out/web.key")), 0o600);

    let verify = ok(&openssl(&[
        "verify",
        "-CAfile",
        &d.p("ca/ca.crt"),
        &d.p("out/web.crt"),
    ]));
    assert!(verify.contains(": OK"), "{verify}");
    let text = ok(&openssl(&[
        "x509",
        "-in",
        &d.p("out/web.crt"),
        "-noout",
        "-text",
    ]));
    assert!(
        text.contains("URI:spiffe://segmesh.local/ns/acme/shop/pu/web"),
        "{text}"
    );
    assert!(
        text.contains("2.25.163311771432191581901065904493542588047"),
        "{text}"
    );
    // The tags are readable in the DER.
    let der = openssl(&["x509", "-in", &d.p("out/web.crt"), "-outform", "DER"]).stdout;
    for tag in [&b"app=web"[..], b"env=prod"] {
        assert!(
            der.windows(tag.len()).any(|w| w == tag),
            "{} not in the DER",
            String::from_utf8_lossy(tag)
        );
    }

    let shown = ok(&ctl(&["ca", "inspect", &d.p("out/web.crt")]));
    assert!(
        shown.contains("identity:   spiffe://segmesh.local/ns/acme/shop/pu/web"),
        "{shown}"
    );
    assert!(shown.contains("tags:       app=web env=prod"), "{shown}");
    assert!(
        shown.contains("valid, 1h 59m") || shown.contains("valid, 2h"),
        "{shown}"
    );
    let shown = ok(&ctl(&["ca", "inspect", &d.p("ca/ca.crt")]));
    assert!(shown.contains("(CA)"), "{shown}");
}

#[test]
fn intermediate_keeps_the_root_key_apart() {
    let d = Dir::new();
    ok(&ctl(&[
        "ca",
        "init",
        "--dir",
        &d.p("ca"),
        "--intermediate",
        "--trust-domain",
        "corp.example",
        "--algorithm",
        "ed25519",
    ]));
    assert_eq!(mode(&d.p("ca/root.key")), 0o600);
    ok(&ctl(&[
        "ca",
        "issue",
        "--dir",
        &d.p("ca"),
        "--name",
        "db",
        "--namespace",
        "/x",
        "--out",
        &d.p("db"),
    ]));
    let verify = ok(&openssl(&[
        "verify",
        "-CAfile",
        &d.p("ca/bundle.crt"),
        "-untrusted",
        &d.p("ca/ca.crt"),
        &d.p("db.crt"),
    ]));
    assert!(verify.contains(": OK"), "{verify}");
    let shown = ok(&ctl(&["ca", "inspect", &d.p("db.crt")]));
    assert!(
        shown.contains("spiffe://corp.example/ns/x/pu/db"),
        "{shown}"
    );
    assert!(
        shown.contains("certificate 1 (CA)"),
        "the chain carries the intermediate: {shown}"
    );
}

#[test]
fn refuses_to_overwrite_and_reports_bad_input() {
    let d = Dir::new();
    ok(&ctl(&["ca", "init", "--dir", &d.p("ca")]));
    let o = ctl(&["ca", "init", "--dir", &d.p("ca")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite"));
    let o = ctl(&[
        "ca",
        "issue",
        "--dir",
        &d.p("ca"),
        "--name",
        "bad name",
        "--out",
        &d.p("x"),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let o = ctl(&[
        "ca",
        "issue",
        "--dir",
        &d.p("ca"),
        "--name",
        "w",
        "--tag",
        "notag",
        "--out",
        &d.p("x"),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("notag"));
}
