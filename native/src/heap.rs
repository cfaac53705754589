//! Handing heap memory the table freed back to the operating system.
//!
//! glibc keeps freed blocks in its heap for reuse, and RSS keeps them too. A table leaves such
//! holes as it grows (each larger index array replaces a smaller one, in every shard at about
//! the same time) and when a wave of scopes goes idle (their records and names are freed).
//! At 1M idle scopes they come to about 2.4 bytes a scope over the table's own 29.6
//! (`bench/memory.py`). `Trimmer` asks glibc to release them once the table's footprint has
//! moved by `TRIM_STEP` since the last release; elsewhere the release does nothing.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Movement of the table's footprint, in bytes, after which a release is worth its cost: a
/// walk over the allocator's free blocks, well under a millisecond for a table's heap.
pub const TRIM_STEP: u64 = 256 * 1024;

/// Remembers the footprint at the last release.
#[derive(Debug, Default)]
pub struct Trimmer {
    at: AtomicU64,
}

impl Trimmer {
    /// Whether the footprint moved by more than `TRIM_STEP` since the last release; if so,
    /// records `bytes` as the footprint of this one.
    pub fn due(&self, bytes: u64) -> bool {
        let last = self.at.load(Relaxed);
        bytes.abs_diff(last) > TRIM_STEP
            && self
                .at
                .compare_exchange(last, bytes, Relaxed, Relaxed)
                .is_ok()
    }
}

/// Returns the free pages of the process's heap to the operating system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release() {
    extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: `malloc_trim` takes no pointer, touches only the allocator's own state under
    // the allocator's locks (so any thread may call it at any time), and cannot fail in a way
    // that needs handling: it returns whether it released anything.
    unsafe {
        malloc_trim(0);
    }
}

/// Returns the free pages of the process's heap to the operating system (not with this
/// allocator: nothing to do).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_only_after_a_step_in_either_direction() {
        let t = Trimmer::default();
        assert!(!t.due(TRIM_STEP));
        assert!(t.due(TRIM_STEP + 1));
        assert!(!t.due(2 * TRIM_STEP));
        assert!(t.due(2 * TRIM_STEP + 2));
        assert!(t.due(0));
        release();
    }
}
