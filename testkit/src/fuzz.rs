//! Bounded fuzzing on the stable toolchain. cargo-fuzz needs nightly's sanitizer
//! coverage; this runs anywhere `cargo test` runs: inputs are valid seeds mutated at
//! random (bit flips, random and "interesting" bytes, a target's dictionary tokens,
//! insertions, deletions, duplications, splices of two seeds, truncation), each fed to
//! the target under `catch_unwind`. No coverage feedback: it finds what random
//! mutations of realistic inputs reach, within a time budget.
//!
//! The budget is `SEGMESH_FUZZ_SECONDS` (default 3 s per target), the random seed
//! `SEGMESH_FUZZ_SEED` (default: from the clock; printed, so a run can be repeated). A
//! panic is a crash: the input is written to `target/fuzz-crashes/<target>-<seed>.bin`
//! and the run fails with it in hex, to become a regression test.

use std::time::{Duration, Instant};

/// What one target's run did.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: String,
    pub executions: u64,
    pub elapsed: Duration,
    pub seed: u64,
}

/// xorshift64*: small, fast, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'\n', b' ', b'"', b'\\', b'{', b'}', b'[', b']', b':', b',', b'-',
    b'*', b'=', b'/', b'$',
];

fn mutate(rng: &mut Rng, seeds: &[&[u8]], dict: &[&[u8]]) -> Vec<u8> {
    let mut v = seeds[rng.below(seeds.len())].to_vec();
    for _ in 0..1 + rng.below(8) {
        let len = v.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                v.insert(i, INTERESTING[rng.below(INTERESTING.len())]);
            }
            3 if !dict.is_empty() => {
                let i = rng.below(len + 1);
                let t = dict[rng.below(dict.len())];
                v.splice(i..i, t.iter().copied());
            }
            4 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(16)).min(len);
                v.drain(a..b);
            }
            5 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                let chunk = v[a..b].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, chunk);
            }
            6 => {
                let other = seeds[rng.below(seeds.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            7 if len > 0 => v.truncate(rng.below(len)),
            _ => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
        }
    }
    v
}

/// Runs `target` on mutated `seeds` (and the seeds themselves first) for the budget.
/// Panics with the crashing input if the target panics.
pub fn run(
    target_name: &str,
    seeds: &[&[u8]],
    dict: &[&[u8]],
    mut target: impl FnMut(&[u8]),
) -> Report {
    assert!(!seeds.is_empty(), "a fuzz target needs at least one seed");
    let budget = Duration::from_secs_f64(
        std::env::var("SEGMESH_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
    );
    let seed = std::env::var("SEGMESH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut executions = 0u64;
    // A panic message per crash is enough: keep the default hook quiet meanwhile.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut crash = None;
    let mut i = 0usize;
    while started.elapsed() < budget {
        let input = if i < seeds.len() {
            seeds[i].to_vec()
        } else {
            mutate(&mut rng, seeds, dict)
        };
        i += 1;
        executions += 1;
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input))) {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            crash = Some((input, why));
            break;
        }
    }
    std::panic::set_hook(hook);
    let report = Report {
        target: target_name.into(),
        executions,
        elapsed: started.elapsed(),
        seed,
    };
    eprintln!(
        "fuzz {target_name}: {executions} executions in {:.1?} (SEGMESH_FUZZ_SEED={seed})",
        report.elapsed
    );
    if let Some((input, why)) = crash {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-crashes");
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join(format!("{target_name}-{seed}.bin"));
        let _ = std::fs::write(&file, &input);
        let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
        panic!(
            "fuzz {target_name} crashed: {why}\ninput ({} bytes, saved to {}): {hex}",
            input.len(),
            file.display()
        );
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_is_found_and_reported() {
        // The target panics on a byte the mutations produce often.
        let r = std::panic::catch_unwind(|| {
            run("demo", &[b"abc"], &[], |b| {
                assert!(!b.contains(&0xff), "found it")
            })
        });
        let msg = r.unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(msg.contains("fuzz demo crashed: found it"), "{msg}");
    }

    #[test]
    fn mutations_stay_near_their_seeds() {
        let mut rng = Rng(7);
        let outs: Vec<Vec<u8>> = (0..200)
            .map(|_| mutate(&mut rng, &[b"hello world"], &[b"XY"]))
            .collect();
        assert!(
            outs.iter().any(|o| o.windows(2).any(|w| w == b"XY")),
            "dictionary used"
        );
        assert!(outs.iter().any(|o| o.len() < 11) && outs.iter().any(|o| o.len() > 11));
    }
}
