//! Spliced flows handed to the kernel. Where BPF sockmap is available, an allowed flow
//! whose bytes would be spliced is given to a stream verdict program
//! (`bpf/relay.bpf.c`) instead: the kernel redirects each socket's bytes to the other
//! socket's send queue, and the enforcer is woken only when a side ends (a FIN or a
//! reset), when the idle check is due, when a snapshot rejects the flow, and once per
//! budget of bytes (below).
//!
//! The hand-off is ordered so that no byte is lost or reordered (docs/design.md, "BPF
//! sockmap"):
//! 1. both sockets go into `TARGETS` (redirect targets, no program), each one's peer
//!    into `DIRS` and its budget into `LIMITS`, then both into `SOURCES`, the map the
//!    verdict is attached to: a byte redirected from one socket always finds the other;
//! 2. both sockets leave tokio's reactor, so that the wake-ups the kernel still sends
//!    for every redirected chunk reach nobody; a watcher epoll, interested only in
//!    `EPOLLRDHUP` (and the errors epoll always reports), tells the flow when a side
//!    ends;
//! 3. `SO_RCVLOWAT` pokes each socket's data-ready callback, so that bytes queued
//!    before the hand-off (the application's first request, usually) are redirected
//!    at once rather than when more arrive;
//! 4. a FIN is passed on (`shutdown(SHUT_WR)` on the peer) only once every byte the
//!    verdict redirected for that direction has entered the peer's send queue
//!    (`TCP_INFO`): redirected bytes wait in the peer's psock backlog while its send
//!    buffer is full, and would be lost behind a FIN.
//!
//! Back-pressure: the kernel keeps redirected bytes that the peer cannot take yet in a
//! backlog charged to no socket, without limit (a server that never reads let a client
//! park 512 MiB there in seconds). The verdict counts each direction's cost and tells the
//! enforcer (a ring buffer record) when it passes the budget the enforcer set; the
//! enforcer compares what was redirected with what entered the peer's send queue, and
//! grants a new budget if the backlog is small, or *holds* the direction: the verdict
//! passes its bytes to the source socket's own receive queue, charged to that socket so
//! that TCP's flow control holds the sender, and the enforcer forwards them itself (after
//! the backlog, so in order) until it has caught up; then the kernel redirects again.
//! Taking the source out of `SOURCES` instead would race with a verdict running on
//! another CPU, which then finds no program and drops the buffer (seen here: 64 KiB
//! lost in a test).

use std::collections::HashMap as StdHashMap;
use std::net::{Shutdown, TcpStream as StdTcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{HashMap, MapData, RingBuf, SockHash};
use aya::programs::SkSkb;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::splice::{Close, DataPath, Outcome, Progress};
use crate::socket;

/// The compiled verdict program (empty when clang was missing at build time).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay.bpf.o"));

/// A direction's budget: the cost (bytes, plus 512 per kernel buffer) it may redirect
/// before the verdict tells the enforcer. With the peer keeping up this is one wake-up
/// per 4 MiB moved (splice: two per read of up to 1 MiB, four per small read).
const BUDGET: u64 = 4 << 20;
/// A backlog costing more than this when a budget runs out holds the direction. The
/// kernel sends redirected bytes from a worker, so a bulk flow always has some in its
/// backlog (about a millisecond's worth: 1.25 MB at 10 Gbit/s); holding below that
/// moved most bytes through user space (a first cut at 512 KiB: 4.8 s of enforcer CPU
/// per GB, 1 Gbit/s). A direction's backlog stays under this plus one budget.
const BACKLOG_HIGH: u64 = 2 * BUDGET;

/// How the enforcer treats BPF sockmap (`sockmap:` in the file, `--sockmap`). Off by
/// default: on the load harness's two-enforcer path the kernel relay moved bulk streams
/// at a tenth of splice's rate (docs/design.md, "BPF sockmap").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SockmapMode {
    /// Use it where the kernel allows; otherwise say why at start and splice.
    Auto,
    /// Use it or do not start.
    Require,
    /// Splice in user space.
    #[default]
    Off,
}

/// Why spliced flows stay in user space.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("this build has no BPF program (clang was missing when it was built)")]
    NotBuilt,
    #[error("{0}")]
    Kernel(String),
}

fn kernel(what: &str, e: impl std::fmt::Display) -> Unavailable {
    Unavailable::Kernel(format!("{what}: {e}"))
}

/// The loaded program and its maps, shared by every flow of the enforcer.
pub struct Sockmap {
    maps: Mutex<Maps>,
    watch: Arc<Watch>,
    /// Flows in the kernel now (the `kernel_flows` gauge).
    flows: prometheus_client::metrics::gauge::Gauge,
}

struct Maps {
    sources: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
    /// Source cookie → [peer's cookie, bytes redirected, their cost, bytes held].
    dirs: HashMap<MapData, u64, [u64; 4]>,
    /// Source cookie → [budget (cost at which the verdict tells), held?, bytes held that
    /// the enforcer forwarded].
    ctrl: HashMap<MapData, u64, [u64; 3]>,
    /// Keeps the program loaded and attached.
    _bpf: Ebpf,
}

/// The ends of handed-off flows (one epoll for all of them) and the verdict's budget
/// records, read by one task.
struct Watch {
    epoll: AsyncFd<EpollFd>,
    /// Socket cookie → the flow's signals and that socket's side.
    flows: Mutex<StdHashMap<u64, (Arc<Signals>, Side)>>,
}

struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

/// What the watcher saw for a flow since the flow last looked.
#[derive(Default)]
struct Signals {
    seen: AtomicU8,
    notify: Notify,
}

/// The side ended (FIN; sticky).
const END_A: u8 = 1;
const END_B: u8 = 2;
/// An error on either socket (a reset; sticky).
const ERR: u8 = 4;
/// The side's budget ran out (taken when read).
const OVER_A: u8 = 8;
const OVER_B: u8 = 16;

impl Side {
    fn end(self) -> u8 {
        match self {
            Side::A => END_A,
            Side::B => END_B,
        }
    }
    fn over(self) -> u8 {
        match self {
            Side::A => OVER_A,
            Side::B => OVER_B,
        }
    }
}

/// What became of a flow offered to the kernel.
pub(crate) enum Handoff {
    /// The kernel carried it to its end.
    Done(Outcome),
    /// The maps refused it (full, or a socket that has had its FIN, which the kernel
    /// does not take): splice it. The bytes moved while handing it over, each way.
    Declined(TcpStream, TcpStream, (u64, u64)),
}

impl Sockmap {
    /// Loads and attaches the verdict program, and starts the task that watches the
    /// ends of handed-off flows (on the current tokio runtime).
    pub fn load(
        flows: prometheus_client::metrics::gauge::Gauge,
    ) -> Result<Arc<Sockmap>, Unavailable> {
        if OBJECT.is_empty() {
            return Err(Unavailable::NotBuilt);
        }
        let mut bpf = Ebpf::load(OBJECT).map_err(|e| kernel("loading the BPF object", e))?;
        let map = |bpf: &mut Ebpf, name: &str| {
            bpf.take_map(name)
                .ok_or_else(|| kernel("the BPF object", format!("no map {name}")))
        };
        let sources = SockHash::try_from(map(&mut bpf, "SOURCES")?)
            .map_err(|e| kernel("the SOURCES map", e))?;
        let targets = SockHash::try_from(map(&mut bpf, "TARGETS")?)
            .map_err(|e| kernel("the TARGETS map", e))?;
        let dirs =
            HashMap::try_from(map(&mut bpf, "DIRS")?).map_err(|e| kernel("the DIRS map", e))?;
        let ctrl =
            HashMap::try_from(map(&mut bpf, "CTRL")?).map_err(|e| kernel("the CTRL map", e))?;
        let events =
            RingBuf::try_from(map(&mut bpf, "EVENTS")?).map_err(|e| kernel("the EVENTS map", e))?;
        let prog: &mut SkSkb = bpf
            .program_mut("segmesh_redirect")
            .ok_or_else(|| kernel("the BPF object", "no program segmesh_redirect"))?
            .try_into()
            .map_err(|e| kernel("the verdict program", e))?;
        prog.load()
            .map_err(|e| kernel("loading the verdict program", e))?;
        prog.attach(sources.fd())
            .map_err(|e| kernel("attaching the verdict program", e))?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| kernel("creating an epoll", e))?;
        // Safety: `EpollFd` owns the epoll descriptor (an `OwnedFd`) and always returns
        // it, so it stays open and the same for as long as the `AsyncFd` holds it.
        let epoll = unsafe { AsyncFd::register_with_interest(EpollFd(epoll), Interest::READABLE) }
            .map_err(|e| kernel("watching the epoll", e))?;
        // Safety: the ring buffer owns its map descriptor (`MapData`) and returns it
        // unchanged while the `AsyncFd` holds it.
        let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|e| kernel("watching the ring buffer", e))?;
        let watch = Arc::new(Watch {
            epoll,
            flows: Mutex::default(),
        });
        tokio::spawn(watch.clone().run(events));
        Ok(Arc::new(Sockmap {
            maps: Mutex::new(Maps {
                sources,
                targets,
                dirs,
                ctrl,
                _bpf: bpf,
            }),
            watch,
            flows,
        }))
    }

    /// Carries the flow between `a` and `b` in the kernel until it ends, like
    /// [`super::splice::relay_until`]: a FIN is passed on, a reset passed on as a reset,
    /// a flow idle in both directions for `idle`, or stopped through `stop`, is reset.
    pub(crate) async fn relay(
        &self,
        a: TcpStream,
        b: TcpStream,
        idle: Duration,
        progress: &Progress,
        stop: &Notify,
    ) -> Handoff {
        // What is queued now may start inside a buffer the enforcer read part of (a
        // ticket's preface): the verdict would carry that buffer whole, so it is moved
        // here, and only buffers that arrive from now on reach the verdict.
        let fwd = forward_queued(&a, &b).await;
        let bwd = forward_queued(&b, &a).await;
        let queued = match (fwd, bwd) {
            (Ok((f, true)), Ok((w, true))) => (f, w),
            (f, w) => {
                // A sender that kept the queue full is spliced (after an I/O error too:
                // the splice relay meets it again and ends the flow as it should).
                let moved = |r: std::io::Result<(u64, bool)>| r.map_or(0, |(n, _)| n);
                let counts = (moved(f), moved(w));
                return Handoff::Declined(a, b, counts);
            }
        };
        let ids = (SockRef::from(&a).cookie(), SockRef::from(&b).cookie());
        let base = (socket::tcp_written(&a), socket::tcp_written(&b));
        let (Ok(ca), Ok(cb), Ok(base_a), Ok(base_b)) = (ids.0, ids.1, base.0, base.1) else {
            return Handoff::Declined(a, b, queued);
        };
        if let Err(e) = self.insert(ca, &a, cb, &b) {
            tracing::debug!(error = %e, "the kernel did not take a flow; splicing it");
            return Handoff::Declined(a, b, queued);
        }
        // From here the flow is the kernel's; the guard takes it out of the maps.
        let signals = Arc::new(Signals::default());
        self.flows.inc();
        let guard = Taken {
            sm: self,
            ca,
            cb,
            signals: signals.clone(),
        };
        let failed = |close| {
            Handoff::Done(Outcome {
                forward: queued.0,
                backward: queued.1,
                path: DataPath::Kernel,
                close,
            })
        };
        // Out of tokio's reactor (see the module doc). Leaving it fails only if epoll
        // does, and then the stream is closed by tokio.
        let (a, b) = match (a.into_std(), b.into_std()) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => {
                for s in [a, b].into_iter().flatten() {
                    reset(s);
                }
                return failed(Close::Error);
            }
        };
        if let Err(e) = self.watch.add(ca, &a, cb, &b, &signals) {
            tracing::warn!(error = %e, "cannot watch a flow handed to the kernel; closing it");
            reset(a);
            reset(b);
            return failed(Close::Error);
        }
        if let Err(e) = socket::poke_data_ready(&a).and_then(|_| socket::poke_data_ready(&b)) {
            tracing::warn!(error = %e, "cannot start the kernel relay; closing the flow");
            reset(a);
            reset(b);
            return failed(Close::Error);
        }

        let mut dirs = [
            Direction::new(Side::A, ca, base_b),
            Direction::new(Side::B, cb, base_a),
        ];
        let queued = [queued.0, queued.1];
        let tick = (idle / 4).max(Duration::from_millis(10));
        let mut last = (0, 0);
        let mut since = Instant::now();
        let mut backoff = WAIT_FIRST;
        let mut interest = (ENDS, ENDS);
        let close = loop {
            // Budget records are taken; ends and errors stay.
            let seen = signals.seen.fetch_and(!(OVER_A | OVER_B), Ordering::AcqRel);
            if seen & ERR != 0 {
                tracing::debug!(
                    a = ?SockRef::from(&a).take_error(),
                    b = ?SockRef::from(&b).take_error(),
                    "a kernel-relayed flow ended with an error"
                );
                break Close::Reset;
            }
            let mut waiting = false;
            let mut broken = None;
            let done = [dirs[0].done, dirs[1].done];
            for (i, d) in dirs.iter_mut().enumerate() {
                let (src, dst) = match d.side {
                    Side::A => (&a, &b),
                    Side::B => (&b, &a),
                };
                match self.step(d, seen, src, dst) {
                    Ok(Step::Settled) => {}
                    Ok(Step::Waiting) => waiting = true,
                    Err(e) if super::splice::is_reset(&e) => {
                        // A side reset between the wake-up and the step (passing a FIN on
                        // to a socket reset meanwhile fails with ENOTCONN): the flow ends
                        // as a reset, as when the watcher sees it first.
                        tracing::debug!(error = %e, side = ?d.side, "a kernel-relayed flow was reset");
                        broken.get_or_insert(Close::Reset);
                    }
                    Err(e) => {
                        // Which flow, in which enforcer: its sockets' addresses (a closed
                        // socket has no peer any more), and whether the other direction
                        // had already ended.
                        let ends = |s: &StdTcpStream| {
                            let peer = s.peer_addr().map_or("closed".into(), |p| p.to_string());
                            format!(
                                "{} -> {peer}",
                                s.local_addr().map_or("?".into(), |l| l.to_string())
                            )
                        };
                        tracing::warn!(
                            error = %e,
                            side = ?d.side,
                            held = d.held,
                            a = %ends(&a),
                            b = %ends(&b),
                            other_done = done[1 - i],
                            "a kernel-relayed flow broke; resetting it"
                        );
                        broken.get_or_insert(Close::Error);
                    }
                }
            }
            if let Some(close) = broken {
                break close;
            }
            // A held direction's source is watched for bytes to forward, its peer for
            // write space.
            let want = |s: Side| {
                let mut f = ENDS;
                for d in &dirs {
                    if d.held && !d.done {
                        if d.side == s {
                            f |= EpollFlags::EPOLLIN;
                        } else {
                            f |= EpollFlags::EPOLLOUT;
                        }
                    }
                }
                f
            };
            let wanted = (want(Side::A), want(Side::B));
            if wanted != interest {
                let set = self
                    .watch
                    .interest(&a, ca, wanted.0)
                    .and_then(|_| self.watch.interest(&b, cb, wanted.1));
                if set.is_err() {
                    break Close::Error;
                }
                interest = wanted;
            }
            if dirs.iter().all(|d| d.done) {
                break Close::Closed;
            }
            let counts = (queued[0] + dirs[0].moved(), queued[1] + dirs[1].moved());
            progress.forward.store(counts.0, Ordering::Relaxed);
            progress.backward.store(counts.1, Ordering::Relaxed);
            if counts != last {
                last = counts;
                since = Instant::now();
            } else if since.elapsed() >= idle {
                // Idle both ways, or a FIN or a held direction whose bytes the peer
                // has not taken for that long.
                break Close::Idle;
            }
            let wait = if waiting {
                backoff = (backoff * 2).min(WAIT_MAX);
                backoff.min(tick)
            } else {
                backoff = WAIT_FIRST;
                tick
            };
            tokio::select! {
                _ = signals.notify.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.notified() => break Close::Policy,
            }
        };
        // Out of the maps before the sockets close: no byte moves after this.
        let (fwd, bwd) = self.counts(ca, cb);
        let counts = (
            queued[0] + fwd + dirs[0].copied,
            queued[1] + bwd + dirs[1].copied,
        );
        drop(guard);
        progress.forward.store(counts.0, Ordering::Relaxed);
        progress.backward.store(counts.1, Ordering::Relaxed);
        if close != Close::Closed {
            reset(a);
            reset(b);
        }
        Handoff::Done(Outcome {
            forward: counts.0,
            backward: counts.1,
            path: DataPath::Kernel,
            close,
        })
    }

    /// Looks after one direction when its flow wakes: a budget that ran out, a held
    /// direction to forward, a FIN to pass on once its bytes have gone.
    fn step(
        &self,
        d: &mut Direction,
        seen: u8,
        src: &StdTcpStream,
        dst: &StdTcpStream,
    ) -> std::io::Result<Step> {
        if d.done {
            return Ok(Step::Settled);
        }
        let ended = seen & d.side.end() != 0;
        let [_, bytes, cost, _] = self.dir(d.src);
        d.bytes = bytes;
        let taken = socket::tcp_written(dst)
            .map_err(context("reading the peer's TCP_INFO"))?
            .wrapping_sub(d.base);
        // Redirected or forwarded, not yet in the peer's send queue: the kernel backlog.
        let backlog = d.moved().saturating_sub(taken);
        if d.held {
            // The backlog goes first (the peer's write space wakes the flow).
            if backlog > 0 {
                return Ok(Step::Waiting);
            }
            return match forward(d, src, dst).map_err(context("forwarding held bytes"))? {
                Forward::Blocked => Ok(Step::Waiting),
                // The socket reports its end while held bytes may still wait in the
                // kernel's queue for its receive buffer: the end is only after them.
                // (Counted again: bytes and the FIN may have come since `held` was read.)
                Forward::End if d.read < self.dir(d.src)[3] => Ok(Step::Waiting),
                Forward::End => {
                    dst.shutdown(Shutdown::Write)
                        .map_err(context("passing the FIN on"))?;
                    d.done = true;
                    Ok(Step::Settled)
                }
                Forward::CaughtUp => {
                    if d.ctrl != [d.limit, 0, d.copied] {
                        d.limit = cost + BUDGET;
                        self.set_ctrl(d, [d.limit, 0, d.copied])?;
                    }
                    if self.dir(d.src)[3] == d.copied {
                        // Nothing held beyond what was forwarded: the verdict
                        // redirects again.
                        d.held = false;
                    }
                    // Else bytes came in between: they wake the flow.
                    Ok(Step::Settled)
                }
            };
        }
        if seen & d.side.over() != 0 || cost > d.limit {
            // What the backlog costs, at the direction's cost per byte so far (many
            // small buffers cost far more than their bytes).
            let backlog_cost = if bytes == 0 {
                0
            } else {
                (u128::from(backlog) * u128::from(cost) / u128::from(bytes)) as u64
            };
            if backlog_cost > BACKLOG_HIGH {
                self.set_ctrl(d, [d.limit, 1, d.copied])?;
                d.held = true;
                return Ok(Step::Waiting);
            }
            d.limit = cost + BUDGET.saturating_sub(backlog_cost).max(BUDGET / 4);
            self.set_ctrl(d, [d.limit, 0, d.copied])?;
            if self.dir(d.src)[2] > d.limit {
                // The budget ran out again before the grant landed.
                return Ok(Step::Waiting);
            }
        }
        if !ended {
            return Ok(Step::Settled);
        }
        if backlog > 0 {
            return Ok(Step::Waiting);
        }
        dst.shutdown(Shutdown::Write)
            .map_err(context("passing the FIN on"))?;
        d.done = true;
        Ok(Step::Settled)
    }

    fn set_ctrl(&self, d: &mut Direction, ctrl: [u64; 3]) -> std::io::Result<()> {
        let mut m = self.maps.lock().expect("lock poisoned");
        m.ctrl
            .insert(d.src, ctrl, 0)
            .map_err(std::io::Error::other)?;
        d.ctrl = ctrl;
        Ok(())
    }

    /// Puts a flow's sockets in the maps (see the module doc for the order); on failure
    /// takes out whatever it put in.
    fn insert(&self, ca: u64, a: &TcpStream, cb: u64, b: &TcpStream) -> Result<(), String> {
        let mut m = self.maps.lock().expect("lock poisoned");
        let done = (|| {
            let err = |what: &'static str| move |e: aya::maps::MapError| format!("{what}: {e:?}");
            m.dirs.insert(ca, [cb, 0, 0, 0], 0).map_err(err("DIRS"))?;
            m.dirs.insert(cb, [ca, 0, 0, 0], 0).map_err(err("DIRS"))?;
            m.ctrl.insert(ca, [BUDGET, 0, 0], 0).map_err(err("CTRL"))?;
            m.ctrl.insert(cb, [BUDGET, 0, 0], 0).map_err(err("CTRL"))?;
            m.targets
                .insert(ca, a.as_raw_fd(), 0)
                .map_err(err("TARGETS"))?;
            m.targets
                .insert(cb, b.as_raw_fd(), 0)
                .map_err(err("TARGETS"))?;
            m.sources
                .insert(ca, a.as_raw_fd(), 0)
                .map_err(err("SOURCES"))?;
            m.sources
                .insert(cb, b.as_raw_fd(), 0)
                .map_err(err("SOURCES"))
        })();
        if done.is_err() {
            m.remove(ca, cb);
        }
        done
    }

    /// A direction's [peer, bytes, cost, held] (zeros once it is gone).
    fn dir(&self, c: u64) -> [u64; 4] {
        let m = self.maps.lock().expect("lock poisoned");
        m.dirs.get(&c, 0).unwrap_or_default()
    }

    /// Bytes the verdict redirected from `a` and from `b`.
    fn counts(&self, ca: u64, cb: u64) -> (u64, u64) {
        (self.dir(ca)[1], self.dir(cb)[1])
    }

    /// Flows in the kernel now.
    #[cfg(test)]
    pub fn flows(&self) -> i64 {
        self.flows.get()
    }
}

/// The first and the longest wait between looks at a direction that waits for its
/// peer (a FIN's drain, a paused backlog), besides the peer's write-space wake-ups.
const WAIT_FIRST: Duration = Duration::from_micros(500);
const WAIT_MAX: Duration = Duration::from_secs(1);

/// One direction of a handed-off flow, from socket `src` to socket `dst`.
struct Direction {
    side: Side,
    src: u64,
    /// What the enforcer had written to `dst` before the hand-off (`TCP_INFO`).
    base: u64,
    /// The cost at which the verdict tells the enforcer.
    limit: u64,
    /// What `CTRL` holds for the direction.
    ctrl: [u64; 3],
    /// The verdict passes the direction's bytes to `src`, and the enforcer forwards them.
    held: bool,
    /// Bytes the enforcer read of those held, those it forwarded, and those read but
    /// not yet written.
    read: u64,
    copied: u64,
    tail: Vec<u8>,
    /// The FIN was passed on.
    done: bool,
    /// Bytes redirected, as last read.
    bytes: u64,
}

impl Direction {
    /// Bytes moved from `src` to `dst` so far (as last read).
    fn moved(&self) -> u64 {
        self.bytes + self.copied
    }

    fn new(side: Side, src: u64, base: u64) -> Direction {
        Direction {
            side,
            src,
            base,
            limit: BUDGET,
            ctrl: [BUDGET, 0, 0],
            held: false,
            read: 0,
            copied: 0,
            tail: Vec::new(),
            done: false,
            bytes: 0,
        }
    }
}

/// Moves what is queued on `src` to `dst` (before the hand-off), until the queue is
/// empty: a buffer the enforcer read part of would be carried whole by the verdict, and
/// even reading exactly what `FIONREAD` counted is not enough, since a segment arriving
/// meanwhile is appended to the last buffer (seen: 62 KiB carried twice). Returns the
/// bytes moved and whether the queue emptied: a sender that kept it full for
/// [`QUEUED_MAX`] bytes is spliced.
async fn forward_queued(src: &TcpStream, dst: &TcpStream) -> std::io::Result<(u64, bool)> {
    // On the heap: an array here would be part of the relay's future, which every
    // kernel-relayed flow keeps for as long as it lives (4 KiB of its idle memory).
    let mut buf = vec![0u8; super::splice::SMALL];
    let moved = AtomicU64::new(0);
    loop {
        let so_far = moved.load(Ordering::Relaxed);
        if so_far >= QUEUED_MAX {
            return Ok((so_far, false));
        }
        match src.try_read(&mut buf) {
            Ok(0) => return Ok((so_far, true)),
            Ok(n) => {
                super::splice::write_out(dst, n, &moved, |done, _| {
                    nix::unistd::write(dst.as_fd(), &buf[done..n]).map_err(std::io::Error::from)
                })
                .await?
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok((so_far, true)),
            Err(e) => return Err(e),
        }
    }
}

/// The most moved in user space while handing a flow over.
const QUEUED_MAX: u64 = 1 << 20;

/// Names what failed in an error (kept of its kind), for the enforcer's log.
fn context(what: &'static str) -> impl FnOnce(std::io::Error) -> std::io::Error {
    move |e| std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// How much of a held direction is read at once.
const HELD_READ: usize = 256 << 10;

/// What forwarding a held direction came to.
enum Forward {
    /// The peer's send queue is full.
    Blocked,
    /// Everything held so far is in the peer's send queue.
    CaughtUp,
    /// The sender's FIN, after everything it sent.
    End,
}

/// Forwards what the verdict held for a direction, in chunks, as the peer takes them.
fn forward(d: &mut Direction, src: &StdTcpStream, dst: &StdTcpStream) -> std::io::Result<Forward> {
    use std::io::{ErrorKind, Read, Write};
    loop {
        if d.tail.is_empty() {
            let mut buf = vec![0u8; HELD_READ];
            match (&*src).read(&mut buf) {
                Ok(0) => return Ok(Forward::End),
                Ok(n) => {
                    buf.truncate(n);
                    d.tail = buf;
                    d.read += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Forward::CaughtUp),
                Err(e) => return Err(e),
            }
        }
        match (&*dst).write(&d.tail) {
            Ok(n) => {
                d.tail.drain(..n);
                d.copied += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Forward::Blocked),
            Err(e) => return Err(e),
        }
    }
}

enum Step {
    Settled,
    /// Waiting for the peer to take bytes: look again soon.
    Waiting,
}

impl Maps {
    /// Takes a flow out: `SOURCES` first, so the verdict stops before its peer goes.
    fn remove(&mut self, ca: u64, cb: u64) {
        for c in [ca, cb] {
            let _ = self.sources.remove(&c);
        }
        for c in [ca, cb] {
            let _ = self.targets.remove(&c);
            let _ = self.dirs.remove(&c);
            let _ = self.ctrl.remove(&c);
        }
    }
}

/// A flow in the maps and the watcher; dropping it takes it out of both.
struct Taken<'a> {
    sm: &'a Sockmap,
    ca: u64,
    cb: u64,
    signals: Arc<Signals>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.sm.flows.dec();
        self.sm
            .maps
            .lock()
            .expect("lock poisoned")
            .remove(self.ca, self.cb);
        let mut flows = self.sm.watch.flows.lock().expect("lock poisoned");
        for c in [self.ca, self.cb] {
            if flows
                .get(&c)
                .is_some_and(|(s, _)| Arc::ptr_eq(s, &self.signals))
            {
                flows.remove(&c);
            }
        }
        // The sockets leave the epoll when they are closed.
    }
}

fn reset(s: StdTcpStream) {
    let _ = SockRef::from(&s).set_linger(Some(Duration::ZERO));
}

/// Only the end of a side: EPOLLIN is not asked for, so the kernel's wake-up after each
/// redirected chunk does not reach the watcher (EPOLLERR and EPOLLHUP are always
/// reported). Edge-triggered: once per change.
const ENDS: EpollFlags = EpollFlags::EPOLLRDHUP.union(EpollFlags::EPOLLET);

impl Watch {
    fn add(
        &self,
        ca: u64,
        a: &StdTcpStream,
        cb: u64,
        b: &StdTcpStream,
        signals: &Arc<Signals>,
    ) -> nix::Result<()> {
        {
            let mut flows = self.flows.lock().expect("lock poisoned");
            flows.insert(ca, (signals.clone(), Side::A));
            flows.insert(cb, (signals.clone(), Side::B));
        }
        let ep = &self.epoll.get_ref().0;
        ep.add(a.as_fd(), EpollEvent::new(ENDS, ca))?;
        ep.add(b.as_fd(), EpollEvent::new(ENDS, cb))
    }

    /// What `s` is watched for besides its end: a held direction's source is watched
    /// for bytes to forward, and its peer for write space.
    fn interest(&self, s: &StdTcpStream, cookie: u64, flags: EpollFlags) -> std::io::Result<()> {
        self.epoll
            .get_ref()
            .0
            .modify(s.as_fd(), &mut EpollEvent::new(flags, cookie))
            .map_err(std::io::Error::from)
    }

    /// Passes the watcher's events and the verdict's records to their flows, for as
    /// long as the enforcer runs.
    async fn run(self: Arc<Self>, mut ring: AsyncFd<RingBuf<MapData>>) {
        let mut events = [EpollEvent::empty(); 64];
        loop {
            tokio::select! {
                ready = self.epoll.readable() => {
                    let Ok(mut ready) = ready else { return };
                    loop {
                        let n = match ready.get_inner().0.wait(&mut events, EpollTimeout::ZERO) {
                            Ok(n) => n,
                            Err(nix::errno::Errno::EINTR) => continue,
                            Err(e) => {
                                tracing::error!(error = %e, "the kernel relay's watcher failed");
                                return;
                            }
                        };
                        if n == 0 {
                            ready.clear_ready();
                            break;
                        }
                        let flows = self.flows.lock().expect("lock poisoned");
                        for ev in &events[..n] {
                            let Some((signals, side)) = flows.get(&ev.data()) else {
                                continue;
                            };
                            let f = ev.events();
                            let bits = if f.contains(EpollFlags::EPOLLERR) {
                                ERR
                            } else if f.intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP) {
                                side.end()
                            } else {
                                0 // write space: a paused direction looks again
                            };
                            signals.seen.fetch_or(bits, Ordering::Release);
                            signals.notify.notify_one();
                        }
                    }
                }
                ready = ring.readable_mut() => {
                    let Ok(mut ready) = ready else { return };
                    let ring = ready.get_inner_mut();
                    let flows = self.flows.lock().expect("lock poisoned");
                    while let Some(item) = ring.next() {
                        let Ok(cookie) = <[u8; 8]>::try_from(&*item) else { continue };
                        if let Some((signals, side)) = flows.get(&u64::from_ne_bytes(cookie)) {
                            signals.seen.fetch_or(side.over(), Ordering::Release);
                            signals.notify.notify_one();
                        }
                    }
                    drop(flows);
                    ready.clear_ready();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
