//! The agent's use of glibc malloc: tuning at start-up, giving freed memory back after a
//! reconciliation, and the numbers `status` shows.
//!
//! Every sock_diag pass builds buffers of several MB (the snapshot on the sock_diag thread,
//! the rebuilt table on the processing thread) and frees them a moment later. By default
//! glibc raises its mmap threshold to the largest block freed so far, so after the first
//! pass these buffers are carved out of the arenas instead of being mapped, and the holes
//! they leave behind are reused only in part: RSS crept up by tens of MB an hour under
//! churn while the heap in use stayed flat. A fixed threshold keeps large buffers in their
//! own mappings, returned to the kernel when freed, and a trim after each reconciliation
//! releases the free pages left between live small allocations.
//!
//! Two more things free a lot at once and then leave small long-lived allocations above it:
//! parsing the kernel's BTF at start-up (35 MB at peak, all freed once the probes are
//! loaded), and the table a big reconciliation replaces; a trim follows both. And each
//! thread that allocates would get an arena of its own, which a trim can only return whole
//! free pages from: the diag thread builds a snapshot in its arena, the processing thread
//! keeps those entries and frees the ones they replace, and every arena ends up half used.
//! With 100k sockets that was 47 MB of RSS against 30 MB with one arena.

/// Blocks this large or larger get their own mapping (glibc's default starting value; fixing
/// it turns off the dynamic raise).
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// Sockets a reconciliation must have held for a trim right after it to be worth its cost:
/// trimming walks every free chunk (a few ms for a 100 MB heap).
pub const TRIM_AFTER_SOCKETS: usize = 10_000;

/// Call once, before any thread is started: a fixed mmap threshold, and one arena for the
/// whole process (the agent's threads allocate little outside sock_diag passes, so sharing
/// one arena's lock costs nothing measurable).
pub fn tune() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Give free pages back to the kernel, from every arena. Costs a walk over the free lists
/// (about a millisecond for a heap of tens of MB).
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Heap bytes in use and held free by the allocator, for `status`: when RSS grows but
/// `in_use` does not, the growth is the allocator's, not a collection's.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Usage {
    pub in_use_kb: u64,
    pub free_kb: u64,
    pub mapped_kb: u64,
}

pub fn usage() -> Option<Usage> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallinfo2 has no preconditions; it locks each arena while it reads it.
        let m = unsafe { libc::mallinfo2() };
        Some(Usage {
            in_use_kb: ((m.uordblks + m.hblkhd) / 1024) as u64,
            free_kb: (m.fordblks / 1024) as u64,
            mapped_kb: (m.hblkhd / 1024) as u64,
        })
    }
    #[cfg(not(target_env = "gnu"))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_env = "gnu")]
    fn usage_counts_a_live_block() {
        // Other tests allocate on other threads meanwhile; the mapped-bytes figure was seen
        // below this block's size once in a full run, so only the total is checked.
        let v = vec![1u8; 8 << 20];
        let u = usage().unwrap();
        assert!(u.in_use_kb >= 8 * 1024, "{u:?}");
        assert!(u.in_use_kb >= u.mapped_kb, "{u:?}");
        drop(v);
        trim();
    }
}
