//! The profiler's kernel programs, one module per signal (its programs and
//! maps; its shared types in the `profiler-common` module of the same
//! name):
//!
//! - [`stacks`]: the cpu-clock sampler (stacks, CPU ticks);
//! - [`procs`]: process announcements and fork following;
//! - [`sched`]: run-queue latency and depth;
//! - [`offcpu`]: time off the CPU, with stacks, by how it was spent;
//! - [`loops`]: event-loop turns and stalls;
//! - [`requests`]: accepted connections' requests and responses;
//! - [`tcp`]: TCP retransmits and socket owners;
//! - [`oom`]: OOM kills.
//!
//! Thin by design: each program records what happened into bounded maps
//! and counts what did not fit. Settings (including every field offset,
//! read from tracepoint format files and BTF at run time) arrive in the
//! read-only global `CONFIG`, set by the loader before load. All
//! symbolization, folding and statistics happen in userspace.
#![no_std]
#![no_main]

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::PerCpuArray, programs::TracePointContext};
use profiler_common::{
    NO_FIELD,
    config::Config,
    counters::{self, Counter},
};

/// Declares a map whose name and default size come from its
/// [`profiler_common::MapDef`]: the build fails when the static's name
/// and the definition's differ, so a rename cannot break the loader.
macro_rules! map {
    ($(#[$m:meta])* $name:ident: $ty:ty = $ctor:ident($def:expr)) => {
        $(#[$m])*
        #[aya_ebpf::macros::map]
        static $name: $ty = <$ty>::$ctor($def.entries, 0);
        const _: () = assert!(
            profiler_common::str_eq(stringify!($name), $def.name),
            concat!("map ", stringify!($name), " is not named as its MapDef")
        );
    };
}

/// Checks at compile time that a program function is named as its
/// [`profiler_common::ProgDef`].
macro_rules! prog_named {
    ($f:ident, $def:expr) => {
        const _: () = assert!(
            profiler_common::str_eq(stringify!($f), $def.name),
            concat!("program ", stringify!($f), " is not named as its ProgDef")
        );
    };
}

/// Ring buffer flag: send without waking the loader. A wakeup costs more
/// than the rest of a program (an interrupt to self, an exit on a VM),
/// and in sched_switch it woke our own thread into more switches; the
/// loader drains such rings on its timer (every 20 ms).
pub(crate) const BPF_RB_NO_WAKEUP: u64 = 1;

mod arch;
mod loops;
mod offcpu;
mod oom;
mod procs;
mod requests;
mod sched;
mod stacks;
mod tcp;

/// Everything the loader tells the programs (see [`Config`]).
#[unsafe(no_mangle)]
static CONFIG: Config = Config::DEFAULT;
const _: () = assert!(profiler_common::str_eq(
    "CONFIG",
    profiler_common::config::CONFIG
));

map!(COUNTERS: PerCpuArray<u64> = with_max_entries(counters::COUNTERS));

const EEXIST: i32 = 17;
const EFAULT: i32 = 14;
const ENOMEM: i32 = 12;
const E2BIG: i32 = 7;

#[inline(always)]
fn config() -> &'static Config {
    // SAFETY: read-only global set before load; volatile so the compiler
    // keeps the load instead of folding in the defaults above.
    unsafe { &*core::ptr::read_volatile(&&CONFIG) }
}

#[inline(always)]
fn bump(counter: Counter) {
    add(&COUNTERS, counter as u32, 1);
}

#[inline(always)]
fn add(map: &PerCpuArray<u64>, idx: u32, n: u64) {
    if let Some(v) = map.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, and a program does not preempt itself on a
        // CPU, so the increment is exact.
        unsafe { *v += n };
    }
}

/// `EXIT_DEAD | EXIT_ZOMBIE` in sched_switch's `prev_state`: the task's
/// last switch.
const STATE_EXITING: i64 = 0x30;

#[inline(always)]
fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// True when a stack walk failed for lack of room rather than for lack of
/// a stack (-EFAULT: a kernel thread has no user stack, a sample taken in
/// user mode has no kernel stack).
#[inline(always)]
fn dropped(err: i32) -> bool {
    err == -EEXIST || err == -ENOMEM || err == -E2BIG
}

/// A field of a tracepoint record, at an offset from its format file.
#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    if offset == NO_FIELD {
        return None;
    }
    // SAFETY: bounds-checked probe read of the tracepoint record.
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
