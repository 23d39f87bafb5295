//! The capture stage: loads the eBPF object, attaches each signal's kernel
//! programs, and drains what they record into a [`RawProfile`] per window.
//!
//! One module per signal, each behind the [`Signal`] interface: it tells
//! its kernel programs this kernel's layouts ([`Signal::configure`]),
//! attaches them, drains their rings and maps into the window's data, and
//! detaches them. Its programs and maps are the `profiler-ebpf` module of
//! the same name, its shared types the `profiler-common` one:
//!
//! - `procs`: process announcements (memory maps read while processes
//!   live), the pid filter, fork following;
//! - `stacks`: the cpu-clock sampler: stacks (kernel walks, frame
//!   pointers or stack copies unwound here) and CPU ticks;
//! - `sched`: run-queue latency and depth;
//! - `offcpu`: time off the CPU with the stacks threads left it with;
//! - `loops`: event-loop turns (epoll wait to wait) and stalls;
//! - `requests`: accepted connections' requests and responses (HTTP/1.x);
//! - `tcp`: TCP retransmits and their sockets' owners;
//! - `oom`: OOM kills and their victims' cgroups;
//! - `counted`: context switches, migrations and major faults, counted
//!   by perf events (no kernel program).
//!
//! The counters every program bumps ([`profiler_common::counters`]) are
//! read here, for all of them.

mod counted;
mod kernel;
mod loops;
mod offcpu;
mod oom;
mod procs;
mod requests;
mod sched;
pub mod sizes;
mod stacks;
pub(crate) use stacks::read_record;
mod tcp;

use std::{future::Future, pin::Pin, task::Poll};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray},
};
use profiler_common::{
    MapDef,
    config::{self, Config},
    counters::{self, Counter},
};
use tokio::io::unix::AsyncFd;

use kernel::{Ring, delta, per_cpu, take_map};
pub use kernel::{monotonic_ns, parse_cpu_list};

use crate::{
    kbtf::{Btf, BtfError},
    model::{RawProfile, Second, Unavailable},
    procs::ProcessTable,
    unwind::UnwindMode,
};

/// The eBPF object, built by build.rs and embedded: one file to ship.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// The eBPF object this build loads.
pub fn ebpf_object() -> &'static [u8] {
    EBPF_OBJECT
}

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
    /// Print the kernel programs' diagnostics (aya-log); when off, their
    /// log level is 0 and the verifier removes the logging code.
    pub verbose: bool,
    /// Time threads off the CPU, with stacks.
    pub offcpu: bool,
    /// Off-CPU blocks shorter than this (ns) are summed without stacks.
    pub offcpu_min_ns: u64,
    /// Time event-loop turns.
    pub loops: bool,
    /// Turns at least this long (ns) are stalls.
    pub stall_ns: u64,
    /// Follow accepted connections' requests.
    pub requests: bool,
    /// The capture's length when known (`record -d`): bounds the maps
    /// that keep a whole capture's stacks.
    pub duration: Option<std::time::Duration>,
    /// Also write every stack copy received here (`profiler replay`).
    pub save_samples: Option<std::path::PathBuf>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        use profiler_common::stacks;
        CaptureConfig {
            frequency_hz: 99,
            pids: Vec::new(),
            filter: false,
            follow_forks: false,
            stack_map_entries: stacks::STACKS.entries,
            count_map_entries: stacks::COUNTS.entries,
            stacks: true,
            unwind: UnwindMode::Auto,
            stack_bytes: stacks::STACK_COPY_MAX as u32,
            verbose: false,
            offcpu: false,
            offcpu_min_ns: profiler_common::offcpu::MIN_NS,
            loops: false,
            stall_ns: profiler_common::loops::STALL_NS,
            requests: false,
            duration: None,
            save_samples: None,
        }
    }
}

/// Why a capture could not start, or a part of it failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The kernel refused the eBPF object.
    #[error(
        "the kernel refused the eBPF programs: {0:#}\n(needs Linux >= 5.8 with BPF ring buffers; run as root or with CAP_BPF and CAP_PERFMON)"
    )]
    Load(#[source] aya::EbpfError),
    /// A program failed to load, attach or detach.
    #[error("could not {what}: {source}")]
    Program {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map was missing or of the wrong type (a build problem), or an
    /// update of it failed.
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

/// What the signals learn and decide before the object is loaded.
pub struct Setup<'a> {
    /// What the user asked for.
    pub cfg: &'a CaptureConfig,
    /// Online CPUs.
    pub cpus: &'a [u32],
    /// The kernel's BTF, or why it could not be read.
    pub btf: &'a Result<Btf, BtfError>,
    /// The kernel programs' settings, filled in by each signal.
    pub config: Config,
    /// Map sizes that differ from their defaults.
    pub sizes: Vec<(MapDef, u32)>,
    /// Signals (or parts) this kernel cannot give, and why.
    pub unavailable: Vec<Unavailable>,
    /// Time spent in the verifier (loading programs) so far.
    pub verifying: std::time::Duration,
    /// Threads on the host at start.
    pub threads: u32,
}

impl Setup<'_> {
    /// The host the map sizes follow ([`sizes`]).
    pub fn host(&self) -> sizes::Host {
        sizes::Host {
            cpus: self.cpus.len().max(1) as u32,
            hz: self.cfg.frequency_hz,
            duration: self.cfg.duration,
            threads: self.threads,
        }
    }

    /// Marks a signal unavailable.
    pub fn unavailable(&mut self, signal: &'static str, reason: impl std::fmt::Display) {
        self.unavailable.push(Unavailable {
            signal,
            reason: reason.to_string(),
        });
    }

    /// Whether a signal was marked unavailable.
    pub fn is_unavailable(&self, signal: &str) -> bool {
        self.unavailable.iter().any(|u| u.signal == signal)
    }
}

/// One signal's loader part: kernel programs to attach, rings and maps to
/// drain into the window's data.
pub trait Signal {
    /// Reads this kernel's layouts (tracepoint formats, BTF) into
    /// `setup.config`, sizes its maps, and marks what this kernel lacks
    /// unavailable. Before load.
    fn configure(&mut self, setup: &mut Setup<'_>);
    /// Takes its maps and attaches its programs. A part that this kernel
    /// refuses is marked unavailable and the capture goes on; an error
    /// stops the capture.
    fn attach(&mut self, ebpf: &mut Ebpf, setup: &mut Setup<'_>) -> Result<(), CaptureError>;
    /// Its ring buffers, waited on for records.
    fn rings(&self) -> Vec<&Ring> {
        Vec::new()
    }
    /// Whether its rings are written without wakeups and must be drained
    /// on a timer.
    fn polled(&self) -> bool {
        false
    }
    /// Reads what its rings hold (often, so that processes are read while
    /// they live).
    fn drain(&mut self, _procs: &mut ProcessTable) {}
    /// Stops what samples (the cpu-clock events); tracepoints stay until
    /// [`Signal::detach`].
    fn stop(&mut self, _ebpf: &mut Ebpf) -> Result<(), CaptureError> {
        Ok(())
    }
    /// Adds what it recorded since the last window to `out`; with `drain`,
    /// empties its maps for the next window.
    fn collect(
        &mut self,
        ebpf: &mut Ebpf,
        out: &mut RawProfile,
        drain: bool,
    ) -> Result<(), CaptureError>;
    /// Moves what the kernel aggregates to userspace (a few times a
    /// second), where a map would otherwise fill.
    fn tick(&mut self) {}
    /// Adds its figures of the second just ended to `row`.
    fn second(&mut self, _row: &mut Second) {}
    /// Forgets what it keeps of processes that are gone.
    fn forget(&mut self, _gone: &[u32]) {}
    /// Detaches its programs; every failure is returned.
    /// Its links go to `closing`, closed all at once.
    fn detach(&mut self, ebpf: &mut Ebpf, closing: &mut kernel::Closing) -> Vec<CaptureError>;
}

/// Prints the kernel programs' log records (`--verbose`) on stderr.
struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        eprintln!(
            "profiler: kernel {}: {}",
            record.level().as_str().to_lowercase(),
            record.args()
        );
    }

    fn flush(&self) {}
}

/// The signals, in the order they attach (the sampler last, once the rest
/// is ready) and drain (after process tracking, which is first).
fn signals(cfg: &CaptureConfig) -> Vec<Box<dyn Signal>> {
    vec![
        Box::new(sched::Sched::default()),
        Box::new(tcp::Tcp::default()),
        Box::new(offcpu::OffCpu::default()),
        Box::new(loops::Loops::default()),
        Box::new(requests::Requests::default()),
        Box::new(oom::Oom::default()),
        Box::new(counted::Counted::default()),
        Box::new(stacks::Stacks::new(cfg)),
    ]
}

/// A running capture.
pub struct Capture {
    ebpf: Ebpf,
    /// Process tracking: the pid filter and announcements.
    tracking: procs::Tracking,
    signals: Vec<Box<dyn Signal>>,
    cpus: Vec<u32>,
    unavailable: Vec<Unavailable>,
    /// The counters every program bumps.
    counters: Option<PerCpuArray<MapData, u64>>,
    /// Cumulative per-CPU counter values at the last window.
    prev: Vec<Vec<u64>>,
    /// Cumulative per-CPU counter values at the last [`Capture::second`].
    prev_second: Vec<Vec<u64>>,
    /// When the capture started, and the rows of its seconds not yet
    /// collected.
    started: std::time::Instant,
    seconds: Vec<Second>,
    /// Held while the capture lives: the kernel keeps run-time statistics
    /// of BPF programs while a BPF_ENABLE_STATS descriptor is open (and
    /// stops when it closes, unlike the sysctl).
    stats_fd: Option<std::os::fd::OwnedFd>,
    /// The kernel programs' log records (`--verbose`).
    logs: Option<AsyncFd<aya_log::EbpfLogger<KernelLog>>>,
    /// Processes read while they lived.
    pub procs: ProcessTable,
    startup: Startup,
}

/// Where [`Capture::start`]'s time went.
#[derive(Clone, Debug, Default)]
pub struct Startup {
    /// Reading and parsing the kernel's BTF.
    pub btf: std::time::Duration,
    /// Reading the tracepoints' formats (tracefs) and the rest of each
    /// signal's layouts.
    pub configure: std::time::Duration,
    /// Parsing the object, relocating it against BTF, creating the maps.
    pub maps: std::time::Duration,
    /// The verifier: loading the programs.
    pub verifier: std::time::Duration,
    /// Attaching them (perf events, tracepoints) and the rest.
    pub attach: std::time::Duration,
}

impl Startup {
    /// Each part, in ms (use.json `profiler.startup_ms`).
    pub fn as_ms(&self) -> std::collections::BTreeMap<&'static str, f64> {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        [
            ("btf", ms(self.btf)),
            ("tracepoint_formats", ms(self.configure)),
            ("object_and_maps", ms(self.maps)),
            ("verifier", ms(self.verifier)),
            ("attach", ms(self.attach)),
        ]
        .into_iter()
        .collect()
    }

    /// One line, in ms.
    pub fn render(&self) -> String {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        format!(
            "BTF {:.0} ms, tracepoint formats {:.0} ms, object and maps {:.0} ms, verifier {:.0} ms, attach {:.0} ms",
            ms(self.btf),
            ms(self.configure),
            ms(self.maps),
            ms(self.verifier),
            ms(self.attach)
        )
    }
}

impl Capture {
    /// Loads the programs and starts sampling. A signal whose program
    /// cannot be loaded or attached on this kernel is reported in
    /// [`RawProfile::unavailable`]; the others go on.
    pub fn start(cfg: &CaptureConfig) -> Result<Self, CaptureError> {
        let t0 = std::time::Instant::now();
        // aya's loader reads and parses the kernel's BTF when created:
        // on another CPU while we read ours and the tracepoint formats.
        let making_loader = std::thread::spawn(EbpfLoader::new);
        let cpus = kernel::online_cpus()?;
        let btf = crate::kbtf::load();
        let t_btf = t0.elapsed();
        let mut setup = Setup {
            cfg,
            cpus: &cpus,
            btf: &btf,
            config: Config::DEFAULT,
            sizes: Vec::new(),
            unavailable: Vec::new(),
            verifying: std::time::Duration::ZERO,
            threads: sizes::threads_now(),
        };
        let mut tracking = procs::Tracking::default();
        let mut signals = signals(cfg);
        tracking.configure(&mut setup);
        for s in &mut signals {
            s.configure(&mut setup);
        }
        let mut loader = making_loader
            .join()
            .map_err(|_| CaptureError::Io(std::io::Error::other("aya's loader panicked")))?;
        // aya's loader parses the kernel's BTF for CO-RE relocations
        // when created; our programs have none, so its copy (tens of MB
        // parsed) is dropped before the maps are made.
        if crate::kbtf::core_relocation_bytes(EBPF_OBJECT) == Some(0) {
            loader.btf(None);
        }
        setup.config.own_tgid = std::process::id();
        loader.override_global(config::CONFIG, &setup.config, true);
        // Level 0 turns every log statement off; the global is read-only,
        // so the verifier drops the logging code altogether.
        let log_level: u8 = if cfg.verbose { u8::MAX } else { 0 };
        loader.override_global(aya_log::LEVEL, &log_level, true);
        for (def, size) in &setup.sizes {
            loader.map_max_entries(def.name, *size);
        }
        let t_configured = t0.elapsed();
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(CaptureError::Load)?;
        let t_loaded = t0.elapsed();

        let mut procs = ProcessTable::new();
        for pid in &cfg.pids {
            procs.observe(*pid);
        }
        tracking.attach(&mut ebpf, &mut setup)?;
        // Our own cost, measured for the life of the capture (needs
        // CAP_SYS_ADMIN; without it, reported as not measured).
        let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        for s in &mut signals {
            s.attach(&mut ebpf, &mut setup)?;
        }
        let t_attached = t0.elapsed();
        let startup = Startup {
            btf: t_btf,
            configure: t_configured - t_btf,
            maps: t_loaded - t_configured,
            verifier: setup.verifying,
            attach: (t_attached - t_loaded).saturating_sub(setup.verifying),
        };
        let unavailable = setup.unavailable;
        let logs = if cfg.verbose {
            let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, KernelLog)
                .map_err(|e| CaptureError::Io(std::io::Error::other(e)))?;
            // SAFETY: the logger owns its ring's fd for as long as the
            // AsyncFd owns the logger, and always reports that same fd.
            Some(unsafe { AsyncFd::register(logger) }.map_err(|e| CaptureError::Io(e.into()))?)
        } else {
            None
        };
        Ok(Capture {
            ebpf,
            tracking,
            signals,
            cpus,
            unavailable,
            counters: None,
            prev: vec![Vec::new(); Counter::COUNT as usize],
            prev_second: vec![Vec::new(); Counter::COUNT as usize],
            started: std::time::Instant::now(),
            seconds: Vec::new(),
            stats_fd,
            logs,
            procs,
            startup,
        })
    }

    /// Where the start's time went.
    pub fn startup(&self) -> &Startup {
        &self.startup
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
        self.tracking.add_pid(pid)?;
        self.procs.observe(pid);
        Ok(())
    }

    /// Removes a process from the pid filter.
    pub fn remove_pid(&mut self, pid: u32) -> Result<(), CaptureError> {
        self.tracking.remove_pid(pid)
    }

    /// Waits until a signal's ring has records (or, when a signal's rings
    /// are written without wakeups, 20 ms).
    pub async fn events_ready(&self) -> std::io::Result<()> {
        let rings: Vec<&Ring> = std::iter::once(&self.tracking as &dyn Signal)
            .chain(self.signals.iter().map(|s| &**s))
            .flat_map(|s| s.rings())
            .collect();
        let polled = self.signals.iter().any(|s| s.polled());
        let logs = self.logs.as_ref();
        let mut timer = Box::pin(tokio::time::sleep(std::time::Duration::from_millis(20)));
        std::future::poll_fn(|cx| {
            for ring in &rings {
                if let Poll::Ready(guard) = ring.poll_read_ready(cx) {
                    guard?.clear_ready();
                    return Poll::Ready(Ok(()));
                }
            }
            if let Some(logs) = logs
                && let Poll::Ready(guard) = logs.poll_read_ready(cx)
            {
                guard?.clear_ready();
                return Poll::Ready(Ok(()));
            }
            if polled && Pin::new(&mut timer).poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            Poll::Pending
        })
        .await
    }

    /// Reads every signal's rings: the memory maps of newly announced
    /// processes first, then what the others sent.
    pub fn drain_events(&mut self) {
        if let Some(logs) = self.logs.as_mut() {
            logs.get_mut().flush();
        }
        self.tracking.drain(&mut self.procs);
        for s in &mut self.signals {
            s.drain(&mut self.procs);
        }
    }

    /// Moves what the kernel aggregates to userspace: call it a few times
    /// a second (the count map holds a key per stack and time slice).
    pub fn tick(&mut self) {
        for s in &mut self.signals {
            s.tick();
        }
    }

    /// The figures of the second since the last call (or the start):
    /// kept for the report's series, and returned for the status line.
    pub fn second(&mut self) -> Second {
        self.drain_events();
        self.tick();
        let mut row = Second {
            t: self.started.elapsed().as_secs_f64(),
            ..Default::default()
        };
        if self.counters.is_none() {
            self.counters = take_map(&mut self.ebpf, counters::COUNTERS).ok();
        }
        if let Some(map) = self.counters.as_ref() {
            let mut d =
                |c: Counter| delta(&mut self.prev_second[c as usize], per_cpu(map, c as u32));
            let sum = |v: Vec<u64>| v.iter().sum::<u64>();
            row.samples = sum(d(Counter::Samples));
            row.lost = sum(d(Counter::CountMapFull)) + sum(d(Counter::StackCopiesLost));
            let ticks = d(Counter::CpuTicks);
            let busy = d(Counter::CpuBusyTicks);
            row.cpu_busy = self
                .cpus
                .iter()
                .map(|&c| {
                    let (t, b) = (
                        ticks.get(c as usize).copied().unwrap_or(0),
                        busy.get(c as usize).copied().unwrap_or(0),
                    );
                    if t == 0 { 0.0 } else { b as f64 / t as f64 }
                })
                .collect();
            row.runq_wait_ms = sum(d(Counter::RunqLatencyTotalUs)) as f64 / 1000.0;
            row.retransmits = sum(d(Counter::Retransmits));
            row.oom_kills = sum(d(Counter::OomKills));
        }
        for s in &mut self.signals {
            s.second(&mut row);
        }
        for (pid, name, _) in &mut row.top {
            *name = self
                .procs
                .get(*pid)
                .map(|p| p.name.clone())
                .unwrap_or_default();
        }
        self.seconds.push(row.clone());
        row
    }

    /// Stops sampling (the maps keep what was recorded). The tracepoints
    /// stay attached until [`Capture::detach`]: unregistering one waits for
    /// an RCU grace period, about 0.1 s each, which [`Capture::collect`]
    /// need not wait for.
    pub fn stop(&mut self) -> Result<(), CaptureError> {
        let mut result = Ok(());
        for s in &mut self.signals {
            if let Err(e) = s.stop(&mut self.ebpf) {
                result = Err(e);
            }
        }
        // Processes and events announced just before the stop.
        self.drain_events();
        result
    }

    /// Detaches every program (after [`Capture::collect`]); returns what
    /// failed to detach.
    pub fn detach(&mut self) -> Vec<CaptureError> {
        let (closing, errors) = self.take_links();
        closing.finish();
        errors
    }

    /// Detaches every program for a process about to exit: the kernel's
    /// waits (an RCU grace period per tracepoint, serialized, about 1 s
    /// in all here) are left to a helper process
    /// ([`kernel::Closing::hand_off`]), so that the exit need not wait.
    pub fn detach_and_exit_soon(&mut self) -> Vec<CaptureError> {
        let (closing, errors) = self.take_links();
        closing.hand_off();
        errors
    }

    fn take_links(&mut self) -> (kernel::Closing, Vec<CaptureError>) {
        let mut closing = kernel::Closing::default();
        let mut errors = self.tracking.detach(&mut self.ebpf, &mut closing);
        for s in &mut self.signals {
            errors.extend(s.detach(&mut self.ebpf, &mut closing));
        }
        (closing, errors)
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
        // Samples already in the rings belong to this window.
        self.drain_events();
        let mut out = RawProfile {
            cpus: self.cpus.len(),
            cpu_ids: self.cpus.clone(),
            unavailable: self.unavailable.clone(),
            ..Default::default()
        };
        if self.counters.is_none() {
            self.counters = Some(take_map(&mut self.ebpf, counters::COUNTERS)?);
        }
        let map = self.counters.as_ref().expect("taken above");
        for c in Counter::ALL {
            let d = delta(&mut self.prev[c as usize], per_cpu(map, c as u32));
            out.counters.add(c, d.iter().sum());
            match c {
                Counter::CpuTicks => out.cpu_ticks = d,
                Counter::CpuBusyTicks => out.cpu_busy_ticks = d,
                _ => {}
            }
        }
        self.tracking.collect(&mut self.ebpf, &mut out, drain)?;
        out.seconds = std::mem::take(&mut self.seconds);
        for s in &mut self.signals {
            s.collect(&mut self.ebpf, &mut out, drain)?;
        }
        Ok(out)
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
            let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")) else {
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
        for s in &mut self.signals {
            s.forget(&gone);
        }
    }
}
