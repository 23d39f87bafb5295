//! Stack sampling, loader side: attaches the sampler to the cpu-clock of
//! every online CPU, unwinds the stack copies it sends (or aggregates the
//! collided frame-pointer stacks), and at each window reads the counted
//! stacks out of the kernel's maps. Kernel side:
//! `profiler-ebpf/src/stacks.rs`; shared types: `profiler_common::stacks`.

use super::kernel::Closing;
use std::collections::HashMap;

use aya::{
    Ebpf,
    maps::{MapData, StackTraceMap},
    programs::{
        PerfEvent,
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
    },
};
use profiler_common::counters::Counter;
use profiler_common::stacks::{
    self, SAMPLE_HEADER_BYTES, STACK_COPY_MAX, STACK_PAGE, StackKey, StackSample, TIME_SLICE_NS,
};

use super::{
    CaptureConfig, CaptureError, Setup, Signal,
    kernel::{
        Ring, drain_sums, possible_cpus, program, take_map, take_percpu_hash, take_ring,
        thread_size,
    },
};
use crate::{
    model::{RawProfile, RawStack, RawStackPart, Second, TimedSample},
    procs::ProcessTable,
    unwind::{UnwindMode, UserUnwinder},
};

/// The stack-sampling signal.
pub struct Stacks {
    frequency_hz: u64,
    perf_links: Vec<PerfEventLinkId>,
    samples: Option<Ring>,
    unwinder: Option<UserUnwinder>,
    /// One stack sample, reused: 64 KiB, too big for the stack and too
    /// big to allocate per sample.
    sample_buf: Box<StackSample>,
    maps: Option<(MapData, StackTraceMap<MapData>)>,
    /// What was moved out of the kernel's count map so far this window.
    counted: Counted,
    /// The monotonic clock's slice at the start: slices are counted from
    /// it.
    origin_slice: u32,
    /// The same, in ns (not wrapped).
    origin_ns: u64,
    /// Samples per process since the last [`Signal::second`].
    recent: HashMap<u32, u64>,
    /// Possible CPUs (the per-CPU values of a map), read once.
    ncpus: usize,
    /// Where the stack copies are also written, as received, for
    /// `profiler replay` (`record --save-samples`).
    saved: Option<std::io::BufWriter<std::fs::File>>,
}

/// The kernel's counts, moved to userspace as the capture goes (the map
/// holds one entry per stack and time slice: it is emptied every
/// [`Stacks::tick`], a few system calls each).
#[derive(Default)]
struct Counted {
    /// Key (its slice zeroed) -> index in `stacks`.
    index: HashMap<StackKey, u32>,
    /// Distinct stacks and their samples.
    stacks: Vec<(StackKey, u64)>,
    /// (slice from the origin, index) -> samples.
    slices: HashMap<(u32, u32), u32>,
    /// Most distinct stacks (`--max-stacks`, the kernel map's bound).
    limit: usize,
    /// Samples of stacks past `limit`: lost as the kernel map's are.
    dropped: u64,
}

impl Stacks {
    /// The signal, for a capture configured as `cfg`.
    pub fn new(cfg: &CaptureConfig) -> Self {
        Stacks {
            frequency_hz: cfg.frequency_hz,
            perf_links: Vec::new(),
            samples: None,
            unwinder: None,
            // SAFETY: StackSample is plain integers and bytes; all zeroes
            // is a valid value.
            sample_buf: unsafe { Box::new_zeroed().assume_init() },
            maps: None,
            counted: Counted {
                limit: cfg.count_map_entries as usize,
                ..Counted::default()
            },
            origin_ns: super::kernel::monotonic_ns() / TIME_SLICE_NS * TIME_SLICE_NS,
            origin_slice: (super::kernel::monotonic_ns() / TIME_SLICE_NS) as u32,
            recent: HashMap::new(),
            ncpus: possible_cpus() as usize,
            saved: cfg.save_samples.as_ref().and_then(|p| {
                std::fs::File::create(p)
                    .map_err(|e| eprintln!("profiler: warning: {}: {e}", p.display()))
                    .ok()
                    .map(std::io::BufWriter::new)
            }),
        }
    }
}

/// Ring buffer bytes for stack copies: half a second of samples at the
/// configured rate on every CPU, a power of two between 1 and 64 MiB. A
/// record carries the stack from sp to its top (2 to 8 KiB for most
/// threads; deeper ones up to `stack_bytes`), so 8 KiB a sample is
/// reckoned: the ring's pages are resident once written around, and a
/// bigger reckoning costs the profiler's RSS more than it saves. Half a
/// second covers the first look at a big binary's CFI; copies that find
/// the ring full are counted (`stack_copies_lost`).
/// Copies one ring record (a header and the stack bytes the kernel
/// sent) into `sample`, its length bounded by what arrived; returns the
/// bytes copied. The caller checks the record holds a header.
pub(crate) fn read_record(sample: &mut StackSample, item: &[u8]) -> usize {
    let n = item.len().min(std::mem::size_of::<StackSample>());
    // SAFETY: copies n <= size_of::<StackSample>() bytes of plain
    // integers into it.
    unsafe {
        std::ptr::copy_nonoverlapping(item.as_ptr(), (sample as *mut StackSample).cast::<u8>(), n)
    };
    sample.len = sample.len.min((n - SAMPLE_HEADER_BYTES) as u32);
    n
}

/// The stack ring of a default capture (`--unwind auto`, whole copies).
#[cfg(test)]
pub(super) fn ring_bytes_for(hz: u64, cpus: usize) -> u32 {
    stack_ring_bytes(hz, cpus, profiler_common::stacks::STACK_COPY_MAX as u32)
}

/// A quarter second of copies (read every 20 ms, and at each tick): the
/// ring's pages count twice in the profiler's RSS (its data is mapped
/// twice, for records that wrap), so it is no larger than that.
fn stack_ring_bytes(hz: u64, cpus: usize, stack_bytes: u32) -> u32 {
    let record = u64::from(stack_bytes.min(8192)) + 128;
    let want = hz * cpus as u64 * record / 4;
    want.clamp(1 << 20, 64 << 20)
        .next_power_of_two()
        .min(64 << 20) as u32
}

impl Signal for Stacks {
    fn configure(&mut self, setup: &mut Setup<'_>) {
        let cfg = setup.cfg;
        let c = &mut setup.config;
        c.take_stacks = cfg.stacks.into();
        c.copy_stacks = (cfg.stacks && cfg.unwind != UnwindMode::Fp).into();
        c.stack_pages =
            (cfg.stack_bytes as usize / STACK_PAGE).clamp(1, STACK_COPY_MAX / STACK_PAGE) as u8;
        c.send_collided = (cfg.stacks && cfg.unwind == UnwindMode::Fp).into();
        c.thread_size = thread_size();
        if c.copy_stacks != 0
            && let Ok(btf) = setup.btf
            && let Some((off, _)) = crate::kbtf::member_offset(btf, "task_struct", "stack")
        {
            c.task_stack = off;
        }
        if c.copy_stacks != 0
            && let Ok(btf) = setup.btf
            && let Some((mm, _)) = crate::kbtf::member_offset(btf, "task_struct", "mm")
            && let Some((start, _)) = crate::kbtf::member_offset(btf, "mm_struct", "start_stack")
        {
            c.task_mm = mm;
            c.mm_start_stack = start;
        }
        let (copy, collided) = (c.copy_stacks != 0, c.send_collided != 0);
        let cpus = setup.cpus.len();
        let host = setup.host();
        let sizes = &mut setup.sizes;
        sizes.push((
            stacks::STACKS,
            if cfg.stacks {
                cfg.stack_map_entries.min(host.stack_map())
            } else {
                1
            },
        ));
        sizes.push((
            stacks::COUNTS,
            if cfg.stacks {
                cfg.count_map_entries.min(host.count_map())
            } else {
                1
            },
        ));
        sizes.push((
            stacks::SCRATCH,
            if copy || collided { possible_cpus() } else { 1 },
        ));
        sizes.push((
            stacks::STACK_SAMPLES,
            if copy {
                stack_ring_bytes(cfg.frequency_hz, cpus, cfg.stack_bytes)
            } else if collided {
                // Collided frame-pointer stacks: addresses, 1 KiB at most.
                stack_ring_bytes(cfg.frequency_hz, cpus, 1024)
            } else {
                4096
            },
        ));
        // Copied stacks are unwound in userspace; with --unwind fp, stacks
        // that collided in the stack map arrive as addresses and are
        // aggregated the same way.
        self.unwinder = (copy || collided).then(|| {
            let mut u = UserUnwinder::new();
            if !copy {
                u.max_stacks = Some(cfg.count_map_entries as usize);
            }
            u
        });
    }

    fn attach(&mut self, ebpf: &mut Ebpf, setup: &mut Setup<'_>) -> Result<(), CaptureError> {
        self.samples = Some(take_ring(ebpf, stacks::STACK_SAMPLES)?);
        self.maps = Some((
            take_percpu_hash(ebpf, stacks::COUNTS)?,
            take_map(ebpf, stacks::STACKS)?,
        ));
        self.origin_ns = super::kernel::monotonic_ns() / TIME_SLICE_NS * TIME_SLICE_NS;
        self.origin_slice = (self.origin_ns / TIME_SLICE_NS) as u32;
        let prog: &mut PerfEvent = program(ebpf, stacks::PROG_SAMPLE)?;
        let t = std::time::Instant::now();
        let loaded = prog.load();
        setup.verifying += t.elapsed();
        loaded.map_err(|source| CaptureError::Program {
            what: "load the sampling program".into(),
            source,
        })?;
        // cpu-clock counts nanoseconds: a fixed period gives exactly
        // `frequency_hz` samples per second per CPU, with no ramp-up.
        let period = (1_000_000_000 / self.frequency_hz.max(1)).max(1);
        for &cpu in setup.cpus {
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
            self.perf_links.push(link);
        }
        Ok(())
    }

    fn rings(&self) -> Vec<&Ring> {
        self.samples.iter().collect()
    }

    /// Stack samples are sent without wakeups.
    fn polled(&self) -> bool {
        self.unwinder.is_some()
    }

    fn drain(&mut self, procs: &mut ProcessTable) {
        let (Some(unwinder), Some(ring)) = (self.unwinder.as_mut(), self.samples.as_mut()) else {
            return;
        };
        let rb = ring.get_mut();
        while let Some(item) = rb.next() {
            if item.len() < SAMPLE_HEADER_BYTES {
                continue;
            }
            // The kernel sends the header and only the pages it copied:
            // the rest of the record stays zero.
            let sample = &mut self.sample_buf;
            let n = read_record(sample, &item);
            if let Some(w) = self.saved.as_mut() {
                use std::io::Write;
                let written = w
                    .write_all(&(n as u32).to_le_bytes())
                    .and_then(|()| w.write_all(&item[..n]));
                if let Err(e) = written {
                    eprintln!("profiler: warning: saving stack samples: {e}");
                    self.saved = None;
                }
            }
            if sample.tgid != 0 {
                *self.recent.entry(sample.tgid).or_default() += 1;
            }
            unwinder.add(sample, procs);
        }
    }

    fn stop(&mut self, ebpf: &mut Ebpf) -> Result<(), CaptureError> {
        let prog: &mut PerfEvent = program(ebpf, stacks::PROG_SAMPLE)?;
        let mut result = Ok(());
        for link in self.perf_links.drain(..) {
            if let Err(source) = prog.detach(link) {
                result = Err(CaptureError::Program {
                    what: "detach the sampler from a CPU's cpu-clock".into(),
                    source,
                });
            }
        }
        result
    }

    /// Moves the kernel's counts to userspace: the count map holds a
    /// key per stack and time slice, and is emptied here often enough
    /// that it does not fill.
    fn tick(&mut self) {
        let Some((counts, _)) = self.maps.as_ref() else {
            return;
        };
        let origin = self.origin_slice;
        let c = &mut self.counted;
        let recent = &mut self.recent;
        let moved = drain_sums(counts, self.ncpus, |key: StackKey, n| {
            if n == 0 {
                return;
            }
            let slice = key.slice.wrapping_sub(origin);
            let plain = StackKey { slice: 0, ..key };
            let id = match c.index.get(&plain) {
                Some(&id) => id,
                None if c.stacks.len() < c.limit => {
                    c.stacks.push((plain, 0));
                    let id = (c.stacks.len() - 1) as u32;
                    c.index.insert(plain, id);
                    id
                }
                None => {
                    c.dropped += n;
                    return;
                }
            };
            c.stacks[id as usize].1 += n;
            *c.slices.entry((slice, id)).or_default() += n as u32;
            if key.tgid != 0 {
                *recent.entry(key.tgid).or_default() += n;
            }
        });
        if let Err(e) = moved {
            eprintln!("profiler: warning: cannot read the kernel's stack counts: {e}");
        }
    }

    fn second(&mut self, row: &mut Second) {
        let mut top: Vec<(u32, u64)> = std::mem::take(&mut self.recent).into_iter().collect();
        top.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        top.truncate(3);
        row.top = top
            .into_iter()
            .map(|(p, n)| (p, String::new(), n))
            .collect();
    }

    fn collect(
        &mut self,
        _ebpf: &mut Ebpf,
        out: &mut RawProfile,
        drain: bool,
    ) -> Result<(), CaptureError> {
        self.tick();
        if let Some(w) = self.saved.as_mut() {
            use std::io::Write;
            if let Err(e) = w.flush() {
                eprintln!("profiler: warning: saving stack samples: {e}");
            }
        }
        out.time_origin_ns = self.origin_ns;
        let Some((_, stack_map)) = self.maps.as_mut() else {
            return Ok(());
        };
        let mut cache: HashMap<i32, RawStackPart> = HashMap::new();
        let mut resolve = |id: i32| -> RawStackPart {
            if id < 0 {
                return Err(id);
            }
            cache
                .entry(id)
                .or_insert_with(|| match stack_map.get(&(id as u32), 0) {
                    Ok(trace) => Ok(trace.frames().iter().map(|f| f.ip).collect()),
                    Err(_) => Err(-libc::ENOENT), // the stack was overwritten
                })
                .clone()
        };
        // Stacks are numbered in the order they are pushed; those with no
        // sample are kept (empty) so that the numbers hold.
        let base = out.stacks.len() as u32;
        for (key, count) in &self.counted.stacks {
            let thread = String::from_utf8_lossy(key.comm.split(|b| *b == 0).next().unwrap_or(&[]))
                .into_owned();
            out.stacks.push(RawStack {
                tgid: key.tgid,
                thread,
                user: resolve(key.user_stack_id),
                user_cut: None,
                kernel: resolve(key.kernel_stack_id),
                count: *count,
            });
        }
        out.stack_times.extend(
            self.counted
                .slices
                .iter()
                .map(|(&(slice, id), &n)| (slice, base + id, n)),
        );
        out.counters
            .add(Counter::CountMapFull, self.counted.dropped);
        self.counted.dropped = 0;
        if drain {
            self.counted = Counted {
                limit: self.counted.limit,
                ..Counted::default()
            };
        }
        if let Some(unwinder) = self.unwinder.as_mut() {
            for (tid, time_ns, key) in unwinder.take_timed() {
                out.turn_samples.push(TimedSample {
                    tid,
                    time_ns,
                    stack: {
                        let kernel = resolve(key.kernel_stack_id);
                        key.into_raw(kernel, 1)
                    },
                });
            }
            let (window, stats) = unwinder.take_window();
            out.unwind = Some(stats);
            let base = out.stacks.len() as u32;
            let origin = self.origin_slice;
            out.stack_times.extend(
                window
                    .slices
                    .iter()
                    .map(|&(slice, id, n)| (slice.wrapping_sub(origin), base + id, n)),
            );
            for (key, count) in window.stacks {
                let kernel = resolve(key.kernel_stack_id);
                out.stacks.push(key.into_raw(kernel, count));
            }
        }
        if drain {
            // A stack gone already is what this removal wanted.
            let ids: Vec<u32> = stack_map.stack_ids().filter_map(Result::ok).collect();
            for id in ids {
                let _ = stack_map.remove(&id);
            }
        }
        Ok(())
    }

    fn forget(&mut self, gone: &[u32]) {
        if let Some(u) = self.unwinder.as_mut() {
            u.forget(gone);
        }
    }

    fn detach(&mut self, ebpf: &mut Ebpf, _closing: &mut Closing) -> Vec<CaptureError> {
        // Normally stopped already; a capture that ended in an error
        // stops here.
        self.stop(ebpf).err().into_iter().collect()
    }
}
