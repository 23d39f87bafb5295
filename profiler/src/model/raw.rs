//! What the capture stage records: counted raw stacks and the USE
//! signals' data of one window.

use std::collections::HashMap;

use profiler_common::{
    counters::Counter,
    oom::OomEvent,
    tcp::{RetransKey, RetransValue},
};

/// A stack as recorded: addresses leaf first, or the errno of the walk.
pub type RawStackPart = Result<Vec<u64>, i32>;

/// Why a user stack unwound in userspace stopped before its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cut {
    /// It needed stack past the copied window (`--stack-bytes`), or went
    /// deeper than the most frames walked.
    Window,
    /// A frame with no rule to go on: no CFI covers it and its frame
    /// pointer leads nowhere (hand-written assembly, code built without
    /// unwind tables or frame pointers), or the process was not known.
    Lost,
    /// The walk reached an address in no mapping, or in memory that is
    /// not code (heap, stack, data): the frames before it were wrong
    /// (a frame pointer used as one that was not). That address is the
    /// last frame kept, and says so; nothing past it is read.
    BadAddress,
}

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
    pub user_cut: Option<Cut>,
    /// Kernel stack, leaf first.
    pub kernel: RawStackPart,
    /// Samples.
    pub count: u64,
}

/// One HTTP request, as answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimedRequest {
    /// When the response began (monotonic ns).
    pub time_ns: u64,
    /// Index in `RawProfile::request_routes`.
    pub route: u32,
    /// Server-side duration, microseconds.
    pub duration_us: u32,
    /// Status code.
    pub status: u16,
}

/// One second of the capture: what the status line says and what the
/// report plots.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Second {
    /// Seconds since the start, at the end of this one.
    pub t: f64,
    /// Samples taken.
    pub samples: u64,
    /// Samples lost (count map full, stack ring full).
    pub lost: u64,
    /// Share (0..1) of each online CPU's ticks that found a task running.
    pub cpu_busy: Vec<f64>,
    /// Time tasks waited on run queues, in ms (all CPUs): the CPUs'
    /// saturation.
    pub runq_wait_ms: f64,
    /// Mean run-queue depth seen by the ticks.
    pub runq_depth: f64,
    /// TCP retransmits.
    pub retransmits: u64,
    /// OOM kills.
    pub oom_kills: u64,
    /// HTTP requests answered (ended in this second).
    pub requests: u64,
    /// Of those, answered with a 5xx status.
    pub errors: u64,
    /// Event-loop stalls that ended in this second.
    pub stalls: u64,
    /// Their time, in ms.
    pub stall_ms: f64,
    /// The processes most sampled: (pid, name, samples).
    pub top: Vec<(u32, String, u64)>,
    /// Time off the CPU of the blocks that ended in this second, by
    /// cause, in ms (`crate::offcpu::name_seconds` fills it from
    /// `offcpu`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub offcpu_ms: std::collections::BTreeMap<&'static str, f64>,
    /// The same as counted: (class, syscall, detail, ns).
    #[serde(skip)]
    pub offcpu: Vec<(u8, i32, u8, u64)>,
}

/// One summed off-CPU key: the stacks a thread left the CPU with, and
/// which part of its time away is counted.
#[derive(Clone, Debug)]
pub struct OffCpuStack {
    /// The stacks as taken at the switch; `count` is the blocks.
    pub stack: RawStack,
    /// Nanoseconds off the CPU.
    pub ns: u64,
    /// How it left ([`profiler_common::offcpu::class`]).
    pub class: u8,
    /// The syscall it was in ([`profiler_common::offcpu::NO_SYSCALL`]:
    /// none).
    pub syscall: i32,
    /// For futex(2), its command (`op & 0x7f`).
    pub detail: u8,
    /// Blocks shorter than the minimum: no user stack, not in the flame
    /// graph, still in the totals.
    pub short: bool,
    /// When: intervals `[first, last, us]`, `us` microseconds away
    /// spread over time slices `first..=last`
    /// (`profiler_common::stacks::TIME_SLICE_NS` on the monotonic clock,
    /// wrapping). Their `us` add up to about `ns` / 1000; a capture
    /// keeps at most [`MAX_OFFCPU_SPANS`] of them, the totals all.
    pub spans: Vec<[u32; 3]>,
}

/// Most off-CPU intervals kept in one window (16 bytes each with their
/// share of the vector): the totals past it stay, untimed.
pub const MAX_OFFCPU_SPANS: usize = 2_000_000;

/// A CPU sample taken inside an event-loop turn.
#[derive(Clone, Debug)]
pub struct TimedSample {
    /// Thread id.
    pub tid: u32,
    /// When (ktime ns).
    pub time_ns: u64,
    /// Its stacks (`count` 1).
    pub stack: RawStack,
}

/// A block off the CPU inside an event-loop turn.
#[derive(Clone, Debug)]
pub struct TurnBlock {
    /// Thread id.
    pub tid: u32,
    /// Left the CPU, woken (0: not known), ran again (ktime ns).
    pub start_ns: u64,
    /// Woken.
    pub woken_ns: u64,
    /// Ran again.
    pub end_ns: u64,
    /// Its stacks, how it left and the syscall it was in (`ns`: the
    /// whole block).
    pub block: OffCpuStack,
}

/// An event-loop thread's turns, as counted in the kernel.
#[derive(Clone, Debug)]
pub struct LoopThreadRaw {
    /// Thread id.
    pub tid: u32,
    /// The kernel's record.
    pub turns: profiler_common::loops::LoopThread,
}

/// Userspace unwinding figures of a window (dwarf/auto, and collided
/// frame-pointer stacks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindStats {
    /// Samples unwound.
    pub samples: u64,
    /// Of those, stacks cut at the copied window (or the most frames).
    pub truncated: u64,
    /// Of those, stacks whose walk met a frame with no rule to go on.
    pub lost: u64,
    /// Of those, walks stopped at a return address in no mapping or in
    /// memory that is not code.
    pub bad_address: u64,
    /// Samples dropped because the aggregation was full.
    pub dropped: u64,
    /// Frames of JIT code stepped over with the CFI of a jitdump.
    pub jit_cfi_frames: u64,
    /// Bytes of stack received.
    pub bytes: u64,
    /// Samples counted without their time slice (the slices kept were
    /// at their bound).
    pub untimed: u64,
}

impl UnwindStats {
    /// Adds another window's figures.
    pub fn add(&mut self, u: &UnwindStats) {
        self.samples += u.samples;
        self.truncated += u.truncated;
        self.lost += u.lost;
        self.bad_address += u.bad_address;
        self.jit_cfi_frames += u.jit_cfi_frames;
        self.dropped += u.dropped;
        self.bytes += u.bytes;
        self.untimed += u.untimed;
    }
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

/// What was read of a socket's owner while it lived.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerInfo {
    /// Process name.
    pub comm: Option<String>,
    /// Cgroup path.
    pub cgroup: Option<String>,
}

/// A signal that could not be collected, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable {
    /// Which signal (`runqueue_latency`, `runqueue_depth`, ...).
    pub signal: &'static str,
    /// Why, in words that say what would fix it.
    pub reason: String,
}

/// The kernel programs' counters of a window, summed over CPUs, keyed by
/// [`Counter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters([u64; Counter::COUNT as usize]);

impl Counters {
    /// One counter's value.
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }

    /// Adds `n` to a counter.
    pub fn add(&mut self, c: Counter, n: u64) {
        self.0[c as usize] += n;
    }

    /// Every counter with its value, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (Counter, u64)> + '_ {
        Counter::ALL.into_iter().map(|c| (c, self.get(c)))
    }
}

/// Events the kernel counted in a window, over every CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountedEvents {
    /// Context switches.
    pub context_switches: u64,
    /// Tasks moved from one CPU to another.
    pub migrations: u64,
    /// Page faults that waited for I/O.
    pub major_faults: u64,
}

impl CountedEvents {
    fn add(&mut self, o: &CountedEvents) {
        self.context_switches += o.context_switches;
        self.migrations += o.migrations;
        self.major_faults += o.major_faults;
    }
}

/// Most stalls, and samples and blocks inside loop turns, kept in one
/// window of slices.
pub const MAX_TIMED_EVENTS: usize = 400_000;

/// Sums off-CPU entries of the same key (slices of one window).
fn coalesce_offcpu(v: &mut Vec<OffCpuStack>) {
    type Key = (u32, String, RawStackPart, RawStackPart, u8, i32, u8, bool);
    let mut at: HashMap<Key, usize> = HashMap::new();
    let mut out: Vec<OffCpuStack> = Vec::with_capacity(v.len());
    let mut spans = 0;
    for mut o in v.drain(..) {
        // Past the bound, the time stays and its when goes.
        if spans + o.spans.len() > MAX_OFFCPU_SPANS {
            o.spans.clear();
        }
        spans += o.spans.len();
        let key = (
            o.stack.tgid,
            o.stack.thread.clone(),
            o.stack.user.clone(),
            o.stack.kernel.clone(),
            o.class,
            o.syscall,
            o.detail,
            o.short,
        );
        match at.get(&key) {
            Some(&i) => {
                out[i].ns += o.ns;
                out[i].stack.count += o.stack.count;
                out[i].spans.append(&mut o.spans);
            }
            None => {
                at.insert(key, out.len());
                out.push(o);
            }
        }
    }
    *v = out;
}

/// Most socket owners remembered in one capture.
pub const MAX_SOCKET_OWNERS: usize = 4096;

/// Everything the kernel side recorded in a window.
#[derive(Clone, Debug, Default)]
pub struct RawProfile {
    /// Counted stacks.
    pub stacks: Vec<RawStack>,
    /// When the counted stacks were sampled: `(time slice, index in
    /// stacks, samples)`, slices of `profiler_common::stacks::TIME_SLICE_NS`
    /// from `time_origin_ns`.
    pub stack_times: Vec<(u32, u32, u32)>,
    /// The monotonic clock (ns) at slice 0: the start of the capture,
    /// rounded down to a slice.
    pub time_origin_ns: u64,
    /// One row a second of the USE figures, in order.
    pub seconds: Vec<Second>,
    /// The kernel programs' counters.
    pub counters: Counters,
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
    /// Retransmits per time slice: `(slice, count)`, slices of
    /// `profiler_common::stacks::TIME_SLICE_NS` on the monotonic clock
    /// (wrapping), in order.
    pub retransmit_times: Vec<(u32, u32)>,
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
    /// Events the kernel counted (None: not counted).
    pub counted: Option<CountedEvents>,
    /// Whether off-CPU time was recorded.
    pub offcpu_on: bool,
    /// Off-CPU time, summed per key.
    pub offcpu: Vec<OffCpuStack>,
    /// Whether event-loop turns were timed.
    pub loops_on: bool,
    /// Event-loop threads and their turns.
    pub loops: Vec<LoopThreadRaw>,
    /// Turns past the stall threshold.
    pub stalls: Vec<profiler_common::loops::Stall>,
    /// CPU samples inside turns.
    pub turn_samples: Vec<TimedSample>,
    /// Off-CPU blocks inside turns.
    pub turn_blocks: Vec<TurnBlock>,
    /// Whether requests were followed.
    pub requests_on: bool,
    /// HTTP/1.x requests per process and route.
    pub routes: Vec<(
        crate::requests::http::RouteKey,
        crate::requests::http::RouteAgg,
    )>,
    /// Per process, exchanges on accepted TLS connections (encrypted: no
    /// routes), timed as requests.
    pub tls: Vec<(u32, crate::requests::http::RouteAgg)>,
    /// Responses whose request was not seen whole or not HTTP/1.x.
    pub requests_unparsed: u64,
    /// HTTP/1.x requests one by one, in the order answered (bounded).
    pub request_times: Vec<TimedRequest>,
    /// The routes `TimedRequest::route` indexes (the capture's whole
    /// list so far).
    pub request_routes: Vec<crate::requests::http::RouteKey>,
    /// Per process, the idle time (ns) of the accepted connections it
    /// closed itself after answering on them.
    pub idle_closes: Vec<(u32, Vec<u64>)>,
    /// Outbound connections per process and destination.
    pub destinations: Vec<(
        (u32, crate::requests::downstream::Dest),
        crate::requests::downstream::DestAgg,
    )>,
}

impl RawProfile {
    /// Every stack of the capture: the CPU samples', the off-CPU keys',
    /// and the event-loop turns' samples and blocks.
    pub fn all_stacks(&self) -> impl Iterator<Item = &RawStack> {
        self.stacks
            .iter()
            .chain(self.offcpu.iter().map(|o| &o.stack))
            .chain(self.turn_samples.iter().map(|t| &t.stack))
            .chain(self.turn_blocks.iter().map(|b| &b.block.stack))
    }

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
        for (c, v) in other.counters.iter() {
            self.counters.add(c, v);
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
        self.retransmit_times.extend(other.retransmit_times);
        self.seconds.extend(other.seconds);
        // Each slice numbers its own routes: renumber into this list.
        let mut ids: HashMap<&crate::requests::http::RouteKey, u32> = self
            .request_routes
            .iter()
            .enumerate()
            .map(|(i, k)| (k, i as u32))
            .collect();
        let mut added = Vec::new();
        let map: Vec<u32> = other
            .request_routes
            .iter()
            .map(|k| match ids.get(k) {
                Some(&i) => i,
                None => {
                    let i = (self.request_routes.len() + added.len()) as u32;
                    ids.insert(k, i);
                    added.push(k.clone());
                    i
                }
            })
            .collect();
        self.request_routes.extend(added);
        self.request_times
            .extend(other.request_times.iter().filter_map(|r| {
                Some(TimedRequest {
                    route: *map.get(r.route as usize)?,
                    ..*r
                })
            }));
        for (pid, o) in other.socket_owners {
            if self.socket_owners.len() < MAX_SOCKET_OWNERS {
                self.socket_owners.insert(pid, o);
            }
        }
        self.unavailable = other.unavailable;
        self.depth_field = other.depth_field;
        if let Some(c) = other.counted {
            self.counted.get_or_insert_with(Default::default).add(&c);
        }
        if let Some(u) = other.unwind {
            self.unwind.get_or_insert_with(Default::default).add(&u);
        }
        self.offcpu_on |= other.offcpu_on;
        self.offcpu.extend(other.offcpu);
        coalesce_offcpu(&mut self.offcpu);
        self.loops_on |= other.loops_on;
        for l in other.loops {
            match self.loops.iter_mut().find(|x| x.tid == l.tid) {
                Some(x) => {
                    let (a, b) = (&mut x.turns, &l.turns);
                    a.turns += b.turns;
                    a.total_ns += b.total_ns;
                    a.max_ns = a.max_ns.max(b.max_ns);
                    for (h, g) in a.hist.iter_mut().zip(b.hist.iter()) {
                        *h += g;
                    }
                    a.in_turn = b.in_turn;
                    a.turn_start = b.turn_start;
                }
                None => self.loops.push(l),
            }
        }
        let room = |v: usize| MAX_TIMED_EVENTS.saturating_sub(v);
        let n = room(self.stalls.len());
        self.stalls.extend(other.stalls.into_iter().take(n));
        let n = room(self.turn_samples.len());
        self.turn_samples
            .extend(other.turn_samples.into_iter().take(n));
        let n = room(self.turn_blocks.len());
        self.turn_blocks
            .extend(other.turn_blocks.into_iter().take(n));
        self.requests_on |= other.requests_on;
        self.requests_unparsed += other.requests_unparsed;
        for (k, v) in other.routes {
            match self.routes.iter_mut().find(|(x, _)| *x == k) {
                Some((_, a)) => a.merge(&v),
                None => self.routes.push((k, v)),
            }
        }
        for (k, v) in other.tls {
            match self.tls.iter_mut().find(|(x, _)| *x == k) {
                Some((_, a)) => a.merge(&v),
                None => self.tls.push((k, v)),
            }
        }
        for (k, v) in other.destinations {
            match self.destinations.iter_mut().find(|(x, _)| *x == k) {
                Some((_, a)) => a.merge(&v),
                None => self.destinations.push((k, v)),
            }
        }
        for (pid, v) in other.idle_closes {
            match self.idle_closes.iter_mut().find(|(p, _)| *p == pid) {
                Some((_, a)) if a.len() < 10_000 => a.extend(v),
                Some(_) => {}
                None => self.idle_closes.push((pid, v)),
            }
        }
    }

    /// Value of one counter.
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters.get(c)
    }
}
