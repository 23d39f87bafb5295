//! The daemon's windows and profile requests: raw stacks summed over
//! one-second slices (bounded), and what is made of them when their time
//! is up.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::oneshot;

use super::{
    MAX_STACKS, Naming,
    http::{Body, Shared, Want},
};
use crate::{
    capture::Capture,
    cli::{DaemonArgs, GroupBy},
    containers::group_of,
    fold, hostsnap,
    model::{RawProfile, RawStack, RawStackPart},
    output::{self, WindowFiles},
    pprof,
    procs::ProcessTable,
    render, selfcost,
    symbolize::{symbol_tables_with, symbolize_stack},
    usereport,
};

pub(super) type StackId = (
    u32,
    String,
    RawStackPart,
    Option<crate::model::Cut>,
    RawStackPart,
);

/// Raw stacks summed over slices, bounded, with the time slices of
/// their samples.
#[derive(Default)]
pub(super) struct StackAgg {
    /// Stack -> (samples, index in the order first seen).
    pub(super) stacks: HashMap<StackId, (u64, u32)>,
    pub(super) dropped: u64,
    /// (time slice from the capture's origin, index) -> samples.
    times: HashMap<(u32, u32), u32>,
}

impl StackAgg {
    /// Adds a slice's stacks, and their times when `times` (the slice's
    /// `stack_times`, indexes into `stacks`).
    pub(super) fn add(&mut self, stacks: &[RawStack], times: Option<&[(u32, u32, u32)]>) {
        let mut ids = Vec::with_capacity(stacks.len());
        for s in stacks {
            let key = (
                s.tgid,
                s.thread.clone(),
                s.user.clone(),
                s.user_cut,
                s.kernel.clone(),
            );
            let id = if let Some((c, id)) = self.stacks.get_mut(&key) {
                *c += s.count;
                Some(*id)
            } else if self.stacks.len() < MAX_STACKS {
                let id = self.stacks.len() as u32;
                self.stacks.insert(key, (s.count, id));
                Some(id)
            } else {
                self.dropped += s.count;
                None
            };
            ids.push(id);
        }
        for &(slice, i, n) in times.unwrap_or_default() {
            if let Some(Some(id)) = ids.get(i as usize) {
                *self.times.entry((slice, *id)).or_default() += n;
            }
        }
    }

    /// The stacks, in index order.
    pub(super) fn to_raw(&self) -> Vec<RawStack> {
        let mut v: Vec<_> = self.stacks.iter().collect();
        v.sort_unstable_by_key(|(_, (_, id))| *id);
        v.into_iter()
            .map(
                |((tgid, thread, user, cut, kernel), &(count, _))| RawStack {
                    tgid: *tgid,
                    thread: thread.clone(),
                    user: user.clone(),
                    user_cut: *cut,
                    kernel: kernel.clone(),
                    count,
                },
            )
            .collect()
    }

    /// The samples' times as `RawProfile::stack_times` of [`Self::to_raw`],
    /// slices counted from `first` (earlier ones left out).
    pub(super) fn times_from(&self, first: u32) -> Vec<(u32, u32, u32)> {
        self.times
            .iter()
            .filter(|((slice, _), _)| *slice >= first)
            .map(|(&(slice, id), &n)| (slice - first, id, n))
            .collect()
    }

    pub(super) fn has(&self, tgid: u32) -> bool {
        self.stacks.keys().any(|k| k.0 == tgid)
    }
}

pub(super) struct Active {
    pub(super) start: SystemTime,
    pub(super) started: Instant,
    pub(super) deadline: Instant,
    pub(super) want: Want,
    pub(super) stacks: StackAgg,
    pub(super) reply: oneshot::Sender<Body>,
}

/// The window being sampled.
pub(super) struct Window {
    pub(super) started: Instant,
    pub(super) start_time: SystemTime,
    pub(super) host_start: hostsnap::HostSnapshot,
    pub(super) clock: usereport::Clock,
    pub(super) signals: RawProfile,
    pub(super) stacks: StackAgg,
    pub(super) cost_start: selfcost::Reading,
    /// The monotonic clock at its start.
    pub(super) start_ns: u64,
}

impl Window {
    /// A window starting now, its own cost counted from `cost_start`.
    pub(super) fn new(cost_start: selfcost::Reading) -> Self {
        Window {
            cost_start,
            started: Instant::now(),
            start_time: SystemTime::now(),
            host_start: hostsnap::snapshot(),
            clock: usereport::Clock::now(),
            signals: RawProfile::default(),
            stacks: StackAgg::default(),
            start_ns: crate::capture::monotonic_ns(),
        }
    }
}

/// Answers the requests whose time is up (all of them with `all`).
pub(super) fn finish_due(
    active: &mut Vec<Active>,
    procs: &ProcessTable,
    args: &DaemonArgs,
    naming: &mut Naming,
    all: bool,
) {
    let now = Instant::now();
    let mut i = 0;
    while i < active.len() {
        if !all && active[i].deadline > now {
            i += 1;
            continue;
        }
        let a = active.swap_remove(i);
        let mut stacks = a.stacks.to_raw();
        stacks.sort_by_key(|s| std::cmp::Reverse(s.count));
        let body = match a.want {
            Want::Pprof => {
                let tables = symbol_tables_with(naming.symbolizer(), stacks.iter(), procs);
                let mut b = pprof::Builder::new(pprof::Window {
                    start_unix_ns: a
                        .start
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as i64),
                    duration_ns: a.started.elapsed().as_nanos() as i64,
                    frequency_hz: args.capture.frequency,
                });
                for s in &stacks {
                    let container = naming.container_of(s.tgid, procs);
                    b.add(s, &tables, procs, container.as_deref());
                }
                Ok(b.finish())
            }
            Want::Svg => {
                let (folded, samples) = fold_stacks(&stacks, procs, args.capture.group_by, naming);
                svg(
                    &folded,
                    a.started.elapsed(),
                    args.capture.frequency,
                    samples,
                )
            }
        };
        // The client went away: nothing to answer.
        let _ = a.reply.send(body);
    }
}

pub(super) fn fold_stacks(
    stacks: &[RawStack],
    procs: &ProcessTable,
    group_by: GroupBy,
    naming: &mut Naming,
) -> (fold::Folded, u64) {
    let (folded, samples, _) = symbolize_and_fold(stacks, procs, group_by, naming);
    (folded, samples)
}

/// [`fold_stacks`], and the symbolized stacks (one per raw stack).
pub(super) fn symbolize_and_fold(
    stacks: &[RawStack],
    procs: &ProcessTable,
    group_by: GroupBy,
    naming: &mut Naming,
) -> (fold::Folded, u64, Vec<crate::model::SymbolizedStack>) {
    let tables = symbol_tables_with(naming.symbolizer(), stacks.iter(), procs);
    let mut symbolized: Vec<_> = stacks
        .iter()
        .map(|s| symbolize_stack(s, &tables, procs))
        .collect();
    if group_by == GroupBy::Container {
        for s in &mut symbolized {
            s.group = Some(group_of(s.tgid, procs, &mut naming.attributor));
        }
    }
    let folded = fold::fold(&symbolized);
    let samples = fold::total(&folded);
    (folded, samples, symbolized)
}

pub(super) fn svg(folded: &fold::Folded, took: Duration, hz: u64, samples: u64) -> Body {
    let title = render::Title {
        host: output::hostname(),
        duration_s: took.as_secs_f64(),
        frequency_hz: hz,
        samples,
    };
    output::flamegraph(folded, &title)
}

/// Makes the window's flame graph and USE report, serves them from now
/// on, writes them with --output, and sets the window's gauges.
pub(super) fn end_window(
    capture: &mut Capture,
    shared: &Shared,
    naming: &mut Naming,
    window: &Window,
    cost_end: &selfcost::Reading,
    args: &DaemonArgs,
) {
    let elapsed = window.started.elapsed();
    let host_end = hostsnap::snapshot();
    let mut raw = window.signals.clone();
    raw.stacks = window.stacks.to_raw();
    let first = (window.start_ns.saturating_sub(raw.time_origin_ns)
        / profiler_common::stacks::TIME_SLICE_NS) as u32;
    raw.stack_times = window.stacks.times_from(first);
    // Everything timed in the window counts from its start.
    raw.time_origin_ns += u64::from(first) * profiler_common::stacks::TIME_SLICE_NS;
    crate::offcpu::name_seconds(&mut raw.seconds);
    // The window's stack table continues the kernel's count map: samples
    // it had no room for are lost the same way, and reported so.
    raw.counters.add(
        profiler_common::counters::Counter::CountMapFull,
        window.stacks.dropped,
    );
    let procs = &capture.procs;
    {
        let mut m = shared.metrics.lock().unwrap();
        m.end_window(&raw, &mut |tgid| naming.container_of(tgid, procs));
    }
    let mut report = usereport::build(
        &raw,
        &window.host_start,
        &host_end,
        elapsed,
        args.capture.frequency,
        &window.clock,
    );
    let cost = selfcost::between(
        &window.cost_start,
        cost_end,
        elapsed.as_secs_f64(),
        raw.cpus,
        capture.stats_on(),
    );
    {
        let mut m = shared.metrics.lock().unwrap();
        m.set_self_share(cost.share_of_cpu);
        m.add_throttling(&report.cpu.throttling);
    }
    report.profiler = Some(cost);
    let by_container = args.capture.group_by == GroupBy::Container;
    // The daemon's long-lived symbolizer names the off-CPU and stall
    // stacks too: a fresh one each window read kallsyms and parsed (and
    // inflated) every binary's DWARF again, most of a window's CPU.
    naming.before_naming(&raw, procs);
    let offcpu = raw.offcpu_on.then(|| {
        crate::offcpu::analyze(
            &raw,
            procs,
            &mut naming.sym,
            None,
            &mut naming.attributor,
            by_container,
            u64::try_from(args.off_cpu_min.as_nanos()).unwrap_or(u64::MAX),
            !raw.unavailable
                .iter()
                .any(|u| u.signal == crate::offcpu::THROTTLED_SIGNAL),
        )
    });
    let loops = raw.loops_on.then(|| {
        crate::loops::analyze(
            &raw,
            procs,
            &mut naming.sym,
            None,
            &mut naming.attributor,
            by_container,
            u64::try_from(args.stall_threshold.as_nanos()).unwrap_or(u64::MAX),
            crate::capture::monotonic_ns(),
            args.capture.frequency,
            &window.clock,
        )
    });
    {
        let mut m = shared.metrics.lock().unwrap();
        if let Some(o) = &offcpu {
            m.add_offcpu(&o.summary);
        }
        if loops.is_some() {
            m.add_loops(&raw, &mut |tgid| naming.container_of(tgid, procs));
        }
        if raw.requests_on {
            m.add_requests(&raw, &mut |tgid| naming.container_of(tgid, procs));
        }
    }
    let requests = raw.requests_on.then(|| {
        let counter = |name: &str| -> i64 {
            host_end.tcp_ext.get(name).copied().unwrap_or(0)
                - window.host_start.tcp_ext.get(name).copied().unwrap_or(0)
        };
        let listen =
            crate::requests::Listen::now(counter("ListenOverflows"), counter("ListenDrops"));
        crate::requests::report(
            &raw,
            &listen,
            elapsed.as_secs_f64(),
            procs,
            &mut naming.attributor,
            None,
        )
    });
    report.offcpu = offcpu.as_ref().map(|o| o.summary.clone());
    report.event_loops = loops.as_ref().map(|l| l.summary.clone());
    // Plain data (non-finite floats become null): encoding cannot fail.
    let use_json = serde_json::to_vec_pretty(&report).expect("a USE report encodes");
    let (folded, samples, symbolized) =
        symbolize_and_fold(&raw.stacks, procs, args.capture.group_by, naming);
    let svg = svg(&folded, elapsed, args.capture.frequency, samples);
    let html = {
        let kept: Vec<usize> = (0..raw.stacks.len()).collect();
        let timeline = crate::report::timeline(&raw, &symbolized, &kept).with_timed(
            &raw,
            offcpu.as_ref(),
            loops.as_ref(),
        );
        let symbols = crate::symreport::build(&symbolized);
        let mut page = crate::report::Page::new(
            format!(
                "{} — daemon window of {:.0} s from {} at {} Hz on {} CPUs",
                output::hostname(),
                elapsed.as_secs_f64(),
                output::stamp(window.start_time),
                args.capture.frequency,
                raw.cpus
            ),
            args.capture.frequency,
            &report,
        )
        .with_graphs(
            offcpu.as_ref().map(|o| &o.folded),
            loops.as_ref().map(|l| &l.folded),
        )
        .with_timeline(Some(&timeline));
        page.requests = requests.as_ref();
        page.symbols = Some(&symbols);
        let mut out = Vec::new();
        crate::report::write_html(&page, &mut out).map(|()| out)
    };
    if let Some(dir) = &args.output {
        let time_svg = |what: &'static str, f: &fold::Folded| -> Option<Vec<u8>> {
            let title = render::TimeTitle {
                what,
                host: output::hostname(),
                duration_s: elapsed.as_secs_f64(),
                total_us: fold::total(f),
            };
            let mut out = Vec::new();
            render::time_flamegraph(f, &title, &mut out)
                .ok()
                .map(|()| out)
        };
        let offcpu_svg = offcpu
            .as_ref()
            .and_then(|o| time_svg("Off-CPU time", &o.folded));
        let stalls_svg = loops
            .as_ref()
            .and_then(|l| time_svg("Event-loop stalls", &l.folded));
        let mut extra = Vec::new();
        if let Some(o) = &offcpu {
            extra.push(("offcpu", &o.folded, offcpu_svg.as_deref()));
        }
        if let Some(l) = &loops {
            extra.push(("stalls", &l.folded, stalls_svg.as_deref()));
        }
        let written = output::new_dir(dir, "window", window.start_time).and_then(|out| {
            let files = WindowFiles {
                folded: &folded,
                svg: svg.as_deref().ok(),
                use_json: &use_json,
                extra,
            };
            let mut written = files.write(&out)?;
            if let Ok(html) = &html {
                let path = out.join("report.html");
                output::write_atomic(&path, |w| std::io::Write::write_all(w, html))?;
                written.push(path);
            }
            if let Some(r) = &requests {
                let path = out.join("requests.json");
                output::write_json(&path, r)?;
                written.push(path);
            }
            Ok(written)
        });
        // A flame graph that could not be drawn is reported, not written.
        let errors = written.err().into_iter().chain(
            svg.as_ref()
                .err()
                .map(|e| crate::output::OutputError::Render(std::io::Error::other(e.to_string()))),
        );
        for e in errors.chain(output::retain(dir, "window-", args.retain as usize)) {
            eprintln!("profiler: could not write the window: {e}");
        }
    }
    if let Ok(html) = html {
        *shared.last_report.lock().unwrap() = Some(Arc::new(html));
    }
    *shared.last_svg.lock().unwrap() = Some(Arc::new(svg));
    *shared.last_use.lock().unwrap() = Some(Arc::new(use_json));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_aggregation_is_bounded() {
        let mut agg = StackAgg::default();
        let s = |tgid, count| RawStack {
            tgid,
            thread: "t".into(),
            user: Ok(vec![1, 2]),
            user_cut: None,
            kernel: Err(-14),
            count,
        };
        agg.add(
            &[s(1, 2), s(1, 3), s(2, 1)],
            Some(&[(5, 0, 2), (6, 1, 3), (6, 2, 1)]),
        );
        assert_eq!(agg.stacks.len(), 2);
        assert_eq!(agg.to_raw().iter().map(|s| s.count).sum::<u64>(), 6);
        assert!(agg.has(2) && !agg.has(3));
        // Stack 0 and 1 are the same: its samples in slices 5 and 6.
        let mut t = agg.times_from(5);
        t.sort_unstable();
        assert_eq!(t, vec![(0, 0, 2), (1, 0, 3), (1, 1, 1)]);
        let many: Vec<RawStack> = (0..MAX_STACKS as u32 + 10).map(|i| s(i, 1)).collect();
        let mut agg = StackAgg::default();
        agg.add(&many, None);
        assert_eq!(agg.stacks.len(), MAX_STACKS);
        assert_eq!(agg.dropped, 10);
    }
}
