//! The capture stage: loads the eBPF object, attaches the stack sampler to
//! the cpu-clock of every online CPU, reads the memory maps of each process
//! when it is first sampled, and at the end drains the kernel maps into a
//! [`RawProfile`] of counted (process, user stack, kernel stack) keys.

use std::{collections::HashMap, fs};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf, StackTraceMap},
    programs::{
        PerfEvent, RawTracePoint, TracePoint,
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
        raw_trace_point::RawTracePointLinkId,
        trace_point::TracePointLinkId,
    },
};
use profiler_common::{
    Config, Counter, DEPTH_SLOTS, LATENCY_SLOTS, OomEvent, ProcessEvent, ProcessEventKind,
    RetransKey, RetransValue, STACK_COPY_MAX, STACK_PAGE, StackKey, StackSample, TaskCgroups,
    names, oom_field, retrans_field,
};
use tokio::io::unix::AsyncFd;

use crate::{
    procs::ProcessTable,
    unwind::{UnwindMode, UnwindStats, UserUnwinder},
};

/// The eBPF object, built by build.rs and embedded: one file to ship.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// How often a process that keeps being sampled is announced again, so
/// that its maps are re-read (JIT regions and libraries mapped later).
const REANNOUNCE_NS: u64 = 1_000_000_000;

/// How to capture.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Samples per second per CPU.
    pub frequency_hz: u64,
    /// Sample only these thread groups (empty: every process).
    pub pids: Vec<u32>,
    /// Only sample processes listed in `pids` (also when it is empty for
    /// now, to be filled before the workload starts).
    pub filter: bool,
    /// Add children of profiled processes to the filter as they fork.
    pub follow_forks: bool,
    /// Entries of the stack-trace map (distinct stacks, user and kernel).
    pub stack_map_entries: u32,
    /// Entries of the count map (distinct process/stack keys).
    pub count_map_entries: u32,
    /// Take stacks (false: `--no-stacks`, only the USE signals).
    pub stacks: bool,
    /// How user stacks are walked.
    pub unwind: UnwindMode,
    /// Bytes of user stack copied per sample (dwarf/auto), whole pages.
    pub stack_bytes: u32,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            frequency_hz: 99,
            pids: Vec::new(),
            filter: false,
            follow_forks: false,
            stack_map_entries: 16 * 1024,
            count_map_entries: 40 * 1024,
            stacks: true,
            unwind: UnwindMode::Auto,
            stack_bytes: STACK_COPY_MAX as u32,
        }
    }
}

/// Why a capture could not start.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The kernel refused the eBPF object.
    #[error(
        "the kernel refused the eBPF programs: {0:#}\n(needs Linux >= 5.8 with BPF ring buffers; run as root or with CAP_BPF and CAP_PERFMON)"
    )]
    Load(#[source] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("could not {what}: {source}")]
    Program {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map was missing or of the wrong type (a build problem).
    #[error("eBPF map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What went wrong.
        #[source]
        source: aya::maps::MapError,
    },
    /// Listing online CPUs failed.
    #[error("cannot list online CPUs ({0}): is /sys mounted?")]
    Cpus(String),
    /// An I/O error setting up.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A stack as recorded: addresses leaf first, or the errno of the walk.
pub type RawStackPart = Result<Vec<u64>, i32>;

/// One counted key of the capture.
#[derive(Clone, Debug)]
pub struct RawStack {
    /// Thread-group id (0: idle).
    pub tgid: u32,
    /// Name of the sampled thread.
    pub thread: String,
    /// User stack, leaf first.
    pub user: RawStackPart,
    /// Why the user stack stopped before its end, if it did (userspace
    /// unwinding).
    pub user_cut: Option<crate::unwind::Cut>,
    /// Kernel stack, leaf first.
    pub kernel: RawStackPart,
    /// Samples.
    pub count: u64,
}

/// An OOM kill as seen, with what userspace added while the victim lived.
#[derive(Clone, Debug)]
pub struct OomKill {
    /// The kernel's record.
    pub event: OomEvent,
    /// Victim's memory cgroup path: from the ids the kernel programs read
    /// off its task, else from /proc/PID/cgroup, resolved at once.
    pub victim_cgroup: Option<String>,
}

/// Most socket owners remembered in one capture.
const MAX_SOCKET_OWNERS: usize = 4096;

/// What was read of a socket's owner while it lived.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerInfo {
    /// Process name.
    pub comm: Option<String>,
    /// Cgroup path.
    pub cgroup: Option<String>,
}

impl OwnerInfo {
    /// Reads a live process's name and cgroup.
    pub fn read(pid: u32) -> Self {
        OwnerInfo {
            comm: fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|s| s.trim().to_string()),
            cgroup: crate::cgroups::cgroup_of(pid),
        }
    }
}

/// A signal that could not be collected, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable {
    /// Which signal (`runqueue_latency`, `runqueue_depth`, ...).
    pub signal: &'static str,
    /// Why, in words that say what would fix it.
    pub reason: String,
}

/// Everything the kernel side recorded.
#[derive(Clone, Debug, Default)]
pub struct RawProfile {
    /// Counted stacks.
    pub stacks: Vec<RawStack>,
    /// Values of every [`Counter`], summed over CPUs.
    pub counters: HashMap<&'static str, u64>,
    /// Online CPUs sampled.
    pub cpus: usize,
    /// Online CPU ids.
    pub cpu_ids: Vec<u32>,
    /// cpu-clock ticks per CPU (index: CPU id).
    pub cpu_ticks: Vec<u64>,
    /// Ticks per CPU that found a task other than idle.
    pub cpu_busy_ticks: Vec<u64>,
    /// Run-queue latency histogram per CPU (`[cpu][slot]`, log2 us).
    pub runq_latency: Vec<Vec<u64>>,
    /// Longest run-queue wait seen, in microseconds.
    pub runq_latency_max_us: u64,
    /// Run-queue depth histogram per CPU (`[cpu][depth]`).
    pub runq_depth: Vec<Vec<u64>>,
    /// Retransmits per connection (summed over CPUs; owner where known).
    pub retransmits: Vec<(RetransKey, RetransValue)>,
    /// OOM kills, in order.
    pub oom_kills: Vec<OomKill>,
    /// Signals not collected, with the reason.
    pub unavailable: Vec<Unavailable>,
    /// Name and cgroup of the processes owning retransmitting sockets,
    /// read when their first retransmit was seen.
    pub socket_owners: HashMap<u32, OwnerInfo>,
    /// Name of the cfs_rq count field the depth was read from.
    pub depth_field: Option<&'static str>,
    /// Userspace unwinding figures (dwarf/auto).
    pub unwind: Option<UnwindStats>,
}

impl RawProfile {
    /// Adds what `other` recorded (a later slice of the same capture) to
    /// this one, except its stacks: counters, ticks, histograms,
    /// retransmits (by connection), OOM kills, socket owners.
    pub fn merge_signals(&mut self, other: RawProfile) {
        fn add_vec(a: &mut Vec<u64>, b: &[u64]) {
            if a.len() < b.len() {
                a.resize(b.len(), 0);
            }
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        fn add_rows(a: &mut Vec<Vec<u64>>, b: &[Vec<u64>]) {
            if a.len() < b.len() {
                a.resize(b.len(), Vec::new());
            }
            for (x, y) in a.iter_mut().zip(b) {
                add_vec(x, y);
            }
        }
        for (k, v) in other.counters {
            *self.counters.entry(k).or_default() += v;
        }
        self.cpus = other.cpus;
        self.cpu_ids = other.cpu_ids;
        add_vec(&mut self.cpu_ticks, &other.cpu_ticks);
        add_vec(&mut self.cpu_busy_ticks, &other.cpu_busy_ticks);
        add_rows(&mut self.runq_latency, &other.runq_latency);
        self.runq_latency_max_us = self.runq_latency_max_us.max(other.runq_latency_max_us);
        add_rows(&mut self.runq_depth, &other.runq_depth);
        for (key, v) in other.retransmits {
            match self.retransmits.iter_mut().find(|(k, _)| *k == key) {
                Some((_, t)) => {
                    t.count += v.count;
                    t.first_ns = t.first_ns.min(v.first_ns);
                    t.last_ns = t.last_ns.max(v.last_ns);
                    if t.owner_tgid == 0 {
                        t.owner_tgid = v.owner_tgid;
                        t.owner_cgroup = v.owner_cgroup;
                        t.owner_comm = v.owner_comm;
                    }
                }
                None => self.retransmits.push((key, v)),
            }
        }
        self.oom_kills.extend(other.oom_kills);
        for (pid, o) in other.socket_owners {
            if self.socket_owners.len() < MAX_SOCKET_OWNERS {
                self.socket_owners.insert(pid, o);
            }
        }
        self.unavailable = other.unavailable;
        self.depth_field = other.depth_field;
        if let Some(u) = other.unwind {
            let t = self.unwind.get_or_insert_with(Default::default);
            t.samples += u.samples;
            t.truncated += u.truncated;
            t.lost += u.lost;
            t.bad_address += u.bad_address;
            t.jit_cfi_frames += u.jit_cfi_frames;
            t.dropped += u.dropped;
            t.bytes += u.bytes;
        }
    }

    /// Value of one counter.
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters.get(counter_name(c)).copied().unwrap_or(0)
    }
}

/// Stable name of a counter, for reports.
pub fn counter_name(c: Counter) -> &'static str {
    match c {
        Counter::Samples => "samples",
        Counter::NoStack => "samples_without_stack",
        Counter::UserStackDropped => "user_stacks_dropped",
        Counter::KernelStackDropped => "kernel_stacks_dropped",
        Counter::CountMapFull => "samples_lost_count_map_full",
        Counter::EventsLost => "process_events_lost",
        Counter::ForksFollowed => "forks_followed",
        Counter::ForksDropped => "forks_not_followed",
        Counter::CpuTicks => "cpu_ticks",
        Counter::CpuBusyTicks => "cpu_busy_ticks",
        Counter::RunqStartFull => "runqueue_wakeups_untimed_map_full",
        Counter::RunqDepthFailed => "runqueue_depth_reads_failed",
        Counter::RetransMapFull => "retransmit_connections_not_kept_map_full",
        Counter::Retransmits => "tcp_retransmits",
        Counter::OomKills => "oom_kills",
        Counter::OomEventsLost => "oom_events_lost",
        Counter::StackCopiesLost => "stack_copies_lost_ring_full",
        Counter::StackCopiesShort => "stack_copies_short",
        Counter::UserRegsMissing => "samples_without_user_registers",
        Counter::RunqLatencyTotalUs => "runqueue_latency_total_us",
        Counter::UserStacksSentAside => "user_stacks_sent_aside_on_collision",
    }
}

/// A running capture.
pub struct Capture {
    ebpf: Ebpf,
    perf_links: Vec<PerfEventLinkId>,
    tp_links: Vec<(&'static str, TracePointLinkId)>,
    /// The mark_victim raw tracepoint, where the kernel passes the task.
    oom_task_link: Option<RawTracePointLinkId>,
    /// Victim pid -> cgroups, filled by that raw tracepoint.
    oom_cgroups: Option<BpfHashMap<MapData, u32, TaskCgroups>>,
    events: AsyncFd<RingBuf<MapData>>,
    oom_events: AsyncFd<RingBuf<MapData>>,
    oom_kills: Vec<OomKill>,
    stack_samples: AsyncFd<RingBuf<MapData>>,
    unwinder: Option<UserUnwinder>,
    /// One stack sample, reused: 64 KiB, too big for the stack and too
    /// big to allocate per sample.
    sample_buf: Box<StackSample>,
    socket_owners: HashMap<u32, OwnerInfo>,
    pids: BpfHashMap<MapData, u32, u8>,
    cpus: Vec<u32>,
    unavailable: Vec<Unavailable>,
    depth_field: Option<&'static str>,
    /// The maps read at each window, taken on the first one.
    window_maps: Option<WindowMaps>,
    /// Cumulative per-CPU values at the last window: counters, run-queue
    /// latency and depth slots (`[index][cpu]`).
    prev: Cumulative,
    /// Held while the capture lives: the kernel keeps run-time statistics
    /// of BPF programs while a BPF_ENABLE_STATS descriptor is open (and
    /// stops when it closes, unlike the sysctl).
    stats_fd: Option<std::os::fd::OwnedFd>,
    /// Processes read while they lived.
    pub procs: ProcessTable,
}

/// Handles on the maps read at each window.
struct WindowMaps {
    counts: PerCpuHashMap<MapData, StackKey, u64>,
    stacks: StackTraceMap<MapData>,
    counters: PerCpuArray<MapData, u64>,
    runq_lat: PerCpuArray<MapData, u64>,
    runq_depth: PerCpuArray<MapData, u64>,
    retrans: PerCpuHashMap<MapData, RetransKey, RetransValue>,
    seen: BpfHashMap<MapData, u32, u64>,
    runq_start: BpfHashMap<MapData, u32, u64>,
}

#[derive(Default)]
struct Cumulative {
    counters: HashMap<u32, Vec<u64>>,
    runq_lat: HashMap<u32, Vec<u64>>,
    runq_depth: HashMap<u32, Vec<u64>>,
}

/// `cur - prev` per CPU, remembering `cur`.
fn delta(prev: &mut HashMap<u32, Vec<u64>>, idx: u32, cur: Vec<u64>) -> Vec<u64> {
    let old = prev.insert(idx, cur.clone()).unwrap_or_default();
    cur.iter()
        .enumerate()
        .map(|(i, v)| v.saturating_sub(old.get(i).copied().unwrap_or(0)))
        .collect()
}

/// Parses a CPU list such as `0-3,5,7-8` (`/sys/devices/system/cpu/online`).
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// A USE signal: its name, its program, and the tracepoints it attaches to.
type Signal = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

fn prog_err(what: impl Into<String>) -> impl FnOnce(aya::programs::ProgramError) -> CaptureError {
    let what = what.into();
    move |source| CaptureError::Program { what, source }
}

/// The kernel stack size (THREAD_SIZE): 16 KiB on x86_64, 32 KiB with
/// KASAN (read from the kernel's config where it is on disk).
fn thread_size() -> u32 {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let config = fs::read_to_string(format!("/boot/config-{}", release.trim())).unwrap_or_default();
    if config.lines().any(|l| l == "CONFIG_KASAN=y") {
        32768
    } else {
        16384
    }
}

/// Possible CPUs (the ids a CPU can have), for per-CPU slots.
fn possible_cpus() -> u32 {
    fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|t| parse_cpu_list(&t))
        .and_then(|c| c.into_iter().max())
        .map_or(1024, |m| m + 1)
}

/// Ring buffer bytes for stack copies: half a second of samples at the
/// configured rate on every CPU, a power of two between 1 and 64 MiB. A
/// record carries the stack from sp to its top (2 to 8 KiB for most
/// threads; deeper ones up to `stack_bytes`), so 8 KiB a sample is
/// reckoned: the ring's pages are resident once written around, and a
/// bigger reckoning costs the profiler's RSS more than it saves. Half a
/// second covers the first look at a big binary's CFI; copies that find
/// the ring full are counted (`stack_copies_lost`).
fn stack_ring_bytes(hz: u64, cpus: usize, stack_bytes: u32) -> u32 {
    let record = u64::from(stack_bytes.min(8192)) + 128;
    let want = hz * cpus as u64 * record / 2;
    want.clamp(1 << 20, 64 << 20)
        .next_power_of_two()
        .min(64 << 20) as u32
}

/// Reads the layouts of every tracepoint used and fills in [`Config`]; a
/// tracepoint missing from this kernel marks its signal unavailable.
fn build_config(
    cfg: &CaptureConfig,
    unavailable: &mut Vec<Unavailable>,
) -> (Config, Option<&'static str>, bool) {
    use crate::tracefs::{Format, switch_runnable_mask};
    let mut c = Config {
        filter_pids: cfg.filter.into(),
        follow_forks: cfg.follow_forks.into(),
        take_stacks: cfg.stacks.into(),
        runqueue_depth: 0,
        fork_child_pid: 20,
        reannounce_ns: REANNOUNCE_NS,
        task_cfs_rq: 0,
        cfs_rq_rq: 0,
        rq_nr_runnable: 0,
        switch_prev_pid: 0,
        switch_prev_state: 0,
        switch_next_pid: 0,
        wakeup_pid: 0,
        _pad: 0,
        switch_runnable_mask: 0xff,
        oom: [profiler_common::NO_FIELD; 8],
        retrans: [profiler_common::NO_FIELD; 9],
        sock_owner_sk: profiler_common::NO_FIELD,
        copy_stacks: (cfg.stacks && cfg.unwind != UnwindMode::Fp).into(),
        stack_pages: (cfg.stack_bytes as usize / STACK_PAGE).clamp(1, STACK_COPY_MAX / STACK_PAGE)
            as u8,
        send_collided: (cfg.stacks && cfg.unwind == UnwindMode::Fp).into(),
        _pad2: 0,
        task_stack: 0,
        thread_size: thread_size(),
        _pad3: 0,
        synack: [profiler_common::NO_FIELD; 9],
        cgroup: [profiler_common::NO_FIELD; 7],
    };
    if let Ok(f) = Format::read("sched", "sched_process_fork") {
        c.fork_child_pid = f.offset_or_none("child_pid");
    }
    match (
        Format::read("sched", "sched_switch"),
        Format::read("sched", "sched_wakeup"),
    ) {
        (Ok(sw), Ok(wk)) => {
            c.switch_prev_pid = sw.offset_or_none("prev_pid");
            c.switch_prev_state = sw.offset_or_none("prev_state");
            c.switch_next_pid = sw.offset_or_none("next_pid");
            c.switch_runnable_mask = switch_runnable_mask(&sw.print_fmt);
            c.wakeup_pid = wk.offset_or_none("pid");
        }
        (Err(e), _) | (_, Err(e)) => unavailable.push(Unavailable {
            signal: "runqueue_latency",
            reason: e,
        }),
    }
    let mut depth_field = None;
    let btf = crate::kbtf::load();
    let mut oom_task_arg = false;
    if let Ok(btf) = &btf {
        match crate::kbtf::cgroup_offsets(btf) {
            Ok(offsets) => {
                c.cgroup = offsets;
                oom_task_arg = btf.tracepoint_arg_is("mark_victim", 0, "task_struct");
            }
            Err(reason) => unavailable.push(Unavailable {
                signal: "oom_victim_cgroup_in_kernel",
                reason: format!("{reason}; the victim's cgroup is read from /proc instead"),
            }),
        }
    }
    if c.copy_stacks != 0
        && let Ok(btf) = &btf
        && let Some((off, _)) = crate::kbtf::member_offset(btf, "task_struct", "stack")
    {
        c.task_stack = off;
    }
    match btf.and_then(|btf| crate::kbtf::depth_offsets(&btf)) {
        Ok(d) => {
            c.runqueue_depth = 1;
            c.task_cfs_rq = d.task_cfs_rq;
            c.cfs_rq_rq = d.cfs_rq_rq;
            c.rq_nr_runnable = d.rq_nr_runnable;
            depth_field = Some(d.count_field);
        }
        Err(reason) => unavailable.push(Unavailable {
            signal: "runqueue_depth",
            reason,
        }),
    }
    match Format::read("tcp", "tcp_retransmit_skb") {
        Ok(f) => c.retrans = f.offsets(&retrans_field::NAMES),
        Err(reason) => unavailable.push(Unavailable {
            signal: "tcp_retransmits",
            reason,
        }),
    }
    match Format::read("tcp", "tcp_retransmit_synack") {
        Ok(f) => c.synack = f.offsets(&retrans_field::NAMES),
        Err(reason) => unavailable.push(Unavailable {
            signal: "tcp_synack_retransmits",
            reason,
        }),
    }
    if let Ok(f) = Format::read("sock", "inet_sock_set_state") {
        c.sock_owner_sk = f.offset_or_none("skaddr");
    }
    match Format::read("oom", "mark_victim") {
        Ok(f) => c.oom = f.offsets(&oom_field::NAMES),
        Err(reason) => unavailable.push(Unavailable {
            signal: "oom_kills",
            reason,
        }),
    }
    (c, depth_field, oom_task_arg)
}

impl Capture {
    /// Loads the programs and starts sampling. A signal whose program
    /// cannot be loaded or attached on this kernel is reported in
    /// [`RawProfile::unavailable`]; the others go on.
    pub fn start(cfg: &CaptureConfig) -> Result<Self, CaptureError> {
        let cpus_text = fs::read_to_string("/sys/devices/system/cpu/online")
            .map_err(|e| CaptureError::Cpus(e.to_string()))?;
        let cpus = parse_cpu_list(&cpus_text)
            .ok_or_else(|| CaptureError::Cpus(format!("unparsable {cpus_text:?}")))?;

        let mut unavailable = Vec::new();
        let (config, depth_field, oom_task_arg) = build_config(cfg, &mut unavailable);
        let mut ebpf = EbpfLoader::new()
            .override_global(names::GLOBAL_CONFIG, &config, true)
            .map_max_entries(
                names::MAP_STACKS,
                if cfg.stacks { cfg.stack_map_entries } else { 1 },
            )
            .map_max_entries(
                names::MAP_COUNTS,
                if cfg.stacks { cfg.count_map_entries } else { 1 },
            )
            .map_max_entries(
                names::MAP_SCRATCH,
                if config.copy_stacks != 0 || config.send_collided != 0 {
                    possible_cpus()
                } else {
                    1
                },
            )
            .map_max_entries(
                names::MAP_STACK_SAMPLES,
                if config.copy_stacks != 0 {
                    stack_ring_bytes(cfg.frequency_hz, cpus.len(), cfg.stack_bytes)
                } else if config.send_collided != 0 {
                    // Collided frame-pointer stacks: addresses, 1 KiB at most.
                    stack_ring_bytes(cfg.frequency_hz, cpus.len(), 1024)
                } else {
                    4096
                },
            )
            .load(EBPF_OBJECT)
            .map_err(CaptureError::Load)?;

        let mut pids: BpfHashMap<MapData, u32, u8> = take_map(&mut ebpf, names::MAP_PIDS)?;
        for pid in &cfg.pids {
            pids.insert(pid, 1, 0).map_err(|source| CaptureError::Map {
                name: names::MAP_PIDS,
                source,
            })?;
        }
        let events: RingBuf<MapData> = take_map(&mut ebpf, names::MAP_EVENTS)?;
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns
        // the RingBuf, and always reports that same fd.
        let events =
            unsafe { AsyncFd::register(events) }.map_err(|e| CaptureError::Io(e.into()))?;
        let oom_events: RingBuf<MapData> = take_map(&mut ebpf, names::MAP_OOM_EVENTS)?;
        // SAFETY: as above.
        let oom_events =
            unsafe { AsyncFd::register(oom_events) }.map_err(|e| CaptureError::Io(e.into()))?;
        let stack_samples: RingBuf<MapData> = take_map(&mut ebpf, names::MAP_STACK_SAMPLES)?;
        // SAFETY: as above.
        let stack_samples =
            unsafe { AsyncFd::register(stack_samples) }.map_err(|e| CaptureError::Io(e.into()))?;
        // Copied stacks are unwound in userspace; with --unwind fp, stacks
        // that collided in the stack map arrive as addresses and are
        // aggregated the same way.
        let unwinder = (config.copy_stacks != 0 || config.send_collided != 0).then(|| {
            let mut u = UserUnwinder::new();
            if config.copy_stacks == 0 {
                u.max_stacks = Some(cfg.count_map_entries as usize);
            }
            u
        });

        let mut procs = ProcessTable::new();
        for pid in &cfg.pids {
            procs.observe(*pid);
        }

        let mut tp_links = Vec::new();
        if cfg.follow_forks {
            let prog: &mut TracePoint = program(&mut ebpf, names::PROG_FORK)?;
            prog.load()
                .map_err(prog_err("load the fork tracepoint program"))?;
            let link = prog
                .attach("sched", "sched_process_fork")
                .map_err(prog_err("attach to tracepoint sched:sched_process_fork"))?;
            tp_links.push((names::PROG_FORK, link));
        }

        // Before the oom tracepoint program, so that it runs first: the
        // victim's cgroups, from the task the kernel passes (6.8+). Where it
        // cannot run, the tracepoint program reads them when the victim is
        // the task that ran out of memory, and /proc is the last resort.
        let mut oom_task_link = None;
        let mut oom_cgroups = None;
        if oom_task_arg && !unavailable.iter().any(|u| u.signal == "oom_kills") {
            let prog: &mut RawTracePoint = program(&mut ebpf, names::PROG_OOM_TASK)?;
            match prog.load().and_then(|()| prog.attach("mark_victim")) {
                Ok(link) => {
                    oom_task_link = Some(link);
                    oom_cgroups = Some(take_map(&mut ebpf, names::MAP_OOM_CGROUPS)?);
                }
                Err(e) => unavailable.push(Unavailable {
                    signal: "oom_victim_cgroup_in_kernel",
                    reason: format!(
                        "raw tracepoint mark_victim: {e}; the victim's cgroup comes from \
                         the killing task or /proc instead"
                    ),
                }),
            }
        }

        // The USE signals: each one that fails is reported and skipped.
        let signals: [Signal; 6] = [
            (
                "runqueue_latency",
                names::PROG_WAKEUP,
                &[("sched", "sched_wakeup"), ("sched", "sched_wakeup_new")],
            ),
            (
                "runqueue_latency",
                names::PROG_SWITCH,
                &[("sched", "sched_switch")],
            ),
            (
                "tcp_retransmits",
                names::PROG_RETRANSMIT,
                &[("tcp", "tcp_retransmit_skb")],
            ),
            (
                "tcp_retransmit_owners",
                names::PROG_SOCK_OWNER,
                &[
                    ("sock", "inet_sock_set_state"),
                    ("sock", "sock_send_length"),
                ],
            ),
            ("oom_kills", names::PROG_OOM, &[("oom", "mark_victim")]),
            (
                "tcp_synack_retransmits",
                names::PROG_RETRANSMIT_SYNACK,
                &[("tcp", "tcp_retransmit_synack")],
            ),
        ];
        for (signal, prog_name, points) in signals {
            if unavailable.iter().any(|u| u.signal == signal) {
                continue;
            }
            let prog: &mut TracePoint = program(&mut ebpf, prog_name)?;
            if let Err(e) = prog.load() {
                unavailable.push(Unavailable {
                    signal,
                    reason: format!("the kernel refused program {prog_name}: {e}"),
                });
                continue;
            }
            for (cat, name) in points {
                // sock_send_length (6.3+) only adds owners; the others are needed.
                match prog.attach(cat, name) {
                    Ok(link) => tp_links.push((prog_name, link)),
                    Err(e) if *name == "sock_send_length" => {
                        let _ = e;
                    }
                    Err(e) => unavailable.push(Unavailable {
                        signal,
                        reason: format!("cannot attach to tracepoint {cat}:{name}: {e}"),
                    }),
                }
            }
        }

        // Our own cost, measured for the life of the capture (needs
        // CAP_SYS_ADMIN; without it, reported as not measured).
        let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();

        let prog: &mut PerfEvent = program(&mut ebpf, names::PROG_SAMPLE)?;
        prog.load().map_err(prog_err("load the sampling program"))?;
        let mut perf_links = Vec::with_capacity(cpus.len());
        // cpu-clock counts nanoseconds: a fixed period gives exactly
        // `frequency_hz` samples per second per CPU, with no ramp-up.
        let period = (1_000_000_000 / cfg.frequency_hz.max(1)).max(1);
        for &cpu in &cpus {
            let link = prog
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Period(period),
                    false,
                )
                .map_err(prog_err(format!(
                    "attach the sampler to the cpu-clock of CPU {cpu}"
                )))?;
            perf_links.push(link);
        }

        Ok(Capture {
            ebpf,
            perf_links,
            tp_links,
            oom_task_link,
            oom_cgroups,
            events,
            oom_events,
            oom_kills: Vec::new(),
            stack_samples,
            unwinder,
            // SAFETY: StackSample is plain integers and bytes; all zeroes
            // is a valid value.
            sample_buf: unsafe { Box::new_zeroed().assume_init() },
            socket_owners: HashMap::new(),
            pids,
            cpus,
            procs,
            unavailable,
            depth_field,
            window_maps: None,
            prev: Cumulative::default(),
            stats_fd,
        })
    }

    /// Whether the kernel measures our programs' run time.
    pub fn stats_on(&self) -> bool {
        self.stats_fd.is_some()
    }

    /// Online CPUs sampled.
    pub fn cpus(&self) -> usize {
        self.cpus.len()
    }

    /// Adds a process to the pid filter.
    pub fn add_pid(&mut self, pid: u32) -> Result<(), CaptureError> {
        self.pids
            .insert(pid, 1, 0)
            .map_err(|source| CaptureError::Map {
                name: names::MAP_PIDS,
                source,
            })?;
        self.procs.observe(pid);
        Ok(())
    }

    /// Removes a process from the pid filter.
    pub fn remove_pid(&mut self, pid: u32) {
        let _ = self.pids.remove(&pid);
    }

    /// Waits until the kernel has announced new processes or OOM kills.
    pub async fn events_ready(&self) -> std::io::Result<()> {
        tokio::select! {
            g = self.events.readable() => { g?.clear_ready(); }
            g = self.oom_events.readable() => { g?.clear_ready(); }
            g = self.stack_samples.readable() => { g?.clear_ready(); }
            // Stack samples are sent without wakeups: drain them often.
            _ = tokio::time::sleep(std::time::Duration::from_millis(20)), if self.unwinder.is_some() => {}
        }
        Ok(())
    }

    /// Reads the memory maps of every newly announced process, and the
    /// cgroup of every OOM victim while it can still be read.
    pub fn drain_events(&mut self) {
        let mut new = Vec::new();
        let rb = self.events.get_mut();
        while let Some(item) = rb.next() {
            if item.len() >= std::mem::size_of::<ProcessEvent>() {
                // SAFETY: the kernel wrote a ProcessEvent (plain integers);
                // read_unaligned copes with any alignment.
                let ev: ProcessEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                new.push(ev);
            }
        }
        for ev in new {
            if ev.kind == ProcessEventKind::SocketOwner as u32 {
                if self.socket_owners.len() < MAX_SOCKET_OWNERS
                    && !self.socket_owners.contains_key(&ev.tgid)
                {
                    self.socket_owners.insert(ev.tgid, OwnerInfo::read(ev.tgid));
                }
            } else {
                self.procs.observe(ev.tgid);
            }
        }
        // Stack copies after announcements: their processes are known.
        if let Some(unwinder) = self.unwinder.as_mut() {
            let rb = self.stack_samples.get_mut();
            while let Some(item) = rb.next() {
                let header = std::mem::size_of::<StackSample>() - STACK_COPY_MAX;
                if item.len() >= header {
                    // The kernel sends the header and only the pages it
                    // copied: the rest of the record stays zero.
                    let sample = &mut self.sample_buf;
                    let n = item.len().min(std::mem::size_of::<StackSample>());
                    // SAFETY: copies n <= size_of::<StackSample>() bytes of
                    // plain integers into it.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            item.as_ptr(),
                            (&mut **sample as *mut StackSample).cast::<u8>(),
                            n,
                        )
                    };
                    sample.len = sample.len.min((n - header) as u32);
                    unwinder.add(sample, &mut self.procs);
                }
            }
        }
        let rb = self.oom_events.get_mut();
        while let Some(item) = rb.next() {
            if item.len() >= std::mem::size_of::<OomEvent>() {
                // SAFETY: as above, an OomEvent of plain integers.
                let event: OomEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                // The kernel's record of the victim's cgroups first (read
                // now: a dead container's cgroup goes soon), then /proc.
                let from_task = self
                    .oom_cgroups
                    .as_mut()
                    .and_then(|m| {
                        let v = m.get(&event.pid, 0).ok();
                        let _ = m.remove(&event.pid);
                        v
                    })
                    .unwrap_or(event.victim);
                let victim_cgroup = crate::cgroups::memory_path_of_id(from_task.memcg)
                    .or_else(|| crate::cgroups::path_of_id(from_task.dfl))
                    .or_else(|| crate::cgroups::memory_cgroup_of(event.pid));
                self.oom_kills.push(OomKill {
                    event,
                    victim_cgroup,
                });
            }
        }
    }

    /// Stops sampling (the maps keep what was recorded). The tracepoints
    /// stay attached until [`Capture::detach`]: unregistering one waits for
    /// an RCU grace period, about 0.1 s each, which [`Capture::collect`]
    /// need not wait for.
    pub fn stop(&mut self) {
        if let Ok(prog) = program::<PerfEvent>(&mut self.ebpf, names::PROG_SAMPLE) {
            for link in self.perf_links.drain(..) {
                let _ = prog.detach(link);
            }
        }
        // Processes and OOM kills announced just before the stop.
        self.drain_events();
    }

    /// Detaches the tracepoints (after [`Capture::collect`]).
    pub fn detach(&mut self) {
        if let Some(link) = self.oom_task_link.take()
            && let Ok(prog) = program::<RawTracePoint>(&mut self.ebpf, names::PROG_OOM_TASK)
        {
            let _ = prog.detach(link);
        }
        for (name, link) in std::mem::take(&mut self.tp_links) {
            if let Ok(prog) = program::<TracePoint>(&mut self.ebpf, name) {
                let _ = prog.detach(link);
            }
        }
    }

    /// Drains the kernel maps (call after [`Capture::stop`]).
    pub fn collect(&mut self) -> Result<RawProfile, CaptureError> {
        self.collect_window(false)
    }

    /// What was recorded since the last call (or the start), while
    /// sampling goes on: counted stacks, counter and histogram deltas,
    /// retransmits, OOM kills. With `drain`, the stack, count and
    /// retransmit maps are emptied for the next window (a sample counted
    /// between the read and the delete of its key is lost: a window
    /// boundary costs a few microseconds of samples) and entries of
    /// processes that are gone are pruned, so that a capture of any length
    /// keeps its maps from filling.
    pub fn collect_window(&mut self, drain: bool) -> Result<RawProfile, CaptureError> {
        // Samples already in the ring belong to this window.
        self.drain_events();
        if self.window_maps.is_none() {
            self.window_maps = Some(WindowMaps {
                counts: take_map(&mut self.ebpf, names::MAP_COUNTS)?,
                stacks: take_map(&mut self.ebpf, names::MAP_STACKS)?,
                counters: take_map(&mut self.ebpf, names::MAP_COUNTERS)?,
                runq_lat: take_map(&mut self.ebpf, names::MAP_RUNQ_LAT)?,
                runq_depth: take_map(&mut self.ebpf, names::MAP_RUNQ_DEPTH)?,
                retrans: take_map(&mut self.ebpf, names::MAP_RETRANS)?,
                seen: take_map(&mut self.ebpf, names::MAP_SEEN)?,
                runq_start: take_map(&mut self.ebpf, names::MAP_RUNQ_START)?,
            });
        }
        let maps = self.window_maps.as_mut().expect("taken above");
        let WindowMaps {
            counts,
            stacks,
            counters,
            runq_lat,
            runq_depth,
            retrans,
            ..
        } = maps;

        let mut cache: HashMap<i32, RawStackPart> = HashMap::new();
        let mut resolve = |id: i32| -> RawStackPart {
            if id < 0 {
                return Err(id);
            }
            cache
                .entry(id)
                .or_insert_with(|| match stacks.get(&(id as u32), 0) {
                    Ok(trace) => Ok(trace.frames().iter().map(|f| f.ip).collect()),
                    Err(_) => Err(-2), // -ENOENT: the stack was overwritten.
                })
                .clone()
        };

        let mut out = RawProfile {
            cpus: self.cpus.len(),
            cpu_ids: self.cpus.clone(),
            unavailable: self.unavailable.clone(),
            depth_field: self.depth_field,
            oom_kills: std::mem::take(&mut self.oom_kills),
            socket_owners: std::mem::take(&mut self.socket_owners),
            ..Default::default()
        };
        let mut count_keys = Vec::new();
        for item in counts.iter() {
            let Ok((key, per_cpu)) = item else { continue };
            if drain {
                count_keys.push(key);
            }
            let count: u64 = per_cpu.iter().sum();
            if count == 0 {
                continue;
            }
            let thread = String::from_utf8_lossy(key.comm.split(|b| *b == 0).next().unwrap_or(&[]))
                .into_owned();
            out.stacks.push(RawStack {
                tgid: key.tgid,
                thread,
                user: resolve(key.user_stack_id),
                user_cut: None,
                kernel: resolve(key.kernel_stack_id),
                count,
            });
        }
        if let Some(unwinder) = self.unwinder.as_mut() {
            let (unwound, stats) = unwinder.take_window();
            out.unwind = Some(stats);
            for (key, count) in unwound {
                out.stacks.push(RawStack {
                    tgid: key.tgid,
                    thread: key.thread,
                    user: Ok(key.user),
                    user_cut: key.cut,
                    kernel: resolve(key.kernel_stack_id),
                    count,
                });
            }
        }
        let per_cpu = |map: &PerCpuArray<MapData, u64>, idx: u32| -> Vec<u64> {
            map.get(&idx, 0)
                .map(|v| v.iter().copied().collect())
                .unwrap_or_default()
        };
        let prev = &mut self.prev;
        let mut counter_deltas: HashMap<u32, Vec<u64>> = HashMap::new();
        for c in Counter::ALL {
            let d = delta(&mut prev.counters, c as u32, per_cpu(counters, c as u32));
            out.counters.insert(counter_name(c), d.iter().sum());
            counter_deltas.insert(c as u32, d);
        }
        out.cpu_ticks = counter_deltas
            .remove(&(Counter::CpuTicks as u32))
            .unwrap_or_default();
        out.cpu_busy_ticks = counter_deltas
            .remove(&(Counter::CpuBusyTicks as u32))
            .unwrap_or_default();
        let transpose = |by_slot: Vec<Vec<u64>>| -> Vec<Vec<u64>> {
            let ncpu = by_slot.iter().map(Vec::len).max().unwrap_or(0);
            (0..ncpu)
                .map(|cpu| {
                    by_slot
                        .iter()
                        .map(|v| v.get(cpu).copied().unwrap_or(0))
                        .collect()
                })
                .collect()
        };
        out.runq_latency = transpose(
            (0..LATENCY_SLOTS)
                .map(|s| delta(&mut prev.runq_lat, s, per_cpu(runq_lat, s)))
                .collect(),
        );
        let max_per_cpu = per_cpu(runq_lat, LATENCY_SLOTS);
        out.runq_latency_max_us = max_per_cpu.iter().copied().max().unwrap_or(0);
        if drain && out.runq_latency_max_us > 0 {
            // The longest wait is a maximum, not a count: start it over.
            if let Ok(zeros) = aya::maps::PerCpuValues::try_from(vec![0u64; max_per_cpu.len()]) {
                let _ = runq_lat.set(LATENCY_SLOTS, zeros, 0);
            }
        }
        out.runq_depth = transpose(
            (0..DEPTH_SLOTS)
                .map(|s| delta(&mut prev.runq_depth, s, per_cpu(runq_depth, s)))
                .collect(),
        );
        let mut retrans_keys = Vec::new();
        for item in retrans.iter() {
            let Ok((key, per_cpu)) = item else { continue };
            if drain {
                retrans_keys.push(key);
            }
            let mut total = RetransValue::default();
            for v in per_cpu.iter() {
                if v.count == 0 {
                    continue;
                }
                if total.count == 0 || v.first_ns < total.first_ns {
                    total.first_ns = v.first_ns;
                }
                total.last_ns = total.last_ns.max(v.last_ns);
                total.count += v.count;
                if total.owner_tgid == 0 {
                    total.owner_tgid = v.owner_tgid;
                    total.owner_cgroup = v.owner_cgroup;
                    total.owner_comm = v.owner_comm;
                }
            }
            if total.count > 0 {
                out.retransmits.push((key, total));
            }
        }
        if drain {
            for key in count_keys {
                let _ = counts.remove(&key);
            }
            for key in retrans_keys {
                let _ = retrans.remove(&key);
            }
            let ids: Vec<u32> = stacks.stack_ids().filter_map(Result::ok).collect();
            for id in ids {
                let _ = stacks.remove(&id);
            }
            self.prune();
        }
        Ok(out)
    }

    /// Removes kernel map entries of processes and threads that are gone.
    fn prune(&mut self) {
        let Some(maps) = self.window_maps.as_mut() else {
            return;
        };
        let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
        let stale: Vec<u32> = maps
            .seen
            .keys()
            .filter_map(Result::ok)
            .filter(|&p| !alive(p))
            .collect();
        for pid in stale {
            let _ = maps.seen.remove(&pid);
        }
        // A task woken but never run again (it exited) leaves its wakeup
        // time behind: older than a minute is stale.
        let now = monotonic_ns();
        let stale: Vec<u32> = maps
            .runq_start
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, t)| now.saturating_sub(*t) > 60_000_000_000)
            .map(|(tid, _)| tid)
            .collect();
        for tid in stale {
            let _ = maps.runq_start.remove(&tid);
        }
    }

    /// Cumulative run time (ns) and run count of each loaded program, from
    /// the kernel's statistics (zero unless kernel.bpf_stats_enabled or a
    /// BPF_ENABLE_STATS descriptor is held).
    pub fn bpf_stats(&self) -> Vec<(String, u64, u64)> {
        use std::os::fd::{AsFd, AsRawFd};
        let mut out = Vec::new();
        for (name, prog) in self.ebpf.programs() {
            let Ok(fd) = prog.fd() else { continue };
            let raw = fd.as_fd().as_raw_fd();
            let Ok(info) = fs::read_to_string(format!("/proc/self/fdinfo/{raw}")) else {
                continue;
            };
            let field = |key: &str| -> u64 {
                info.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0)
            };
            out.push((name.to_string(), field("run_time_ns:"), field("run_cnt:")));
        }
        out
    }

    /// Forgets processes that have exited, except those `keep` still
    /// needs (their stacks are not symbolized yet).
    pub fn forget_exited(&mut self, keep: impl Fn(u32) -> bool) {
        // Live processes are re-read when announced (each second while
        // sampled); here only the gone ones are found.
        self.procs.mark_exited();
        let gone = self.procs.evict_exited(keep);
        if let Some(u) = self.unwinder.as_mut() {
            u.forget(&gone);
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| CaptureError::Program {
            what: format!("find program {name} in the eBPF object"),
            source: aya::programs::ProgramError::NotLoaded,
        })?;
    prog.try_into().map_err(|source| CaptureError::Program {
        what: format!("use program {name}"),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_match_their_indexes() {
        assert_eq!(retrans_field::NAMES[retrans_field::SKADDR], "skaddr");
        assert_eq!(retrans_field::NAMES[retrans_field::STATE], "state");
        assert_eq!(retrans_field::NAMES[retrans_field::DADDR6], "daddr_v6");
        assert_eq!(oom_field::NAMES[oom_field::PID], "pid");
        assert_eq!(oom_field::NAMES[oom_field::COMM], "comm");
        assert_eq!(oom_field::NAMES[oom_field::SCORE_ADJ], "oom_score_adj");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,5,7-8\n"),
            Some(vec![0, 1, 2, 3, 5, 7, 8])
        );
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }
}
