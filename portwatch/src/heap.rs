//! Giving freed heap memory back to the kernel.
//!
//! glibc's malloc keeps what the program frees for reuse, and returns it to the kernel only
//! when the very top of a heap is free. Two things in the agent free a lot at once and then
//! leave small long-lived allocations above it: parsing the kernel's BTF at start-up (35 MB
//! at peak, all freed once the probes are loaded), and a sock_diag reconciliation of a big
//! namespace (the snapshot and the table it replaces). Without a trim, that memory stays in
//! the agent's RSS for good.
//!
//! Worse, each thread that allocates gets an arena of its own, and a trim only returns
//! whole free pages: the diag thread builds a snapshot in its arena, the processing thread
//! keeps those entries and frees the ones they replace, and every arena ends up half
//! used. With 100k sockets that was 47 MB of RSS against 30 MB with one arena.

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

/// One malloc arena for the whole process. Call before any other thread starts. The agent's
/// threads allocate little outside sock_diag passes, so sharing one arena's lock costs
/// nothing measurable, and freed memory is all in one place for `release_freed`.
pub fn one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called while the process has a
    // single thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
