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

/// Raw stacks summed over slices, bounded.
#[derive(Default)]
pub(super) struct StackAgg {
    pub(super) stacks: HashMap<StackId, u64>,
    pub(super) dropped: u64,
}

impl StackAgg {
    pub(super) fn add(&mut self, stacks: &[RawStack]) {
        for s in stacks {
            let key = (
                s.tgid,
                s.thread.clone(),
                s.user.clone(),
                s.user_cut,
                s.kernel.clone(),
            );
            if let Some(c) = self.stacks.get_mut(&key) {
                *c += s.count;
            } else if self.stacks.len() < MAX_STACKS {
                self.stacks.insert(key, s.count);
            } else {
                self.dropped += s.count;
            }
        }
    }

    pub(super) fn to_raw(&self) -> Vec<RawStack> {
        self.stacks
            .iter()
            .map(|((tgid, thread, user, cut, kernel), &count)| RawStack {
                tgid: *tgid,
                thread: thread.clone(),
                user: user.clone(),
                user_cut: *cut,
                kernel: kernel.clone(),
                count,
            })
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
    (folded, samples)
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
    // One for the window's off-CPU and stall stacks.
    let mut sym = crate::symbolize::Symbolizer::new();
    let offcpu = raw.offcpu_on.then(|| {
        crate::offcpu::analyze(
            &raw,
            procs,
            &mut sym,
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
            &mut sym,
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
    let (folded, samples) = fold_stacks(&raw.stacks, procs, args.capture.group_by, naming);
    let svg = svg(&folded, elapsed, args.capture.frequency, samples);
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
        agg.add(&[s(1, 2), s(1, 3), s(2, 1)]);
        assert_eq!(agg.stacks.len(), 2);
        assert_eq!(agg.to_raw().iter().map(|s| s.count).sum::<u64>(), 6);
        assert!(agg.has(2) && !agg.has(3));
        let many: Vec<RawStack> = (0..MAX_STACKS as u32 + 10).map(|i| s(i, 1)).collect();
        let mut agg = StackAgg::default();
        agg.add(&many);
        assert_eq!(agg.stacks.len(), MAX_STACKS);
        assert_eq!(agg.dropped, 10);
    }
}
