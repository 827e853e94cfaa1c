//! glibc's thresholds as the enforcer sets them (`segmesh_proxy::alloc`), in a test
//! binary of their own: the thresholds and the allocator's statistics are the whole
//! process's, and other tests allocating at the same time would move them.

use segmesh_proxy::alloc::{KEEP, keep_freed_memory};

/// Blocks glibc has mapped on their own right now (mallinfo2(3)).
fn mapped_blocks() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2() }.hblks
}

/// A 512 KiB allocation is mapped on its own under a 128 KiB threshold (glibc's
/// default) and taken from the heap under the enforcer's: the values take effect.
#[test]
fn glibc_takes_the_thresholds() {
    assert!(keep_freed_memory(128 << 10));
    let before = mapped_blocks();
    let big = std::hint::black_box(vec![1u8; 512 << 10]);
    assert_eq!(mapped_blocks(), before + 1, "mapped under 128 KiB");
    drop(big);
    assert!(keep_freed_memory(KEEP));
    let before = mapped_blocks();
    let big = std::hint::black_box(vec![1u8; 512 << 10]);
    assert_eq!(mapped_blocks(), before, "from the heap under {KEEP} bytes");
    drop(big);
}
