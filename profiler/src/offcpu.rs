//! Off-CPU analysis: each summed key's cause (from how the thread left the
//! CPU, the kernel frames it left with, and the syscall it was in), the
//! folded stacks with the cause as their leaf frame (values in
//! microseconds), and the totals per cause and per process for use.json.
//!
//! How a cause is decided, first rule that applies:
//! 1. preempted while runnable, or runnable after a wakeup: `cpu`; left
//!    runnable while its CFS group was throttled: `throttled`;
//! 2. a page-fault frame anywhere in the kernel stack: `pagefault`;
//! 3. the kernel frames from the leaf down, the first one that says:
//!    nanosleep frames `sleep`, epoll/poll/select waits `idle`, futex,
//!    mutex, rwsem and semaphore waits `lock` (a futex wait with
//!    FUTEX_WAIT_BITSET, as condition variables, semaphores and joins
//!    wait: `condvar`), socket waits `net`, pipe waits `pipe`, block I/O
//!    and page-cache writeback waits `disk`;
//! 4. the syscall (where the kernel stack was not recorded): the same
//!    families by syscall number;
//! 5. anything else: `other`.

use std::collections::{BTreeMap, HashMap};

use profiler_common::offcpu::{NO_SYSCALL, class};
use serde::Serialize;

use crate::{
    containers::{Attributor, group_of},
    fold::{self, Folded},
    model::{Frame, FrameKind, OffCpuStack, RawProfile},
    procs::ProcessTable,
    symbolize::{Symbolizer, process_name, symbol_tables_with, symbolize_stack},
};

/// The part reported unavailable where throttled waits cannot be told
/// apart (they count under `cpu`).
pub const THROTTLED_SIGNAL: &str = "offcpu_throttled";

/// Why a thread was off the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    /// Runnable, waiting for a CPU (preempted, or woken and queued).
    Cpu,
    /// Runnable, its cgroup's CPU quota spent.
    Throttled,
    /// Block I/O.
    Disk,
    /// Locks: mutex futex waits (FUTEX_WAIT) and kernel locks.
    Lock,
    /// Waiting to be signalled by another thread: condition variables,
    /// semaphores, joins (futex FUTEX_WAIT_BITSET). A thread pool waiting
    /// for work waits here.
    Condvar,
    /// Sleeps and timers.
    Sleep,
    /// Reading or writing a socket, accepting, connecting.
    Net,
    /// Reading or writing a pipe or FIFO.
    Pipe,
    /// Waiting in epoll/poll/select for something to do.
    Idle,
    /// A page fault.
    PageFault,
    /// Anything else.
    Other,
}

impl Cause {
    /// Every cause, in the order reports list them.
    pub const ALL: [Cause; 11] = [
        Cause::Cpu,
        Cause::Throttled,
        Cause::Disk,
        Cause::Lock,
        Cause::Condvar,
        Cause::Sleep,
        Cause::Net,
        Cause::Pipe,
        Cause::PageFault,
        Cause::Other,
        Cause::Idle,
    ];

    /// Its name in frames, use.json and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Cause::Cpu => "cpu",
            Cause::Throttled => "throttled",
            Cause::Disk => "disk",
            Cause::Lock => "lock",
            Cause::Condvar => "condvar",
            Cause::Sleep => "sleep",
            Cause::Net => "net",
            Cause::Pipe => "pipe",
            Cause::Idle => "idle",
            Cause::PageFault => "pagefault",
            Cause::Other => "other",
        }
    }

    /// Whether threads wait here for work to come (an idle loop or pool),
    /// which is no problem in itself.
    pub fn is_waiting_for_work(self) -> bool {
        matches!(self, Cause::Idle | Cause::Condvar)
    }

    /// The leaf frame it adds to a stack.
    pub fn frame(self) -> String {
        format!("[off-cpu: {}]", self.name())
    }
}

const PAGEFAULT_FRAMES: &[&str] = &["exc_page_fault", "do_user_addr_fault", "handle_mm_fault"];

/// Kernel frame name fragments and the cause each tells.
const FRAME_CAUSES: &[(&str, Cause)] = &[
    ("do_nanosleep", Cause::Sleep),
    ("hrtimer_nanosleep", Cause::Sleep),
    ("common_nsleep", Cause::Sleep),
    ("ep_poll", Cause::Idle),
    ("do_epoll_wait", Cause::Idle),
    ("do_sys_poll", Cause::Idle),
    ("do_select", Cause::Idle),
    ("core_sys_select", Cause::Idle),
    ("io_cqring_wait", Cause::Idle),
    ("futex_wait", Cause::Lock),
    ("__mutex_lock", Cause::Lock),
    ("rwsem_down", Cause::Lock),
    ("rt_mutex_slowlock", Cause::Lock),
    ("percpu_rwsem_wait", Cause::Lock),
    ("__down", Cause::Lock),
    ("sk_wait_data", Cause::Net),
    ("sk_stream_wait", Cause::Net),
    ("inet_csk_accept", Cause::Net),
    ("inet_csk_wait_for_connect", Cause::Net),
    ("inet_wait_for_connect", Cause::Net),
    ("unix_stream_data_wait", Cause::Net),
    ("unix_wait_for_peer", Cause::Net),
    ("__skb_wait_for_more_packets", Cause::Net),
    ("tcp_recvmsg", Cause::Net),
    ("tcp_sendmsg", Cause::Net),
    ("udp_recvmsg", Cause::Net),
    ("pipe_read", Cause::Pipe),
    ("pipe_write", Cause::Pipe),
    ("wait_for_partner", Cause::Pipe),
    ("io_schedule", Cause::Disk),
    ("folio_wait", Cause::Disk),
    ("wait_on_page", Cause::Disk),
    ("jbd2", Cause::Disk),
    ("filemap_fdatawait", Cause::Disk),
    ("file_write_and_wait", Cause::Disk),
    ("wait_on_buffer", Cause::Disk),
    ("submit_bio_wait", Cause::Disk),
    ("blk_mq_", Cause::Disk),
];

/// The cause a syscall (x86_64 numbers) tells, where the frames do not.
fn syscall_cause(nr: i32) -> Option<Cause> {
    Some(match nr {
        202 | 449 => Cause::Lock,      // futex, futex_waitv
        35 | 230 | 34 => Cause::Sleep, // nanosleep, clock_nanosleep, pause
        7 | 23 | 232 | 270 | 271 | 281 | 441 | 208 => Cause::Idle, // poll .. epoll_pwait2, io_getevents
        74 | 75 | 162 | 277 | 306 | 26 => Cause::Disk,             // fsync, fdatasync, sync, ...
        42 | 43 | 44 | 45 | 46 | 47 | 288 | 299 | 307 => Cause::Net, // connect .. sendmmsg
        _ => return None,
    })
}

/// futex(2) on x86_64, and the command of condition-variable waits.
const SYS_FUTEX: i32 = 202;
const FUTEX_WAIT_BITSET: u8 = 9;

/// Decides the cause of one key (see the module's documentation).
pub fn classify(class_: u8, syscall: i32, detail: u8, kernel: &[Frame]) -> Cause {
    let cause = classify_by_frames(class_, syscall, kernel);
    if cause == Cause::Lock && syscall == SYS_FUTEX && detail == FUTEX_WAIT_BITSET {
        return Cause::Condvar;
    }
    cause
}

fn classify_by_frames(class_: u8, syscall: i32, kernel: &[Frame]) -> Cause {
    match class_ {
        class::PREEMPTED | class::WOKEN_WAITING => return Cause::Cpu,
        class::THROTTLED => return Cause::Throttled,
        _ => {}
    }
    let named = |f: &&Frame| f.kind == FrameKind::Kernel;
    if kernel
        .iter()
        .filter(named)
        .any(|f| PAGEFAULT_FRAMES.iter().any(|p| f.name.contains(p)))
    {
        return Cause::PageFault;
    }
    for f in kernel.iter().rev().filter(named) {
        if let Some((_, c)) = FRAME_CAUSES.iter().find(|(p, _)| f.name.contains(p)) {
            return *c;
        }
    }
    if syscall != NO_SYSCALL
        && let Some(c) = syscall_cause(syscall)
    {
        return c;
    }
    Cause::Other
}

/// Names the causes of each second's off-CPU time (`Second::offcpu_ms`)
/// from its classes, syscalls and details. Without kernel frames (not
/// walked per second): page faults, and disk waits outside the fsync
/// family of calls, count as `other` here, as they are told apart in
/// the totals.
pub fn name_seconds(seconds: &mut [crate::model::Second]) {
    for row in seconds {
        for &(class_, syscall, detail, ns) in &row.offcpu {
            *row.offcpu_ms
                .entry(classify(class_, syscall, detail, &[]).name())
                .or_default() += ns as f64 / 1e6;
        }
    }
}

/// Seconds per cause, every cause listed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ByCause(pub BTreeMap<&'static str, f64>);

impl ByCause {
    fn add(&mut self, c: Cause, s: f64) {
        *self.0.entry(c.name()).or_default() += s;
    }

    fn full() -> Self {
        ByCause(Cause::ALL.iter().map(|c| (c.name(), 0.0)).collect())
    }

    /// Seconds of one cause.
    pub fn get(&self, c: Cause) -> f64 {
        self.0.get(c.name()).copied().unwrap_or(0.0)
    }
}

/// One process's off-CPU time.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessOffCpu {
    /// Process id.
    pub pid: u32,
    /// Its name.
    pub comm: String,
    /// Its container, or `host`.
    pub container: String,
    /// Seconds per cause.
    pub by_cause_s: ByCause,
    /// Seconds in all, idle included.
    pub total_s: f64,
}

impl ProcessOffCpu {
    /// Seconds waiting, those waiting for work (idle, condvar) left out.
    pub fn busy_s(&self) -> f64 {
        Cause::ALL
            .iter()
            .filter(|c| !c.is_waiting_for_work())
            .map(|c| self.by_cause_s.get(*c))
            .sum()
    }
}

/// use.json's `offcpu`.
#[derive(Clone, Debug, Serialize)]
pub struct OffCpuSummary {
    /// Seconds per cause over the capture, blocks shorter than the
    /// minimum included.
    pub by_cause_s: ByCause,
    /// Per process, most off-CPU time (idle excluded) first.
    pub by_process: Vec<ProcessOffCpu>,
    /// `--off-cpu-min`, in milliseconds.
    pub min_ms: f64,
    /// Seconds in blocks shorter than it (in `by_cause_s`, not in
    /// offcpu.folded).
    pub short_s: f64,
    /// Seconds not summed because the kernel's count map was full.
    pub lost_s: f64,
    /// Whether throttled waits are told apart from other waits for a CPU
    /// (false: they are counted under `cpu`).
    pub throttled_told_apart: bool,
    /// What the kernel side did at the switches: `[switches timed, user
    /// stacks walked, kernel stacks walked]`; the rest came from its
    /// caches, or were not walked (preempted threads).
    pub switches_and_walks: [u64; 3],
}

/// The stage's result: folded stacks and the summary.
pub struct OffCpuAnalysis {
    /// Folded stacks, values in microseconds, the cause as leaf frame.
    pub folded: Folded,
    /// Each key of `RawProfile::offcpu` folded: for the times of its
    /// time away (`report::off_timeline`).
    pub timed: Vec<TimedKey>,
    /// For use.json.
    pub summary: OffCpuSummary,
}

/// One off-CPU key as folded.
pub struct TimedKey {
    /// Its index in `RawProfile::offcpu`.
    pub index: usize,
    /// Its folded line (the cause as leaf frame); for a short block, the
    /// cause's frame alone.
    pub line: String,
    /// Shorter than the minimum: not in the flame graph.
    pub short: bool,
}

/// Symbolizes, classifies and folds a capture's off-CPU keys (those of
/// `exclude` left out); stacks are grouped by container with
/// `group_by_container`.
#[allow(clippy::too_many_arguments)]
pub fn analyze(
    raw: &RawProfile,
    procs: &ProcessTable,
    sym: &mut Symbolizer,
    exclude: Option<u32>,
    attributor: &mut Attributor,
    group_by_container: bool,
    min_ns: u64,
    throttled_told_apart: bool,
) -> OffCpuAnalysis {
    let keys: Vec<(usize, &OffCpuStack)> = raw
        .offcpu
        .iter()
        .enumerate()
        .filter(|(_, o)| Some(o.stack.tgid) != exclude)
        .collect();
    let tables = symbol_tables_with(sym, keys.iter().map(|(_, o)| &o.stack), procs);
    let mut timed = Vec::with_capacity(keys.len());
    let mut graphed = Vec::new();
    let mut by_cause = ByCause::full();
    let mut per_proc: HashMap<u32, ByCause> = HashMap::new();
    let mut names: HashMap<u32, String> = HashMap::new();
    let mut stacks = Vec::new();
    let mut short_ns = 0u64;
    for (index, o) in keys {
        let mut s = symbolize_stack(&o.stack, &tables, procs);
        let cause = classify(o.class, o.syscall, o.detail, &s.kernel);
        let secs = o.ns as f64 / 1e9;
        by_cause.add(cause, secs);
        per_proc
            .entry(o.stack.tgid)
            .or_insert_with(ByCause::full)
            .add(cause, secs);
        names
            .entry(o.stack.tgid)
            .or_insert_with(|| process_name(o.stack.tgid, &o.stack.thread, procs));
        if o.short {
            short_ns += o.ns;
            timed.push(TimedKey {
                index,
                line: cause.frame(),
                short: true,
            });
            continue;
        }
        s.kernel.push(Frame::new(cause.frame(), FrameKind::User));
        s.count = o.ns / 1000;
        stacks.push(s);
        graphed.push(index);
    }
    if group_by_container {
        for s in &mut stacks {
            s.group = Some(group_of(s.tgid, procs, attributor));
        }
    }
    let folded = fold::fold(&stacks);
    timed.extend(stacks.iter().zip(graphed).map(|(s, index)| TimedKey {
        index,
        line: fold::line(s),
        short: false,
    }));
    let mut by_process: Vec<ProcessOffCpu> = per_proc
        .into_iter()
        .map(|(pid, by)| ProcessOffCpu {
            pid,
            comm: names.remove(&pid).unwrap_or_default(),
            container: group_of(pid, procs, attributor),
            total_s: by.0.values().sum(),
            by_cause_s: by,
        })
        .collect();
    by_process.sort_by(|a, b| b.busy_s().total_cmp(&a.busy_s()).then(a.pid.cmp(&b.pid)));
    OffCpuAnalysis {
        folded,
        timed,
        summary: OffCpuSummary {
            by_cause_s: by_cause,
            by_process,
            min_ms: min_ns as f64 / 1e6,
            short_s: short_ns as f64 / 1e9,
            lost_s: raw.counter(profiler_common::counters::Counter::OffcpuLostNs) as f64 / 1e9,
            throttled_told_apart,
            switches_and_walks: {
                use profiler_common::counters::Counter;
                [
                    raw.counter(Counter::OffcpuSwitches),
                    raw.counter(Counter::OffcpuUserWalks),
                    raw.counter(Counter::OffcpuKernelWalks),
                ]
            },
        },
    }
}

/// The table's line: where the threads' time off the CPU went, idle apart.
pub fn render_line(s: &OffCpuSummary) -> String {
    let idle = s.by_cause_s.get(Cause::Idle);
    let condvar = s.by_cause_s.get(Cause::Condvar);
    let mut parts: Vec<(Cause, f64)> = Cause::ALL
        .iter()
        .filter(|c| !c.is_waiting_for_work())
        .map(|c| (*c, s.by_cause_s.get(*c)))
        .filter(|(_, v)| *v >= 0.0005)
        .collect();
    parts.sort_by(|a, b| b.1.total_cmp(&a.1));
    let waiting: f64 = parts.iter().map(|(_, v)| v).sum();
    let list: Vec<String> = parts
        .iter()
        .take(5)
        .map(|(c, v)| {
            format!(
                "{} {:.2} s ({:.0}%)",
                c.name(),
                v,
                100.0 * v / waiting.max(1e-12)
            )
        })
        .collect();
    let mut line = format!(
        "  Off-CPU  {:.2} s of threads' time waiting{}{}; waiting for work: idle {:.2} s in epoll/poll, condvar {:.2} s (not in itself a problem)\n",
        waiting,
        if list.is_empty() { "" } else { ": " },
        list.join(", "),
        idle,
        condvar
    );
    if let Some(p) = s.by_process.first()
        && p.busy_s() > 0.0
    {
        let top = Cause::ALL
            .iter()
            .filter(|c| !c.is_waiting_for_work())
            .max_by(|a, b| p.by_cause_s.get(**a).total_cmp(&p.by_cause_s.get(**b)))
            .copied()
            .unwrap_or(Cause::Other);
        line.push_str(&format!(
            "           most: {} (pid {}) {:.2} s, mostly {}\n",
            p.comm,
            p.pid,
            p.busy_s(),
            top.name()
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(name: &str) -> Frame {
        Frame::new(name, FrameKind::Kernel)
    }

    #[test]
    fn causes_from_state_frames_and_syscalls() {
        // Outermost first, as symbolized.
        let fsync = [
            k("entry_SYSCALL_64"),
            k("__x64_sys_fsync"),
            k("ext4_sync_file"),
            k("jbd2_log_wait_commit"),
            k("schedule"),
        ];
        assert_eq!(classify(class::UNINTERRUPTIBLE, 74, 0, &fsync), Cause::Disk);
        let futex = [k("__x64_sys_futex"), k("futex_wait"), k("schedule")];
        assert_eq!(classify(class::SLEEPING, 202, 0, &futex), Cause::Lock);
        // FUTEX_WAIT_BITSET|FUTEX_PRIVATE_FLAG, masked: pthread_cond_wait.
        assert_eq!(classify(class::SLEEPING, 202, 9, &futex), Cause::Condvar);
        let fault = [
            k("asm_exc_page_fault"),
            k("exc_page_fault"),
            k("filemap_fault"),
            k("folio_wait_bit"),
            k("io_schedule"),
        ];
        assert_eq!(
            classify(class::UNINTERRUPTIBLE, 4, 0, &fault),
            Cause::PageFault
        );
        let epoll = [
            k("do_epoll_wait"),
            k("ep_poll"),
            k("schedule_hrtimeout_range"),
        ];
        assert_eq!(classify(class::SLEEPING, 281, 0, &epoll), Cause::Idle);
        let pipe = [k("ksys_read"), k("vfs_read"), k("pipe_read"), k("schedule")];
        assert_eq!(classify(class::SLEEPING, 0, 0, &pipe), Cause::Pipe);
        // No kernel stack: the syscall decides.
        assert_eq!(classify(class::SLEEPING, 230, 0, &[]), Cause::Sleep);
        assert_eq!(classify(class::SLEEPING, 45, 0, &[]), Cause::Net);
        assert_eq!(classify(class::SLEEPING, 0, 0, &[]), Cause::Other);
        // How it left decides first.
        assert_eq!(classify(class::PREEMPTED, 202, 0, &futex), Cause::Cpu);
        assert_eq!(classify(class::WOKEN_WAITING, 202, 0, &futex), Cause::Cpu);
        assert_eq!(
            classify(class::THROTTLED, NO_SYSCALL, 0, &[]),
            Cause::Throttled
        );
    }

    #[test]
    fn the_line_keeps_idle_apart() {
        let mut by = ByCause::full();
        by.add(Cause::Lock, 3.0);
        by.add(Cause::Sleep, 1.0);
        by.add(Cause::Idle, 50.0);
        let s = OffCpuSummary {
            by_cause_s: by,
            by_process: Vec::new(),
            min_ms: 1.0,
            short_s: 0.0,
            lost_s: 0.0,
            throttled_told_apart: true,
            switches_and_walks: [0; 3],
        };
        let line = render_line(&s);
        assert!(
            line.contains("4.00 s of threads' time waiting: lock 3.00 s (75%), sleep 1.00 s (25%)"),
            "{line}"
        );
        assert!(line.contains("idle 50.00 s"), "{line}");
        assert!(line.contains("condvar 0.00 s"), "{line}");
    }
}
