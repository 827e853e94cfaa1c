//! glibc's thresholds as the enforcer sets them (`segmesh_proxy::alloc`), in a test
//! binary of their own: the thresholds and the allocator's statistics are the whole
//! process's, and other tests allocating at the same time would move them.

use segmesh_proxy::alloc::{KEEP, heap_in_use, keep_freed_memory};

/// The tests of this file one at a time: each reads the whole process's statistics.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Blocks glibc has mapped on their own right now (mallinfo2(3)).
fn mapped_blocks() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2() }.hblks
}

/// A 512 KiB allocation is mapped on its own under a 128 KiB threshold (glibc's
/// default) and taken from the heap under the enforcer's: the values take effect.
#[test]
fn glibc_takes_the_thresholds() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
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

/// The heap in use counts an allocation while it lives, whether it came from the heap or
/// was mapped on its own, and not once it is freed (freed memory glibc keeps is not in
/// use).
#[test]
fn heap_in_use_counts_live_allocations_only() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    for size in [4 << 10, 64 << 10, 4 << 20] {
        let before = heap_in_use().expect("glibc");
        let block = std::hint::black_box(vec![1u8; size]);
        let during = heap_in_use().unwrap();
        assert!(
            // Other threads (the test harness's) may allocate or free a little meanwhile.
            during + (8 << 10) >= before + size && during < before + size + (64 << 10),
            "{size} bytes allocated: {before} -> {during}"
        );
        drop(block);
        let after = heap_in_use().unwrap();
        assert!(
            after < before + (64 << 10),
            "{size} bytes freed: {before} -> {after}"
        );
    }
}
