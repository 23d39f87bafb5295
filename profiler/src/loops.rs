//! Event-loop analysis: per loop thread its turns (count, percentiles of
//! the kernel's histogram) and stalls (turns at least the threshold long:
//! when, how long, how much on the CPU and how much off it, by cause, and
//! their top frames), and `stalls.folded`: every CPU sample and off-CPU
//! block taken inside a stall, in microseconds, the flame graph of what
//! blocked the loops.

use std::collections::{BTreeMap, HashMap};

use profiler_common::loops::{TURN_SLOTS, slot_upper_us};
use serde::Serialize;

use crate::{
    containers::{Attributor, group_of},
    fold::{self, Folded},
    model::{Frame, FrameKind, RawProfile, RawStack, SymbolizedStack},
    offcpu::{Cause, classify},
    procs::ProcessTable,
    symbolize::{Symbolizer, symbol_tables_with, symbolize_stack},
    usereport::Clock,
};

/// Most loop threads listed in use.json (those with stalls first).
pub const MAX_LOOPS_LISTED: usize = 50;
/// Longest stalls listed per loop.
pub const WORST_LISTED: usize = 5;

/// A histogram bucket.
#[derive(Clone, Debug, Serialize)]
pub struct TurnBucket {
    /// Upper bound, milliseconds.
    pub le_ms: f64,
    /// Turns.
    pub count: u64,
}

/// Turn durations of one loop, in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct TurnMs {
    /// Median (upper bound of its bucket: within 25%).
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Longest, exact.
    pub max: f64,
    /// The non-empty buckets.
    pub histogram: Vec<TurnBucket>,
}

/// A frame's share of a stall.
#[derive(Clone, Debug, Serialize)]
pub struct TopFrame {
    /// The frame (the leaf-most user frame of the samples and blocks).
    pub frame: String,
    /// Share of the stall's sampled and blocked time.
    pub share: f64,
}

/// One stall.
#[derive(Clone, Debug, Serialize)]
pub struct StallReport {
    /// When it started (UTC).
    pub start: String,
    /// How long the loop answered nothing.
    pub duration_ms: f64,
    /// Of which on the CPU.
    pub on_cpu_ms: f64,
    /// Of which off it, by cause.
    pub off_cpu_ms: BTreeMap<&'static str, f64>,
    /// The frames it spent most in.
    pub top_frames: Vec<TopFrame>,
    /// Still going when the capture ended.
    pub ongoing: bool,
}

/// One loop thread.
#[derive(Clone, Debug, Serialize)]
pub struct LoopReport {
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// Container, or `host`.
    pub container: String,
    /// Turns ended.
    pub turns: u64,
    /// Their durations.
    pub turn_ms: TurnMs,
    /// Stalls (turns at least the threshold long, an ongoing one included).
    pub stalls: u64,
    /// Seconds in stalls.
    pub stalled_s: f64,
    /// The longest stalls, longest first.
    pub worst: Vec<StallReport>,
}

/// use.json's `event_loops`.
#[derive(Clone, Debug, Serialize)]
pub struct EventLoops {
    /// `--stall-threshold`, milliseconds.
    pub stall_threshold_ms: f64,
    /// Loop threads seen (also those not listed).
    pub threads: usize,
    /// The loops: those with stalls first (worst first), then the busiest.
    pub loops: Vec<LoopReport>,
}

/// The stage's result.
pub struct LoopsAnalysis {
    /// What was on the CPU and off it inside stalls, microseconds.
    pub folded: Folded,
    /// Each stack of `folded` as it happened: `(line, from_ns, to_ns,
    /// us)`, ktime ns (a sample: its instant).
    pub timed: Vec<(String, u64, u64, u64)>,
    /// For use.json.
    pub summary: EventLoops,
}

fn quantile_ms(hist: &[u32], q: f64) -> f64 {
    let total: u64 = hist.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return 0.0;
    }
    let target = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, &c) in hist.iter().enumerate() {
        seen += u64::from(c);
        if seen >= target {
            return slot_upper_us(i as u32) as f64 / 1000.0;
        }
    }
    slot_upper_us(TURN_SLOTS - 1) as f64 / 1000.0
}

/// A stall's off-CPU milliseconds by cause, and microseconds per leaf
/// frame.
type StallParts = (BTreeMap<&'static str, f64>, HashMap<String, u64>);

struct StallAt {
    start_ns: u64,
    end_ns: u64,
    ongoing: bool,
}

/// Microseconds of [a, b) inside [s, e).
fn overlap_us(a: u64, b: u64, s: u64, e: u64) -> u64 {
    b.min(e).saturating_sub(a.max(s)) / 1000
}

/// Analyses the loops of a capture (those of `exclude` left out); `now_ns`
/// is when it was collected (ongoing stalls end there), `hz` the sampling
/// rate (a CPU sample stands for 1/hz s).
#[allow(clippy::too_many_arguments)]
pub fn analyze(
    raw: &RawProfile,
    procs: &ProcessTable,
    sym: &mut Symbolizer,
    exclude: Option<u32>,
    attributor: &mut Attributor,
    group_by_container: bool,
    stall_ns: u64,
    now_ns: u64,
    hz: u64,
    clock: &Clock,
) -> LoopsAnalysis {
    let sample_us = 1_000_000 / hz.max(1);
    // The stalls of each thread, in time order.
    let mut stalls: HashMap<u32, Vec<StallAt>> = HashMap::new();
    for s in &raw.stalls {
        stalls.entry(s.tid).or_default().push(StallAt {
            start_ns: s.start_ns,
            end_ns: s.end_ns,
            ongoing: false,
        });
    }
    for l in &raw.loops {
        let t = &l.turns;
        if t.in_turn != 0 && now_ns.saturating_sub(t.turn_start) >= stall_ns {
            stalls.entry(l.tid).or_default().push(StallAt {
                start_ns: t.turn_start,
                end_ns: now_ns,
                ongoing: true,
            });
        }
    }
    for v in stalls.values_mut() {
        v.sort_by_key(|s| s.start_ns);
    }
    let find = |tid: u32, a: u64| -> Option<usize> {
        let v = stalls.get(&tid)?;
        let i = v.partition_point(|s| s.start_ns <= a);
        (i > 0 && a < v[i - 1].end_ns).then(|| i - 1)
    };

    // What happened inside each stall: (tid, stall index) -> stacks.
    struct Inside<'a> {
        stack: &'a RawStack,
        us: u64,
        /// When (ktime ns): a sample's instant, or the block's part
        /// inside the stall; for a block, where its wakeup falls.
        at: (u64, u64, u64),
        /// None: on the CPU; else the block's class and syscall, and the
        /// part of it (us) after its wakeup.
        block: Option<(u8, i32, u8, u64)>,
    }
    let mut inside: HashMap<(u32, usize), Vec<Inside<'_>>> = HashMap::new();
    for s in &raw.turn_samples {
        if Some(s.stack.tgid) == exclude {
            continue;
        }
        if let Some(i) = find(s.tid, s.time_ns) {
            inside.entry((s.tid, i)).or_default().push(Inside {
                stack: &s.stack,
                us: sample_us,
                at: (s.time_ns, s.time_ns, s.time_ns + 1),
                block: None,
            });
        }
    }
    for b in &raw.turn_blocks {
        if Some(b.block.stack.tgid) == exclude {
            continue;
        }
        let Some(i) = find(b.tid, b.start_ns) else {
            continue;
        };
        let st = &stalls[&b.tid][i];
        let us = overlap_us(b.start_ns, b.end_ns, st.start_ns, st.end_ns);
        let woken = if b.woken_ns >= b.start_ns && b.woken_ns <= b.end_ns {
            overlap_us(b.woken_ns, b.end_ns, st.start_ns, st.end_ns)
        } else {
            0
        };
        let (from, to) = (b.start_ns.max(st.start_ns), b.end_ns.min(st.end_ns));
        inside.entry((b.tid, i)).or_default().push(Inside {
            stack: &b.block.stack,
            us,
            at: (from, b.woken_ns.clamp(from, to.max(from)), to),
            block: Some((b.block.class, b.block.syscall, b.block.detail, woken)),
        });
    }

    let all: Vec<&RawStack> = inside.values().flatten().map(|x| x.stack).collect();
    let tables = symbol_tables_with(sym, all.iter().copied(), procs);
    let mut folded_stacks: Vec<SymbolizedStack> = Vec::new();
    // Each one's interval (ktime ns).
    let mut when: Vec<(u64, u64)> = Vec::new();
    // Per (tid, stall): on-CPU us, off-CPU us by cause, leaf frames.
    let mut per_stall: HashMap<(u32, usize), StallParts> = HashMap::new();
    for (key, items) in &inside {
        let entry = per_stall.entry(*key).or_default();
        for x in items {
            let mut s = symbolize_stack(x.stack, &tables, procs);
            // The leaf-most JS (JIT) frame names the culprit best; else
            // the leaf-most user frame.
            let leaf = s
                .user
                .iter()
                .rev()
                .find(|f| f.kind == FrameKind::Jit)
                .or(s.user.last())
                .map_or_else(|| s.process.clone(), |f| f.name.to_string());
            *entry.1.entry(leaf).or_default() += x.us;
            match x.block {
                None => {
                    s.count = x.us;
                    folded_stacks.push(s);
                    when.push((x.at.0, x.at.2));
                }
                Some((cls, syscall, detail, woken_us)) => {
                    let cause = classify(cls, syscall, detail, &s.kernel);
                    let blocked_us = x.us - woken_us.min(x.us);
                    *entry.0.entry(cause.name()).or_default() += blocked_us as f64 / 1000.0;
                    if woken_us > 0 {
                        *entry.0.entry(Cause::Cpu.name()).or_default() +=
                            woken_us.min(x.us) as f64 / 1000.0;
                    }
                    let (from, woken, to) = x.at;
                    let woken = if woken_us > 0 { woken } else { to };
                    for (c, us, at) in [
                        (cause, blocked_us, (from, woken)),
                        (Cause::Cpu, woken_us.min(x.us), (woken, to)),
                    ] {
                        if us == 0 {
                            continue;
                        }
                        let mut b = s.clone();
                        b.kernel.push(Frame::new(c.frame(), FrameKind::User));
                        b.count = us;
                        folded_stacks.push(b);
                        when.push(at);
                    }
                }
            }
        }
    }
    if group_by_container {
        for s in &mut folded_stacks {
            s.group = Some(group_of(s.tgid, procs, attributor));
        }
    }
    let folded = fold::fold(&folded_stacks);
    let timed = folded_stacks
        .iter()
        .zip(when)
        .map(|(s, (from, to))| (fold::line(s), from, to, s.count))
        .collect();

    let mut loops: Vec<LoopReport> = raw
        .loops
        .iter()
        .filter(|l| Some(l.turns.tgid) != exclude)
        .filter(|l| l.turns.turns > 0 || stalls.contains_key(&l.tid))
        .map(|l| {
            let t = &l.turns;
            let hist = &t.hist[..];
            let mut worst: Vec<StallReport> = stalls
                .get(&l.tid)
                .map(|v| {
                    v.iter()
                        .enumerate()
                        .map(|(i, s)| {
                            let duration_ms = (s.end_ns - s.start_ns) as f64 / 1e6;
                            let (off, leaves) = per_stall.remove(&(l.tid, i)).unwrap_or_default();
                            let off_total: f64 = off.values().sum();
                            let seen: u64 = leaves.values().sum();
                            let mut top: Vec<(String, u64)> = leaves.into_iter().collect();
                            top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                            StallReport {
                                start: clock.rfc3339(s.start_ns),
                                duration_ms,
                                on_cpu_ms: (duration_ms - off_total).max(0.0),
                                off_cpu_ms: off,
                                top_frames: top
                                    .into_iter()
                                    .take(5)
                                    .map(|(frame, us)| TopFrame {
                                        frame,
                                        share: us as f64 / seen.max(1) as f64,
                                    })
                                    .collect(),
                                ongoing: s.ongoing,
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let count = worst.len() as u64;
            let stalled_s = worst.iter().map(|w| w.duration_ms).sum::<f64>() / 1000.0;
            worst.sort_by(|a, b| b.duration_ms.total_cmp(&a.duration_ms));
            worst.truncate(WORST_LISTED);
            LoopReport {
                pid: t.tgid,
                tid: l.tid,
                comm: String::from_utf8_lossy(t.comm.split(|b| *b == 0).next().unwrap_or(&[]))
                    .into_owned(),
                container: group_of(t.tgid, procs, attributor),
                turns: t.turns,
                turn_ms: TurnMs {
                    p50: quantile_ms(hist, 0.50),
                    p90: quantile_ms(hist, 0.90),
                    p99: quantile_ms(hist, 0.99),
                    max: t.max_ns as f64 / 1e6,
                    histogram: hist
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| **c > 0)
                        .map(|(i, c)| TurnBucket {
                            le_ms: slot_upper_us(i as u32) as f64 / 1000.0,
                            count: u64::from(*c),
                        })
                        .collect(),
                },
                stalls: count,
                stalled_s,
                worst,
            }
        })
        .collect();
    let threads = loops.len();
    let worst_ms = |l: &LoopReport| l.worst.first().map_or(0.0, |w| w.duration_ms);
    loops.sort_by(|a, b| {
        worst_ms(b)
            .total_cmp(&worst_ms(a))
            .then(b.turns.cmp(&a.turns))
            .then(a.tid.cmp(&b.tid))
    });
    loops.truncate(MAX_LOOPS_LISTED);
    LoopsAnalysis {
        folded,
        timed,
        summary: EventLoops {
            stall_threshold_ms: stall_ns as f64 / 1e6,
            threads,
            loops,
        },
    }
}

/// The table's line: the worst loop and its worst stall.
pub fn render_line(e: &EventLoops) -> String {
    let Some(l) = e.loops.first() else {
        return "  Loops    no thread waited in epoll\n".to_string();
    };
    match l.worst.first() {
        Some(w) => {
            let mut off: Vec<(&&str, &f64)> =
                w.off_cpu_ms.iter().filter(|(_, v)| **v >= 0.5).collect();
            off.sort_by(|a, b| b.1.total_cmp(a.1));
            let off: Vec<String> = off.iter().map(|(c, v)| format!("{v:.0} ms {c}")).collect();
            format!(
                "  Loops    {} stalls of {} (pid {}, tid {}) over {:.0} ms; worst {:.0} ms at {}{} ({:.0} ms on CPU{}{}){}; turns p99 {:.1} ms of {}\n",
                l.stalls,
                l.comm,
                l.pid,
                l.tid,
                e.stall_threshold_ms,
                w.duration_ms,
                w.start,
                if w.ongoing { ", still going" } else { "" },
                w.on_cpu_ms,
                if off.is_empty() { "" } else { ", " },
                off.join(", "),
                w.top_frames
                    .first()
                    .map(|f| format!(" in {}", f.frame))
                    .unwrap_or_default(),
                l.turn_ms.p99,
                l.turns
            )
        }
        None => format!(
            "  Loops    no stall over {:.0} ms in {} loop threads; busiest {} (pid {}) turns p99 {:.1} ms of {}\n",
            e.stall_threshold_ms, e.threads, l.comm, l.pid, l.turn_ms.p99, l.turns
        ),
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::{loops::SUB_BUCKETS, offcpu::class};

    use super::*;

    #[test]
    fn quantiles_from_quarter_octaves() {
        let mut h = vec![0u32; TURN_SLOTS as usize];
        // 99 turns of 100 us, one of 80 ms.
        h[profiler_common::loops::slot_of(100) as usize] = 99;
        h[profiler_common::loops::slot_of(80_000) as usize] = 1;
        let p50 = quantile_ms(&h, 0.5);
        assert!((0.1..=0.125).contains(&p50), "{p50}");
        let p99 = quantile_ms(&h, 0.99);
        assert!((0.1..=0.125).contains(&p99), "{p99}");
        let p100 = quantile_ms(&h, 1.0);
        assert!((80.0..=100.0).contains(&p100), "{p100}");
        assert_eq!(SUB_BUCKETS, 4);
    }

    #[test]
    fn overlaps() {
        assert_eq!(overlap_us(0, 10_000, 5_000, 20_000), 5);
        assert_eq!(overlap_us(0, 1_000, 5_000, 20_000), 0);
    }

    #[test]
    fn woken_waits_count_as_cpu() {
        assert_eq!(classify(class::WOKEN_WAITING, 0, 0, &[]), Cause::Cpu);
    }
}
