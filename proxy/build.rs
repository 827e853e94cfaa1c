//! Compiles the enforcer's BPF program (`bpf/relay.bpf.c`) with clang, as Debian's
//! `clang` and `libbpf-dev` provide them (`scripts/install-deps`). Without clang the
//! enforcer is built without it, says so at start, and splices in user space; set
//! `SEGMESH_REQUIRE_BPF=1` to make a missing clang a build error instead (CI does).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/relay.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=SEGMESH_REQUIRE_BPF");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("relay.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // linux/bpf.h includes asm/types.h, which Debian keeps under the multiarch directory.
    let multiarch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    let built = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", src, "-o"])
        .arg(&out)
        .status();
    // What to watch for the build to be tried again (below): the headers' directory
    // when clang ran and failed (libbpf-dev missing), clang's when it could not run.
    let (failure, watch) = match built {
        Ok(s) if s.success() => return,
        Ok(s) => (
            format!("{clang} failed on {src} ({s})"),
            vec![PathBuf::from("/usr/include")],
        ),
        Err(e) => (
            format!("cannot run {clang} ({e}); install clang and libbpf-dev"),
            clang_dirs(&clang),
        ),
    };
    if std::env::var_os("SEGMESH_REQUIRE_BPF").is_some_and(|v| v == "1") {
        panic!("BPF program not built: {failure}");
    }
    println!("cargo:warning=BPF sockmap data plane not built: {failure}");
    // Built again once clang or the headers arrive (`scripts/install-deps` after a
    // first build): cargo reruns this script when a watched directory changes, and
    // installing a package changes the directories it lands in. Only here, on the
    // fallback: a build that has its BPF object watches nothing more.
    println!("cargo:rerun-if-env-changed=PATH");
    for dir in watch.iter().filter(|d| d.is_dir()) {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    // An empty object: the enforcer reports BPF as unavailable and splices.
    std::fs::write(&out, b"").expect("write empty BPF object");
}

/// Where `clang` would be found: the directory of a path (`CLANG=/opt/llvm/bin/clang`),
/// or each directory of `PATH` for a bare name. (Only existing ones are watched: a
/// missing path would make cargo rerun this script on every build.)
fn clang_dirs(clang: &str) -> Vec<PathBuf> {
    match std::path::Path::new(clang).parent() {
        Some(p) if !p.as_os_str().is_empty() => vec![p.to_path_buf()],
        _ => std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default(),
    }
}
