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

// Tested in tests/allocator.rs: a process of its own, as the thresholds and the
// allocator's statistics are the whole process's.
