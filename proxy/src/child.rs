//! Helper processes the enforcer runs for as long as it reads them (conntrack's event
//! stream). The one `unsafe` block here asks the kernel to kill such a child when the
//! thread that started it ends, so that no helper outlives its enforcer.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// Starts `cmd` so that the kernel kills it (SIGKILL) when the calling thread ends
/// (prctl(2) `PR_SET_PDEATHSIG`: the "parent" is the thread that forked). Start it
/// from the thread that reads it for as long as it is needed.
pub(crate) fn spawn_bound_to_thread(cmd: &mut Command) -> std::io::Result<Child> {
    // Safety: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: prctl(2) is a plain system call, and nix's
    // wrapper and the Errno-to-io::Error conversion allocate nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The child dies with the thread that started it.
    #[test]
    fn the_child_ends_with_its_thread() {
        let pid = std::thread::spawn(|| {
            let child = spawn_bound_to_thread(Command::new("sleep").arg("30")).unwrap();
            // The child is not waited for here; its thread ends now.
            child.id()
        })
        .join()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Killed: gone, or a zombie until reaped (we are its parent process).
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            if stat.is_empty() || state == Some("Z") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pid {pid} outlived its thread: {stat}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Reap it.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    }
}
