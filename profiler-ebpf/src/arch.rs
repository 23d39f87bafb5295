//! What depends on the kernel's architecture: where a task's user
//! registers are. Only x86_64 is implemented; another architecture (arm64:
//! Graviton) fails to build here instead of reading wrong offsets.

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_kernel},
    programs::PerfEventContext,
};
use profiler_common::config::Config;

#[cfg(not(bpf_target_arch = "x86_64"))]
compile_error!(
    "user registers (ip, sp, frame pointer) are only implemented for x86_64: \
     add this architecture's pt_regs layout in profiler-ebpf/src/arch.rs"
);

/// Whether the sample interrupted user mode: then it has no kernel stack,
/// and asking the kernel to walk one only costs its setup (-EFAULT).
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn sampled_in_user(ctx: &PerfEventContext) -> bool {
    // SAFETY: ctx points at the kernel's bpf_perf_event_data for this run.
    unsafe { (*ctx.ctx).regs.cs & 3 == 3 }
}

/// User registers of the sampled task (ip, sp, frame pointer): the
/// sample's own when it interrupted user mode, else the ones saved at the
/// top of the task's kernel stack when it entered the kernel.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn user_regs(ctx: &PerfEventContext, cfg: &Config) -> Option<(u64, u64, u64)> {
    /// x86_64 `struct pt_regs`: 21 u64, at the top of the kernel stack.
    const PT_REGS_WORDS: usize = 21;
    /// Indexes of `rbp`, `rip`, `cs`, `rsp` in it.
    const RBP: usize = 4;
    const RIP: usize = 16;
    const CS: usize = 17;
    const RSP: usize = 19;
    // SAFETY: ctx points at the kernel's bpf_perf_event_data for this run.
    let regs = unsafe { &(*ctx.ctx).regs };
    if sampled_in_user(ctx) {
        return Some((regs.rip, regs.rsp, regs.rbp));
    }
    if cfg.task_stack == 0 {
        return None;
    }
    // SAFETY: probe reads at offsets from BTF; a bad pointer fails the
    // helper, it cannot fault.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let stack: *const u8 =
            bpf_probe_read_kernel(task.add(cfg.task_stack as usize) as *const *const u8).ok()?;
        if stack.is_null() {
            return None;
        }
        let pt = stack.add(cfg.thread_size as usize - PT_REGS_WORDS * 8) as *const u64;
        let cs = bpf_probe_read_kernel(pt.add(CS)).ok()?;
        if cs & 3 != 3 {
            return None; // a kernel thread, or the layout is not what we think
        }
        let ip = bpf_probe_read_kernel(pt.add(RIP)).ok()?;
        let sp = bpf_probe_read_kernel(pt.add(RSP)).ok()?;
        let bp = bpf_probe_read_kernel(pt.add(RBP)).ok()?;
        Some((ip, sp, bp))
    }
}

/// Where the current task entered the kernel, from the `pt_regs` saved
/// at the top of its kernel stack (read in one go).
pub struct Entry {
    /// `orig_ax`: the number of the syscall it is in, -1 when it entered
    /// by an interrupt, or an exception's code.
    pub nr: i64,
    /// The first two syscall arguments (`di`, `si`).
    pub arg0: u64,
    pub arg1: u64,
    /// User instruction, stack and frame pointers.
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// The current task's [`Entry`]. None for a kernel thread (no user
/// registers) or when the kernel stack's place is unknown.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn current_entry(cfg: &Config) -> Option<Entry> {
    const PT_REGS_WORDS: usize = 21;
    const RBP: usize = 4;
    const RSI: usize = 13;
    const RDI: usize = 14;
    const ORIG_RAX: usize = 15;
    const RIP: usize = 16;
    const CS: usize = 17;
    const RSP: usize = 19;
    if cfg.task_stack == 0 {
        return None;
    }
    // SAFETY: probe reads at offsets from BTF; a bad pointer fails the
    // helper, it cannot fault.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let stack: *const u8 =
            bpf_probe_read_kernel(task.add(cfg.task_stack as usize) as *const *const u8).ok()?;
        if stack.is_null() {
            return None;
        }
        let pt =
            stack.add(cfg.thread_size as usize - PT_REGS_WORDS * 8) as *const [u64; PT_REGS_WORDS];
        let r = bpf_probe_read_kernel(pt).ok()?;
        if r[CS] & 3 != 3 {
            return None;
        }
        Some(Entry {
            nr: r[ORIG_RAX] as i64,
            arg0: r[RDI],
            arg1: r[RSI],
            ip: r[RIP],
            sp: r[RSP],
            bp: r[RBP],
        })
    }
}
