//! The capture stage: loads the eBPF object, attaches the stack sampler to
//! the cpu-clock of every online CPU, reads the memory maps of each process
//! when it is first sampled, and at the end drains the kernel maps into a
//! [`RawProfile`] of counted (process, user stack, kernel stack) keys.

use std::{collections::HashMap, fs};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf, StackTraceMap},
    programs::{
        PerfEvent, TracePoint,
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
        trace_point::TracePointLinkId,
    },
};
use profiler_common::{Counter, ProcessEvent, StackKey, names};
use tokio::io::unix::AsyncFd;

use crate::procs::ProcessTable;

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
    /// Kernel stack, leaf first.
    pub kernel: RawStackPart,
    /// Samples.
    pub count: u64,
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
}

impl RawProfile {
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
    }
}

/// A running capture.
pub struct Capture {
    ebpf: Ebpf,
    perf_links: Vec<PerfEventLinkId>,
    fork_link: Option<TracePointLinkId>,
    events: AsyncFd<RingBuf<MapData>>,
    pids: BpfHashMap<MapData, u32, u8>,
    cpus: Vec<u32>,
    /// Processes read while they lived.
    pub procs: ProcessTable,
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

/// Offset of `field` in a tracepoint's format file text.
pub fn tracepoint_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|l| {
        let l = l.trim();
        let decl = l.strip_prefix("field:")?.split(';').next()?;
        let name = decl.split_whitespace().last()?.split('[').next()?;
        if name != field {
            return None;
        }
        let off = l
            .split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))?;
        off.trim().parse().ok()
    })
}

impl Capture {
    /// Loads the programs and starts sampling.
    pub fn start(cfg: &CaptureConfig) -> Result<Self, CaptureError> {
        let cpus_text = fs::read_to_string("/sys/devices/system/cpu/online")
            .map_err(|e| CaptureError::Cpus(e.to_string()))?;
        let cpus = parse_cpu_list(&cpus_text)
            .ok_or_else(|| CaptureError::Cpus(format!("unparsable {cpus_text:?}")))?;

        let filter: u8 = cfg.filter.into();
        let follow: u8 = cfg.follow_forks.into();
        let fork_offset = fs::read_to_string(
            crate::preflight::TRACEFS.to_string() + "/events/sched/sched_process_fork/format",
        )
        .ok()
        .and_then(|f| tracepoint_field_offset(&f, "child_pid"))
        .unwrap_or(20);
        let mut ebpf = EbpfLoader::new()
            .override_global(names::GLOBAL_FILTER, &filter, true)
            .override_global(names::GLOBAL_FOLLOW_FORKS, &follow, true)
            .override_global("FORK_CHILD_PID_OFFSET", &fork_offset, true)
            .override_global(names::GLOBAL_REANNOUNCE_NS, &REANNOUNCE_NS, true)
            .map_max_entries(names::MAP_STACKS, cfg.stack_map_entries)
            .map_max_entries(names::MAP_COUNTS, cfg.count_map_entries)
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

        let mut procs = ProcessTable::new();
        for pid in &cfg.pids {
            procs.observe(*pid);
        }

        let mut fork_link = None;
        if cfg.follow_forks {
            let prog: &mut TracePoint = program(&mut ebpf, names::PROG_FORK)?;
            prog.load().map_err(|source| CaptureError::Program {
                what: "load the fork tracepoint program".into(),
                source,
            })?;
            fork_link = Some(
                prog.attach("sched", "sched_process_fork")
                    .map_err(|source| CaptureError::Program {
                        what: "attach to tracepoint sched:sched_process_fork".into(),
                        source,
                    })?,
            );
        }

        let prog: &mut PerfEvent = program(&mut ebpf, names::PROG_SAMPLE)?;
        prog.load().map_err(|source| CaptureError::Program {
            what: "load the sampling program".into(),
            source,
        })?;
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
                .map_err(|source| CaptureError::Program {
                    what: format!("attach the sampler to the cpu-clock of CPU {cpu}"),
                    source,
                })?;
            perf_links.push(link);
        }

        Ok(Capture {
            ebpf,
            perf_links,
            fork_link,
            events,
            pids,
            cpus,
            procs,
        })
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

    /// Waits until the kernel has announced new processes.
    pub async fn events_ready(&self) -> std::io::Result<()> {
        let mut guard = self.events.readable().await?;
        guard.clear_ready();
        Ok(())
    }

    /// Reads the memory maps of every newly announced process.
    pub fn drain_events(&mut self) {
        let mut new = Vec::new();
        let rb = self.events.get_mut();
        while let Some(item) = rb.next() {
            if item.len() >= std::mem::size_of::<ProcessEvent>() {
                // SAFETY: the kernel wrote a ProcessEvent (plain integers);
                // read_unaligned copes with any alignment.
                let ev: ProcessEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                new.push(ev.tgid);
            }
        }
        for pid in new {
            self.procs.observe(pid);
        }
    }

    /// Stops sampling (the maps keep what was recorded).
    pub fn stop(&mut self) {
        if let Ok(prog) = program::<PerfEvent>(&mut self.ebpf, names::PROG_SAMPLE) {
            for link in self.perf_links.drain(..) {
                let _ = prog.detach(link);
            }
        }
        if let Some(link) = self.fork_link.take()
            && let Ok(prog) = program::<TracePoint>(&mut self.ebpf, names::PROG_FORK)
        {
            let _ = prog.detach(link);
        }
        // Processes announced just before the stop.
        self.drain_events();
    }

    /// Drains the kernel maps (call after [`Capture::stop`]).
    pub fn collect(&mut self) -> Result<RawProfile, CaptureError> {
        let counts: PerCpuHashMap<MapData, StackKey, u64> =
            take_map(&mut self.ebpf, names::MAP_COUNTS)?;
        let stacks: StackTraceMap<MapData> = take_map(&mut self.ebpf, names::MAP_STACKS)?;
        let counters: PerCpuArray<MapData, u64> = take_map(&mut self.ebpf, names::MAP_COUNTERS)?;

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
            ..Default::default()
        };
        for item in counts.iter() {
            let Ok((key, per_cpu)) = item else { continue };
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
                kernel: resolve(key.kernel_stack_id),
                count,
            });
        }
        for c in Counter::ALL {
            let v = counters
                .get(&(c as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
            out.counters.insert(counter_name(c), v);
        }
        Ok(out)
    }
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
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,5,7-8\n"),
            Some(vec![0, 1, 2, 3, 5, 7, 8])
        );
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn tracepoint_offsets() {
        let fmt = "name: sched_process_fork\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(tracepoint_field_offset(fmt, "child_pid"), Some(20));
        assert_eq!(tracepoint_field_offset(fmt, "parent_comm"), Some(8));
        let old = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(tracepoint_field_offset(old, "child_pid"), Some(44));
        assert_eq!(tracepoint_field_offset(fmt, "nope"), None);
    }
}
