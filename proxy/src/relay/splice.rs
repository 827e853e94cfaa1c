//! The data plane of an allowed flow: bytes move between the two sockets with
//! `splice(2)` through a pipe in each direction, never through user space, once a
//! direction carries bulk; a read shorter than [`SMALL`] (requests and answers of a
//! chatty protocol) is copied through a short-lived buffer of that size instead, which
//! costs the same two syscalls without a pipe to make and keep. A FIN in one
//! direction is passed on with `shutdown(SHUT_WR)` while the other direction keeps
//! flowing; a reset is passed on as a reset; a connection idle in both directions past
//! the timeout is closed. Copying through a buffer is the fallback only when splicing is
//! impossible (no pipe could be made, or the kernel refuses splice for these
//! descriptors); it is counted.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use segmesh_api::CloseReason;

use crate::socket;

/// Pipe capacity asked for (fcntl F_SETPIPE_SZ); the kernel may grant less.
const PIPE_SIZE: i32 = 1 << 20;
const COPY_BUF: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    Spliced,
    Copied,
    /// UDP datagrams, each relayed whole.
    Datagrams,
    /// Copied on purpose, to read it (DNS over TCP).
    Inspected,
    /// Redirected by the kernel (BPF sockmap), never waking the enforcer.
    Kernel,
    /// An authenticated-only flow that started in its tunnel stream and moved to a
    /// spliced connection of its own.
    Moved,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Both directions ended with a FIN.
    Closed,
    /// One side reset; the other was reset too.
    Reset,
    /// No bytes either way for the idle timeout.
    Idle,
    /// Another I/O error.
    Error,
    /// Closed by the enforcer: a new snapshot rejects the flow.
    Policy,
    /// A UDP session pushed out of the full session table by a newer one.
    Evicted,
}

impl From<Close> for CloseReason {
    fn from(c: Close) -> CloseReason {
        match c {
            Close::Closed => CloseReason::Closed,
            Close::Reset => CloseReason::Reset,
            Close::Idle => CloseReason::Idle,
            Close::Error => CloseReason::Error,
            Close::Policy => CloseReason::Policy,
            Close::Evicted => CloseReason::Evicted,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Bytes from the first stream to the second, and back.
    pub forward: u64,
    pub backward: u64,
    pub path: DataPath,
    pub close: Close,
}

/// Byte counters the relay updates as it goes (for metrics and idle detection).
#[derive(Debug, Default)]
pub struct Progress {
    pub forward: AtomicU64,
    pub backward: AtomicU64,
}

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

fn pipe() -> io::Result<Pipe> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A larger pipe means fewer splice calls per megabyte; failing to grow it is fine.
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    Ok(Pipe { r, w })
}

/// An error that says the socket's peer reset the connection. `NotConnected` too: a
/// socket reset while its flow was passing a FIN to it answers the `shutdown` that way
/// (the reset came between the relay's wake-up and its call).
pub(crate) fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    )
}

/// A direction that moved nothing for this long gives its pipe back (an idle
/// connection holds no pipe; the next bytes get a new one). Short: a burst of new
/// connections that each move a few bytes would otherwise hold two descriptors per
/// direction each for as long (at 2,000 new flows/s and 1 s that was 8,000 descriptors
/// per enforcer); long enough that a bulk flow keeps its pipe between reads.
const PIPE_IDLE: Duration = Duration::from_millis(100);

/// Reads up to this size are copied (see the module doc); a read that fills it means
/// bulk, and the direction takes a pipe and splices until it idles for [`PIPE_IDLE`].
pub const SMALL: usize = 4096;

/// Moves bytes from `src` to `dst` until EOF (the relay passes the FIN on): short reads
/// through a buffer taken for the read, bulk through a pipe taken when a read fills that
/// buffer and given back after `PIPE_IDLE` without bytes.
pub(crate) async fn pump_splice(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &AtomicU64,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut held: Option<Pipe> = None;
    loop {
        if held.is_some() {
            match tokio::time::timeout(PIPE_IDLE, src.readable()).await {
                Ok(r) => r?,
                Err(_) => {
                    // Empty (every splice into it was drained): safe to close.
                    held = None;
                    src.readable().await?;
                }
            }
        } else {
            src.readable().await?;
        }
        let Some(pipe) = &held else {
            let n = match copy_once(src, dst, &mut vec![0u8; SMALL], counter).await? {
                Read::Bytes(n) => n,
                Read::Again => continue,
                Read::End => return Ok(()),
            };
            if n == SMALL {
                held = Some(pipe()?);
            }
            continue;
        };
        let read = src.try_io(Interest::READABLE, || {
            splice(
                src.as_fd(),
                None,
                pipe.w.as_fd(),
                None,
                PIPE_SIZE as usize,
                flags,
            )
            .map_err(io::Error::from)
        });
        let n = match after_read(read)? {
            Read::Bytes(n) => n,
            Read::Again => continue,
            Read::End => return Ok(()),
        };
        write_out(dst, n, counter, |_, left| {
            splice(pipe.r.as_fd(), None, dst.as_fd(), None, left, flags).map_err(io::Error::from)
        })
        .await?;
    }
}

/// What a non-blocking read of a relay gave.
enum Read {
    Bytes(usize),
    /// Not ready after all: wait again.
    Again,
    /// The end of the stream, passed on to the other side as a FIN.
    End,
}

fn after_read(r: io::Result<usize>) -> io::Result<Read> {
    match r {
        Ok(0) => Ok(Read::End),
        Ok(n) => Ok(Read::Bytes(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Read::Again),
        Err(e) => Err(e),
    }
}

/// Writes `n` bytes to `dst` with `write(done, left)` (a non-blocking syscall), waiting
/// for writability between partial writes; counts them.
pub(super) async fn write_out(
    dst: &TcpStream,
    n: usize,
    counter: &AtomicU64,
    mut write: impl FnMut(usize, usize) -> io::Result<usize>,
) -> io::Result<()> {
    let mut done = 0;
    while done < n {
        dst.writable().await?;
        match dst.try_io(Interest::WRITABLE, || write(done, n - done)) {
            Ok(m) => {
                done += m;
                counter.fetch_add(m as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One non-blocking read of `src` into `buf`. A read that does not fill `buf` emptied the
/// socket's receive queue, so the socket's readiness is cleared as an EAGAIN would clear
/// it: the relay then waits instead of making the read that would only say EAGAIN (one
/// syscall of three per message of a request/response flow). Nothing is missed: tokio
/// clears only the readiness this read answered (bytes that arrived after it set it
/// again), and never clears an end of stream.
pub(crate) fn read_draining(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut drained = None;
    let r = src.try_io(Interest::READABLE, || {
        let n = nix::unistd::read(src.as_fd(), buf).map_err(io::Error::from)?;
        if n > 0 && n < buf.len() {
            drained = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, drained) {
        (_, Some(n)) => Ok(n),
        (r, None) => r,
    }
}

/// One read from `src` (readable) into `buf`, written out to `dst` and counted.
async fn copy_once(
    src: &TcpStream,
    dst: &TcpStream,
    buf: &mut [u8],
    counter: &AtomicU64,
) -> io::Result<Read> {
    let read = after_read(read_draining(src, buf))?;
    if let Read::Bytes(n) = read {
        write_out(dst, n, counter, |done, _| {
            nix::unistd::write(dst.as_fd(), &buf[done..n]).map_err(io::Error::from)
        })
        .await?;
    }
    Ok(read)
}

/// The same through a user-space buffer.
async fn pump_copy(src: &TcpStream, dst: &TcpStream, counter: &AtomicU64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        src.readable().await?;
        if let Read::End = copy_once(src, dst, &mut buf, counter).await? {
            return Ok(());
        }
    }
}

/// Whether the kernel splices between these descriptors: a zero-length splice checks
/// the descriptor types without moving data (EINVAL when unsupported).
fn splice_supported(s: &TcpStream, p: &Pipe) -> bool {
    !matches!(
        splice(
            s.as_fd(),
            None,
            p.w.as_fd(),
            None,
            0,
            SpliceFFlags::SPLICE_F_NONBLOCK
        ),
        Err(Errno::EINVAL) | Err(Errno::ENOSYS)
    )
}

/// A direction's pump has ended (`r`): on its source's end of stream, the FIN is passed
/// on to `dst`, with `shutdown` while the other direction still runs, and left to the
/// `close` that follows at once when that one has ended too (its own end was read, so
/// nothing unread makes the close a reset): one syscall less per flow.
fn ended(r: io::Result<()>, other_done: bool, dst: &TcpStream) -> io::Result<()> {
    r?;
    if !other_done {
        socket::shutdown_write(dst)?;
    }
    Ok(())
}

/// Relays until both directions end, one side resets, or both stay idle past `idle`.
/// `force_copy` selects the copy path (tests of the fallback).
#[cfg(test)]
pub async fn relay(
    a: TcpStream,
    b: TcpStream,
    idle: Duration,
    force_copy: bool,
    progress: &Progress,
) -> Outcome {
    relay_until(
        a,
        b,
        idle,
        force_copy,
        progress,
        &tokio::sync::Notify::new(),
        None,
    )
    .await
}

/// [`relay`], also ending (both sides reset, [`Close::Policy`]) when `stop` is notified.
/// With `kernel`, the flow is handed to the kernel relay (BPF sockmap) if it takes it.
pub(crate) async fn relay_until(
    mut a: TcpStream,
    mut b: TcpStream,
    idle: Duration,
    force_copy: bool,
    progress: &Progress,
    stop: &tokio::sync::Notify,
    kernel: Option<&super::sockmap::Sockmap>,
) -> Outcome {
    if let (false, Some(k)) = (force_copy, kernel) {
        // Boxed: inline, the kernel relay's state would make every spliced flow's task
        // as large as a kernel-relayed one's (docs/design.md, "what an idle flow costs").
        match Box::pin(k.relay(a, b, idle, progress, stop)).await {
            super::sockmap::Handoff::Done(o) => return o,
            super::sockmap::Handoff::Declined(x, y, (fwd, bwd)) => {
                (a, b) = (x, y);
                progress.forward.store(fwd, Ordering::Relaxed);
                progress.backward.store(bwd, Ordering::Relaxed);
            }
        }
    }
    // Whether TCP sockets splice here, checked once with a pipe that is closed again
    // (a kernel property: every relay is between two TCP sockets); the pumps take their
    // own pipes only while bytes flow.
    static SPLICES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let spliced = !force_copy
        && *SPLICES.get_or_init(|| {
            pipe().is_ok_and(|p| splice_supported(&a, &p) && splice_supported(&b, &p))
        });
    let path = if spliced {
        DataPath::Spliced
    } else {
        DataPath::Copied
    };

    // The pumps borrow both streams; they end with this block, before the resets.
    let close = {
        let fwd = async {
            if spliced {
                pump_splice(&a, &b, &progress.forward).await
            } else {
                pump_copy(&a, &b, &progress.forward).await
            }
        };
        let bwd = async {
            if spliced {
                pump_splice(&b, &a, &progress.backward).await
            } else {
                pump_copy(&b, &a, &progress.backward).await
            }
        };
        // Checks four times per idle period (as encrypted relays do): a flow idle for
        // `idle` ends within a quarter of it more, and 10,000 idle flows under the
        // default hour do not wake the enforcer 10,000 times a second.
        let watchdog = async {
            let mut last = (0, 0);
            let mut since = Instant::now();
            loop {
                tokio::time::sleep((idle / 4).max(Duration::from_millis(10))).await;
                let now = (
                    progress.forward.load(Ordering::Relaxed),
                    progress.backward.load(Ordering::Relaxed),
                );
                if now != last {
                    last = now;
                    since = Instant::now();
                } else if since.elapsed() >= idle {
                    return;
                }
            }
        };

        tokio::pin!(fwd, bwd, watchdog);
        let (mut fwd_done, mut bwd_done) = (false, false);
        let mut close = Close::Closed;
        while !(fwd_done && bwd_done) {
            tokio::select! {
                r = &mut fwd, if !fwd_done => {
                    fwd_done = true;
                    if let Err(e) = ended(r, bwd_done, &b) { close = if is_reset(&e) { Close::Reset } else { Close::Error }; break; }
                }
                r = &mut bwd, if !bwd_done => {
                    bwd_done = true;
                    if let Err(e) = ended(r, fwd_done, &a) { close = if is_reset(&e) { Close::Reset } else { Close::Error }; break; }
                }
                _ = &mut watchdog => { close = Close::Idle; break; }
                _ = stop.notified() => { close = Close::Policy; break; }
            }
        }
        close
    };
    let outcome = Outcome {
        forward: progress.forward.load(Ordering::Relaxed),
        backward: progress.backward.load(Ordering::Relaxed),
        path,
        close,
    };
    // Pass a reset on as a reset; an idle or failed connection is reset too, so that
    // neither application waits on a half-dead peer.
    if close != Close::Closed {
        socket::reset(a);
        socket::reset(b);
    }
    outcome
}

#[cfg(test)]
pub(crate) mod tests;
