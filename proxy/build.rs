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
    let failure = match built {
        Ok(s) if s.success() => return,
        Ok(s) => format!("{clang} failed on {src} ({s})"),
        Err(e) => format!("cannot run {clang} ({e}); install clang and libbpf-dev"),
    };
    if std::env::var_os("SEGMESH_REQUIRE_BPF").is_some_and(|v| v == "1") {
        panic!("BPF program not built: {failure}");
    }
    println!("cargo:warning=BPF sockmap data plane not built: {failure}");
    // An empty object: the enforcer reports BPF as unavailable and splices.
    std::fs::write(&out, b"").expect("write empty BPF object");
}
