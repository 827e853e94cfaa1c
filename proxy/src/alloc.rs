//! The allocator's handling of freed memory. glibc gives the top of its heap back to the
//! kernel once more than 128 KiB is free there, and maps every allocation of 128 KiB or
//! more on its own: a relay that takes a 64 KiB chunk per read and frees it once the
//! bytes are out (the encrypted path) then shrinks and grows the heap for every few
//! chunks, and each growth faults its pages in again (about a fifth of an encrypted bulk
//! flow's CPU in a profile of the load test). Raising both limits keeps a little freed
//! memory for the next chunk; an idle enforcer is unaffected (nothing is freed).

/// Free memory glibc keeps at the top of its heap, and the size from which it maps an
/// allocation on its own: a few chunks' worth.
pub const KEEP: i32 = 1 << 20;

/// Sets glibc's trim and mmap thresholds to `bytes` (fixed: glibc's own adjustment of
/// them stops); false where the C library is not glibc or refused a value.
pub fn keep_freed_memory(bytes: i32) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt(3) only sets allocator parameters (it takes the arena lock);
        // it returns 1 on success, 0 for a parameter or value it rejects.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, bytes) } == 1;
        // SAFETY: as above.
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) } == 1;
        trim && mmap
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = bytes;
        false
    }
}

/// Bytes allocated and not freed, heap and separately mapped blocks together (glibc's
/// `mallinfo2`); `None` where the C library is not glibc. What the enforcer's state
/// takes, unlike RSS, which also holds freed memory kept for reuse (and so says nothing
/// of a scenario run after another that freed as much).
pub fn heap_in_use() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2(3) only reads the allocator's statistics (it takes each
        // arena's lock in turn) and returns them by value.
        let m = unsafe { libc::mallinfo2() };
        Some(m.uordblks + m.hblkhd)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

// Tested in tests/allocator.rs: a process of its own, as the thresholds and the
// allocator's statistics are the whole process's.
