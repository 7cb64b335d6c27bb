//! portwatch kernel programs: the syscall tracepoints (`syscalls`), their trampoline
//! (fentry/fexit) counterparts where the kernel loads them (`trampoline`), and the TCP state
//! and process-exit hooks (`state`).
//!
//! Every hook is thin: `match try_x(&ctx) { Ok(v) | Err(v) => v }`. Events are reserved in
//! the `EVENTS` ring buffer, written and submitted; a failed reserve is counted per kind in
//! the per-CPU `LOST` array, which the agent turns into `lost` records. Nothing is dropped
//! silently.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no compare-and-swap, so core's atomic types offer no
// fetch_add there, while the instruction itself (BPF_ATOMIC | BPF_ADD) exists.
#![feature(core_intrinsics)]
#![allow(internal_features)]

// rustc passes functions to LLVM sorted by mangled name, which includes the module name,
// length first: 10trampoline < 4maps < 4read < 5state < 8syscalls < 9reporting. That order
// is LLVM's inlining order, which sets the programs' stack-slot layout; with `reporting`
// last, the object is identical to the single-file build the kernel matrix passed.
mod maps;
mod read;
mod reporting;
mod state;
mod syscalls;
mod trampoline;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
