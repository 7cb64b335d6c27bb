//! Giving freed heap memory back to the kernel.
//!
//! glibc's malloc keeps what the program frees for reuse, and returns it to the kernel only
//! when the very top of a heap is free. Two things in the agent free a lot at once and then
//! leave small long-lived allocations above it: parsing the kernel's BTF at start-up (35 MB
//! at peak, all freed once the probes are loaded), and a sock_diag reconciliation of a big
//! namespace (the snapshot and the table it replaces). Without a trim, that memory stays in
//! the agent's RSS for good.

/// Sockets a reconciliation must have held for a trim to be worth its cost: trimming walks
/// every free chunk of every arena (a few ms for a 100 MB heap), which a small pass does not
/// need.
pub const TRIM_AFTER_SOCKETS: usize = 10_000;

/// Return freed heap pages to the kernel, in every malloc arena (each thread that allocated
/// has its own). A no-op where the C library is not glibc.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only rearranges the allocator's free lists; it is thread-safe and
    // has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
