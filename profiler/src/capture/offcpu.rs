//! Off-CPU time, loader side: the switch and wakeup programs (sched_switch
//! and sched_wakeup layouts from tracefs; the task's kernel stack and its
//! CFS group's throttle count from BTF), and at each window the summed
//! keys with their stacks. Kernel side: `profiler-ebpf/src/offcpu.rs`;
//! shared types: `profiler_common::offcpu`.

use super::kernel::Closing;
use std::collections::HashMap;

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, StackTraceMap},
};
use profiler_common::{
    offcpu::{self, CachedStacks, OffKey, OffStart, OffSumKey, OffValue, SHORT, SwitchSite, class},
    stacks::slices_of,
};

use super::{
    CaptureError, Setup, Signal,
    kernel::{
        Ring, Tracepoints, batch_read, drain_ring, monotonic_ns, possible_cpus, take_map,
        take_percpu_hash, take_ring, thread_size,
    },
};
use crate::{
    model::{MAX_OFFCPU_SPANS, OffCpuStack, RawProfile, RawStack, RawStackPart, Second, TurnBlock},
    procs::ProcessTable,
    tracefs::{Format, switch_runnable_mask},
};

/// The signal's name where it is reported unavailable.
const OFFCPU: &str = "offcpu";
/// Telling throttled waits from other waits for a CPU.
const THROTTLED: &str = crate::offcpu::THROTTLED_SIGNAL;

/// The off-CPU signal.
#[derive(Default)]
pub struct OffCpu {
    on: bool,
    /// Blocks shorter than this (ns) are summed without their stacks.
    min_ns: u64,
    tracepoints: Tracepoints,
    maps: Option<Maps>,
    /// Blocks inside event-loop turns.
    turn_ring: Option<Ring>,
    turn_blocks: Vec<profiler_common::offcpu::TurnBlock>,
    /// What the kernel summed, moved here at each tick.
    sums: HashMap<OffKey, KeySum>,
    /// Intervals in `sums`, bounded by [`MAX_OFFCPU_SPANS`].
    spans: usize,
    /// Nanoseconds per (class, syscall, detail) of the blocks that ended
    /// since the last second.
    second_ns: HashMap<(u8, i32, u8), u64>,
    /// Possible CPUs (the per-CPU values of a map), read at attach.
    ncpus: usize,
}

/// One key's time away: nanoseconds, blocks, and when
/// ([`OffCpuStack::spans`]).
#[derive(Clone, Default)]
struct KeySum {
    ns: u64,
    blocks: u64,
    spans: Vec<[u32; 3]>,
}

impl KeySum {
    /// Adds `[from, to)` (ktime ns) away, one block; its interval kept
    /// while `spans` allows.
    fn add_interval(&mut self, from: u64, to: u64, spans: &mut usize) {
        let ns = to.saturating_sub(from);
        if ns == 0 {
            return;
        }
        let (first, last) = slices_of(from, to);
        self.add(first, last, ns, 1, spans);
    }

    /// Adds `ns` away in `blocks` blocks over slices `first..=last`.
    fn add(&mut self, first: u32, last: u32, ns: u64, blocks: u64, spans: &mut usize) {
        self.ns += ns;
        self.blocks += blocks;
        if *spans < MAX_OFFCPU_SPANS {
            let us = ns.div_ceil(1000).min(u64::from(u32::MAX)) as u32;
            self.spans.push([first, last, us]);
            *spans += 1;
        }
    }
}

/// Most blocks inside loop turns kept per window.
const MAX_TURN_BLOCKS: usize = 400_000;

struct Maps {
    /// [`offcpu::OFFCPU_COUNTS`], emptied in batches at each tick.
    counts: MapData,
    stacks: StackTraceMap<MapData>,
    start: BpfHashMap<MapData, u32, OffStart>,
    cache: BpfHashMap<MapData, SwitchSite, CachedStacks>,
}

impl Signal for OffCpu {
    fn configure(&mut self, setup: &mut Setup<'_>) {
        let cfg = setup.cfg;
        self.on = cfg.offcpu;
        self.min_ns = cfg.offcpu_min_ns;
        // Sized for the host (shrunk to nothing just below when off).
        let host = setup.host();
        setup
            .sizes
            .push((offcpu::OFFCPU_STACKS, host.offcpu_stack_map()));
        setup
            .sizes
            .push((offcpu::OFFCPU_COUNTS, host.offcpu_counts()));
        setup.sizes.push((offcpu::OFFCPU_START, host.thread_map()));
        if !self.on {
            for def in [
                offcpu::OFFCPU_STACKS,
                offcpu::OFFCPU_START,
                offcpu::OFFCPU_COUNTS,
                offcpu::STACK_CACHE,
            ] {
                setup.sizes.push((def, 1));
            }
            return;
        }
        match (
            Format::read("sched", "sched_switch"),
            Format::read("sched", "sched_wakeup"),
        ) {
            (Ok(sw), Ok(wk)) => {
                let c = &mut setup.config;
                c.switch_prev_state = sw.offset_or_none("prev_state");
                c.switch_next_pid = sw.offset_or_none("next_pid");
                c.switch_runnable_mask = switch_runnable_mask(&sw.print_fmt);
                c.wakeup_pid = wk.offset_or_none("pid");
            }
            (Err(e), _) | (_, Err(e)) => {
                setup.unavailable(OFFCPU, e);
                self.on = false;
                return;
            }
        }
        let btf = match setup.btf {
            Ok(btf) => btf,
            Err(e) => {
                setup.unavailable(
                    OFFCPU,
                    format!("{e}: the syscall a thread waits in cannot be read"),
                );
                self.on = false;
                return;
            }
        };
        let Some((stack, _)) = crate::kbtf::member_offset(btf, "task_struct", "stack") else {
            setup.unavailable(
                OFFCPU,
                "the kernel's BTF has no task_struct.stack: a thread's syscall cannot be read",
            );
            self.on = false;
            return;
        };
        let c = &mut setup.config;
        c.offcpu = 1;
        c.offcpu_min_ns = cfg.offcpu_min_ns;
        c.task_stack = stack;
        c.thread_size = thread_size();
        // Throttling: the task's cfs_rq (se.cfs_rq) and its throttle count.
        let throttle = crate::kbtf::depth_offsets(btf)
            .map_err(|e| e.to_string())
            .and_then(|d| {
                crate::kbtf::member_offset(btf, "cfs_rq", "throttle_count")
                    .map(|(off, _)| (d.task_cfs_rq, off))
                    .ok_or_else(|| {
                        "the kernel's BTF has no cfs_rq.throttle_count (built without CONFIG_CFS_BANDWIDTH)".to_string()
                    })
            });
        match throttle {
            Ok((task_cfs_rq, count)) => {
                c.task_cfs_rq = task_cfs_rq;
                c.cfs_rq_throttle_count = count;
            }
            Err(reason) => setup.unavailable(
                THROTTLED,
                format!("{reason}: waits of throttled threads are counted under cpu"),
            ),
        }
    }

    fn attach(&mut self, ebpf: &mut Ebpf, setup: &mut Setup<'_>) -> Result<(), CaptureError> {
        if !self.on {
            return Ok(());
        }
        let wakeups = [("sched", "sched_wakeup"), ("sched", "sched_wakeup_new")];
        let switch = [("sched", "sched_switch")];
        if !self
            .tracepoints
            .attach(ebpf, setup, OFFCPU, offcpu::PROG_WAKEUP, &wakeups, &[])?
            || !self
                .tracepoints
                .attach(ebpf, setup, OFFCPU, offcpu::PROG_SWITCH, &switch, &[])?
        {
            self.on = false;
            return Ok(());
        }
        self.turn_ring = Some(take_ring(ebpf, offcpu::LOOP_BLOCKS)?);
        self.ncpus = possible_cpus() as usize;
        self.maps = Some(Maps {
            counts: take_percpu_hash(ebpf, offcpu::OFFCPU_COUNTS)?,
            stacks: take_map(ebpf, offcpu::OFFCPU_STACKS)?,
            start: take_map(ebpf, offcpu::OFFCPU_START)?,
            cache: take_map(ebpf, offcpu::STACK_CACHE)?,
        });
        Ok(())
    }

    /// The turn blocks' ring is written without wakeups (from
    /// sched_switch, a wakeup woke our own thread into more switches): read
    /// on the timer.
    fn polled(&self) -> bool {
        self.turn_ring.is_some()
    }

    /// Moves the kernel's sums to userspace: the count map holds a key
    /// per stack and span of time slices, and is emptied here (a few
    /// system calls for the whole map) often enough that it does not
    /// fill.
    fn tick(&mut self) {
        let Some(maps) = self.maps.as_ref() else {
            return;
        };
        let (sums, second, spans) = (&mut self.sums, &mut self.second_ns, &mut self.spans);
        let moved = batch_read(
            &maps.counts,
            self.ncpus,
            true,
            |k: OffSumKey, v: &[OffValue]| {
                let (ns, blocks) = v.iter().fold((0, 0), |a, x| (a.0 + x.ns, a.1 + x.count));
                if ns == 0 {
                    return;
                }
                let key = k.key;
                sums.entry(key)
                    .or_default()
                    .add(k.first, k.last, ns, blocks, spans);
                *second
                    .entry((key.class, key.syscall, key.detail))
                    .or_default() += ns;
            },
        );
        if let Err(e) = moved {
            eprintln!("profiler: warning: cannot read the kernel's off-CPU sums: {e}");
        }
    }

    /// The time off the CPU of the blocks that ended in the second, by
    /// class, syscall and detail.
    fn second(&mut self, row: &mut Second) {
        for ((class, syscall, detail), ns) in self.second_ns.drain() {
            row.offcpu.push((class, syscall, detail, ns));
        }
    }

    fn drain(&mut self, _procs: &mut ProcessTable) {
        let Some(ring) = self.turn_ring.as_mut() else {
            return;
        };
        let blocks = &mut self.turn_blocks;
        drain_ring(ring, |b: profiler_common::offcpu::TurnBlock| {
            if blocks.len() < MAX_TURN_BLOCKS {
                blocks.push(b);
            }
        });
    }

    fn collect(
        &mut self,
        _ebpf: &mut Ebpf,
        out: &mut RawProfile,
        drain: bool,
    ) -> Result<(), CaptureError> {
        self.tick();
        let Some(maps) = self.maps.as_mut() else {
            return Ok(());
        };
        out.offcpu_on = true;
        let stack_map = &maps.stacks;
        let mut cache: HashMap<i32, RawStackPart> = HashMap::new();
        let mut resolve = |id: i32| -> RawStackPart {
            if id == offcpu::NOT_WALKED {
                return Ok(Vec::new());
            }
            if id < 0 {
                return Err(id);
            }
            cache
                .entry(id)
                .or_insert_with(|| match stack_map.get(&(id as u32), 0) {
                    Ok(trace) => Ok(trace.frames().iter().map(|f| f.ip).collect()),
                    Err(_) => Err(-libc::ENOENT),
                })
                .clone()
        };
        for b in std::mem::take(&mut self.turn_blocks) {
            let k = b.key;
            let thread = String::from_utf8_lossy(k.comm.split(|c| *c == 0).next().unwrap_or(&[]))
                .into_owned();
            out.turn_blocks.push(TurnBlock {
                tid: b.tid,
                start_ns: b.start_ns,
                woken_ns: b.woken_ns,
                end_ns: b.end_ns,
                block: OffCpuStack {
                    stack: RawStack {
                        tgid: k.tgid,
                        thread,
                        user: resolve(k.user_stack_id),
                        user_cut: None,
                        kernel: resolve(k.kernel_stack_id),
                        count: 1,
                    },
                    ns: b.end_ns.saturating_sub(b.start_ns),
                    class: k.class,
                    syscall: k.syscall,
                    detail: k.detail,
                    short: false,
                    spans: Vec::new(),
                },
            });
        }
        let mut spans = self.spans;
        let mut sums = if drain {
            self.spans = 0;
            std::mem::take(&mut self.sums)
        } else {
            self.sums.clone()
        };
        // Threads off the CPU now (an idle loop in epoll_wait, a long
        // sleep): their time so far belongs to this window. With `drain`
        // their start moves to now, so that the next window counts the
        // rest; a thread that returns between the read and the move is
        // counted twice for that instant.
        let now = monotonic_ns();
        let mut restart = Vec::new();
        let away: Vec<(u32, OffStart)> = maps.start.iter().filter_map(Result::ok).collect();
        for (tid, s) in away {
            // Gone: it exited, without returning.
            if crate::procs::Stat::read(tid).is_none_or(|st| st.exited()) {
                let _ = maps.start.remove(&tid);
                continue;
            }
            let mut key = s.key;
            let total = now.saturating_sub(s.start_ns);
            if total < self.min_ns {
                key.user_stack_id = SHORT;
            }
            let blocked = matches!(key.class, class::SLEEPING | class::UNINTERRUPTIBLE);
            if blocked && s.woken_ns >= s.start_ns && s.woken_ns <= now {
                sums.entry(key)
                    .or_default()
                    .add_interval(s.start_ns, s.woken_ns, &mut spans);
                key.class = class::WOKEN_WAITING;
                let e = sums.entry(key).or_default();
                e.add_interval(s.woken_ns, now, &mut spans);
                // The wait after the wakeup is the same block.
                e.blocks = e.blocks.saturating_sub(1);
            } else {
                sums.entry(key)
                    .or_default()
                    .add_interval(s.start_ns, now, &mut spans);
            }
            restart.push((tid, s));
        }
        for (key, sum) in sums {
            let KeySum { ns, blocks, spans } = sum;
            if ns == 0 {
                continue;
            }
            let short = key.user_stack_id == SHORT;
            let thread = String::from_utf8_lossy(key.comm.split(|b| *b == 0).next().unwrap_or(&[]))
                .into_owned();
            out.offcpu.push(OffCpuStack {
                stack: RawStack {
                    tgid: key.tgid,
                    thread,
                    // A short block's user stack is not kept: no frames.
                    user: if short {
                        Err(-libc::EFAULT)
                    } else {
                        resolve(key.user_stack_id)
                    },
                    user_cut: None,
                    kernel: resolve(key.kernel_stack_id),
                    count: blocks,
                },
                ns,
                class: key.class,
                syscall: key.syscall,
                detail: key.detail,
                short,
                spans,
            });
        }
        if drain {
            // The stacks of threads off the CPU now are still wanted when
            // they return: only keys and stacks no start refers to go.
            let mut live = std::collections::HashSet::new();
            for (_, s) in maps.start.iter().filter_map(Result::ok) {
                live.insert(s.key.user_stack_id);
                live.insert(s.key.kernel_stack_id);
            }
            // Stacks the caches still hand out.
            for (_, c) in maps.cache.iter().filter_map(Result::ok) {
                live.insert(c.user_stack_id);
                live.insert(c.kernel_stack_id);
            }
            let ids: Vec<u32> = maps.stacks.stack_ids().filter_map(Result::ok).collect();
            for id in ids.into_iter().filter(|id| !live.contains(&(*id as i32))) {
                let _ = maps.stacks.remove(&id);
            }
            // BPF_EXIST: only where the thread is still away.
            const BPF_EXIST: u64 = 2;
            for (tid, mut s) in restart {
                s.start_ns = now;
                if s.woken_ns != 0 {
                    s.woken_ns = now;
                }
                let _ = maps.start.insert(tid, s, BPF_EXIST);
            }
        }
        Ok(())
    }

    fn detach(&mut self, ebpf: &mut Ebpf, closing: &mut Closing) -> Vec<CaptureError> {
        self.tracepoints.detach(ebpf, closing)
    }
}
