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
        // Started on a thread that ends at once; handed back here to be reaped.
        let mut child =
            std::thread::spawn(|| spawn_bound_to_thread(Command::new("sleep").arg("30")).unwrap())
                .join()
                .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the child outlived its thread");
            std::thread::sleep(Duration::from_millis(20));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "killed: {status:?}");
    }
}
