//! `profiler record`: one capture, from preflight checks to the files.

use std::{
    fs,
    io::{self, Write as _},
    path::PathBuf,
    process::ExitStatus,
    time::{Duration, Instant},
};

use profiler_common::counters::Counter;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    capture::{Capture, CaptureConfig, CaptureError},
    cli::{GroupBy, RecordArgs},
    containers::{Attributor, group_of},
    fold::{self, Folded},
    hostsnap,
    model::RawProfile,
    output::{self, OutputError},
    preflight::{self, PreflightError},
    render, selfcost,
    symbolize::{Symbolizer, symbolize_profile_with},
    symreport, usereport,
};

/// Why `record` failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Bad input or an unmet requirement, found before capturing.
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// The capture could not start.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The command to profile could not be started.
    #[error("cannot start {cmd:?}: {source}. Check the command name and that it is on PATH")]
    Spawn {
        /// The command.
        cmd: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An output could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// Anything else of the runtime.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl RecordError {
    /// True for errors of the user's input (exit code 2), false for
    /// failures while running (exit code 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, RecordError::Preflight(_) | RecordError::Spawn { .. })
    }
}

/// What ended the capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The duration elapsed.
    Duration,
    /// SIGINT.
    Interrupted,
    /// SIGTERM.
    Terminated,
    /// The command exited.
    CommandExited,
    /// Every -p process exited.
    TargetsExited,
}

/// What a finished capture produced.
#[derive(Debug)]
pub struct Outcome {
    /// Output directory.
    pub dir: PathBuf,
    /// Samples in the flame graph.
    pub samples: u64,
    /// Distinct folded stacks.
    pub unique_stacks: usize,
    /// Exit status of the profiled command, if one was started.
    pub command_status: Option<ExitStatus>,
}

fn default_output_dir() -> PathBuf {
    PathBuf::from(format!(
        "profile-{}",
        output::stamp(std::time::SystemTime::now())
    ))
}

/// True while a process exists and is not a zombie (a zombie has exited;
/// only its parent has not reaped it yet).
fn process_alive(pid: u32) -> bool {
    crate::procs::Stat::read(pid).is_some_and(|s| !s.exited())
}

/// Runs `profiler record`.
pub fn run(args: &RecordArgs) -> Result<Outcome, RecordError> {
    // Bad input first, before anything is loaded.
    preflight::check_frequency(args.capture.frequency, preflight::max_sample_rate())?;
    let mut tgids = Vec::new();
    for &pid in &args.pids {
        let tgid = preflight::resolve_pid(pid)?;
        if !tgids.contains(&tgid) {
            tgids.push(tgid);
        }
    }
    let dir = args.output.clone().unwrap_or_else(default_output_dir);
    preflight::prepare_output(&dir)?;
    // Say where the files are in full, wherever the command was run from.
    let dir = fs::canonicalize(&dir).unwrap_or(dir);
    preflight::check_capabilities(preflight::effective_caps())?;
    if preflight::ensure_tracefs()? {
        eprintln!("profiler: mounted tracefs at {}", preflight::TRACEFS);
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(record(args, tgids, dir))
}

async fn record(args: &RecordArgs, tgids: Vec<u32>, dir: PathBuf) -> Result<Outcome, RecordError> {
    let has_command = !args.command.is_empty();
    let cfg = CaptureConfig {
        frequency_hz: args.capture.frequency,
        count_map_entries: args.max_stacks,
        stack_map_entries: args.max_stacks.min(profiler_common::stacks::STACKS.entries),
        pids: tgids.clone(),
        filter: has_command || !tgids.is_empty(),
        follow_forks: has_command,
        stacks: args.stacks(),
        unwind: args.capture.unwind,
        stack_bytes: args.capture.stack_bytes,
        verbose: args.capture.verbose,
        offcpu: args.off_cpu(),
        offcpu_min_ns: u64::try_from(args.off_cpu_min.as_nanos()).unwrap_or(u64::MAX),
        loops: args.event_loops(),
        stall_ns: u64::try_from(args.stall_threshold.as_nanos()).unwrap_or(u64::MAX),
        requests: args.requests(),
        duration: args.duration,
        save_samples: args.save_samples.clone(),
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;

    let mut capture = Capture::start(&cfg)?;
    let mut memory = crate::selfcost::MemoryPhases::default();
    memory.mark("started");
    if args.capture.verbose {
        eprintln!("profiler: started: {}", capture.startup().render());
    }
    let cost_start = selfcost::Reading::now(&capture.bpf_stats());
    let started = Instant::now();
    let clock = usereport::Clock::now();
    let host_start = hostsnap::snapshot();

    // Start the command with our own pid in the filter, so the fork
    // tracepoint adds the child before it runs a single instruction of
    // the command; then take ourselves out again.
    let own_pid = std::process::id();
    let mut child = None;
    if has_command {
        capture.add_pid(own_pid)?;
        let spawned = tokio::process::Command::new(&args.command[0])
            .args(&args.command[1..])
            .spawn();
        capture.remove_pid(own_pid)?;
        let c = spawned.map_err(|source| RecordError::Spawn {
            cmd: args.command.join(" "),
            source,
        })?;
        if let Some(pid) = c.id() {
            capture.add_pid(pid)?;
        }
        child = Some(c);
    }

    eprintln!(
        "profiler: recording {} on {} CPUs at {} Hz{} ({})",
        if args.stacks() {
            "stacks and USE signals"
        } else {
            "USE signals"
        },
        capture.cpus(),
        args.capture.frequency,
        match args.duration {
            Some(d) => format!(" for {:.1} s", d.as_secs_f64()),
            None => String::new(),
        },
        if has_command {
            "until the command exits or Ctrl-C"
        } else {
            "Ctrl-C to stop"
        }
    );
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut liveness = tokio::time::interval(Duration::from_millis(250));
    let mut second = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = crate::status::Status::new(args.duration, args.quiet);
    let mut command_status = None;
    if let Err(e) = crate::privs::lower_priority(args.capture.nice) {
        eprintln!(
            "profiler: warning: cannot lower its priority to nice {}: {e}",
            args.capture.nice
        );
    }
    let reason = loop {
        tokio::select! {
            r = capture.events_ready() => { r?; capture.drain_events(); }
            _ = sigint.recv() => break StopReason::Interrupted,
            _ = sigterm.recv() => break StopReason::Terminated,
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => break StopReason::Duration,
            status = async { child.as_mut().unwrap().wait().await }, if child.is_some() => {
                command_status = status.ok();
                break StopReason::CommandExited;
            }
            _ = liveness.tick() => {
                capture.tick();
                if !tgids.is_empty() && !has_command && tgids.iter().all(|&p| !process_alive(p)) {
                    break StopReason::TargetsExited;
                }
            }
            _ = second.tick() => status.second(&capture.second()),
        }
    };
    // The last (partial) second of the series.
    capture.second();
    let stopped = Instant::now();
    let elapsed = stopped - started;
    status.clear();
    // A sampler that would not detach keeps counting into maps already
    // read: what was captured stands.
    if let Err(e) = capture.stop() {
        eprintln!("profiler: warning: {e}");
    }
    let host_end = hostsnap::snapshot();

    // From here on the work is synchronous: a second Ctrl-C or SIGTERM
    // (the first when the capture ended otherwise) must act at once, from
    // the signal handler itself.
    drop((sigint, sigterm));
    output::abort_on_signal(
        if matches!(reason, StopReason::Interrupted | StopReason::Terminated) {
            1
        } else {
            2
        },
    );

    if matches!(reason, StopReason::Interrupted | StopReason::Terminated) {
        eprintln!(
            "profiler: stopping ({}), writing what was captured",
            if reason == StopReason::Interrupted {
                "Ctrl-C"
            } else {
                "SIGTERM"
            }
        );
    }
    if let Some(c) = child.as_mut()
        && command_status.is_none()
    {
        command_status = c.try_wait().ok().flatten();
    }

    memory.mark("captured");
    let mut raw = capture.collect()?;
    memory.mark("collected");
    crate::offcpu::name_seconds(&mut raw.seconds);
    let collected_ns = crate::capture::monotonic_ns();
    capture.procs.refresh_all();
    let cost_end = selfcost::Reading::now(&capture.bpf_stats());

    // The USE report: table on stderr, use.json and events.jsonl.
    let mut report = usereport::build(
        &raw,
        &host_start,
        &host_end,
        elapsed,
        args.capture.frequency,
        &clock,
    );
    let stats_on = capture.stats_on();
    let cost = |end: &selfcost::Reading| {
        selfcost::between(&cost_start, end, elapsed.as_secs_f64(), raw.cpus, stats_on)
    };
    // The programs' time up to the stop; our CPU and RSS up to the
    // analysis (the files are written with what they cost so far).
    report.profiler = Some(crate::selfcost::SelfCost {
        startup_ms: Some(capture.startup().as_ms()),
        samples: args
            .stacks()
            .then(|| crate::selfcost::SampleAccount::of(&raw)),
        ..cost(&cost_end)
    });
    let exclude = has_command.then_some(own_pid);
    // A one-shot capture can wait a second for the ECS agent.
    let mut attributor = Attributor::waiting(
        Some(
            crate::containers::ECS_AGENT
                .parse()
                .expect("a valid address"),
        ),
        Duration::from_secs(1),
    );
    let by_container = args.capture.group_by == GroupBy::Container;
    // One symbolizer for the CPU, off-CPU and stall stacks, which names
    // all their addresses first, one binary after another, each let go
    // once named: a binary is parsed once, and one at a time.
    let mut sym = Symbolizer::new();
    memory.mark("use report");
    if args.stacks() {
        let all = raw.all_stacks().filter(|s| Some(s.tgid) != exclude);
        sym.prefetch(all, &capture.procs);
        memory.mark("user frames named");
    }
    let offcpu = raw.offcpu_on.then(|| {
        crate::offcpu::analyze(
            &raw,
            &capture.procs,
            &mut sym,
            exclude,
            &mut attributor,
            by_container,
            cfg.offcpu_min_ns,
            !raw.unavailable
                .iter()
                .any(|u| u.signal == crate::offcpu::THROTTLED_SIGNAL),
        )
    });
    report.offcpu = offcpu.as_ref().map(|o| o.summary.clone());
    let loops = raw.loops_on.then(|| {
        crate::loops::analyze(
            &raw,
            &capture.procs,
            &mut sym,
            exclude,
            &mut attributor,
            by_container,
            cfg.stall_ns,
            collected_ns,
            args.capture.frequency,
            &clock,
        )
    });
    report.event_loops = loops.as_ref().map(|l| l.summary.clone());
    let use_path = dir.join("use.json");
    output::write_json(&use_path, &report)?;
    let events_path = dir.join("events.jsonl");
    output::write_atomic(&events_path, |w| {
        for line in usereport::events_jsonl(&report) {
            writeln!(w, "{line}")?;
        }
        Ok(())
    })?;

    let mut written_paths = vec![use_path, events_path];
    let (mut samples, mut unique_stacks) = (0, 0);
    let mut folded = Folded::new();
    let mut symbols_text = String::new();
    let mut symbols_report = None;
    let mut timeline = None;
    if let Some(o) = &offcpu {
        let folded_path = dir.join("offcpu.folded");
        output::write_atomic(&folded_path, |w| fold::write_folded(&o.folded, w))?;
        let svg_path = dir.join("offcpu.svg");
        let title = render::TimeTitle {
            what: "Off-CPU time",
            host: output::hostname(),
            duration_s: elapsed.as_secs_f64(),
            total_us: fold::total(&o.folded),
        };
        output::write_atomic(&svg_path, |w| render::time_flamegraph(&o.folded, &title, w))?;
        written_paths.push(folded_path);
        written_paths.push(svg_path);
    }
    let requests = raw.requests_on.then(|| {
        let counter = |name: &str| -> i64 {
            host_end.tcp_ext.get(name).copied().unwrap_or(0)
                - host_start.tcp_ext.get(name).copied().unwrap_or(0)
        };
        let listen =
            crate::requests::Listen::now(counter("ListenOverflows"), counter("ListenDrops"));
        crate::requests::report(
            &raw,
            &listen,
            elapsed.as_secs_f64(),
            &capture.procs,
            &mut attributor,
            exclude,
        )
    });
    if let Some(r) = &requests {
        let path = dir.join("requests.json");
        output::write_json(&path, r)?;
        written_paths.push(path);
    }
    if let Some(l) = &loops {
        let folded_path = dir.join("stalls.folded");
        output::write_atomic(&folded_path, |w| fold::write_folded(&l.folded, w))?;
        let svg_path = dir.join("stalls.svg");
        let title = render::TimeTitle {
            what: "Event-loop stalls",
            host: output::hostname(),
            duration_s: elapsed.as_secs_f64(),
            total_us: fold::total(&l.folded),
        };
        output::write_atomic(&svg_path, |w| render::time_flamegraph(&l.folded, &title, w))?;
        written_paths.push(folded_path);
        written_paths.push(svg_path);
    }
    if args.stacks() {
        memory.mark("off-CPU and loops analysed");
        let mut stacks = symbolize_profile_with(&mut sym, &raw, &capture.procs, exclude);
        memory.mark("CPU stacks symbolized");
        let kept: Vec<usize> = (0..raw.stacks.len())
            .filter(|&i| Some(raw.stacks[i].tgid) != exclude)
            .collect();
        if by_container {
            for s in &mut stacks {
                s.group = Some(group_of(s.tgid, &capture.procs, &mut attributor));
            }
        }
        folded = fold::fold(&stacks);
        samples = fold::total(&folded);
        unique_stacks = folded.len();

        let symbols = symreport::build(&stacks);
        let symbols_path = dir.join("symbols.json");
        output::write_json(&symbols_path, &symbols)?;
        symbols_text = symreport::render(&symbols);
        written_paths.push(symbols_path);

        let folded_path = dir.join("stacks.folded");
        output::write_atomic(&folded_path, |w| fold::write_folded(&folded, w))?;
        let svg_path = dir.join("flamegraph.svg");
        let title = render::Title {
            host: output::hostname(),
            duration_s: elapsed.as_secs_f64(),
            frequency_hz: args.capture.frequency,
            samples,
        };
        output::write_atomic(&svg_path, |w| render::flamegraph(&folded, &title, w))?;
        written_paths.insert(0, svg_path);
        written_paths.insert(0, folded_path);

        let t = crate::report::timeline(&raw, &stacks, &kept).with_timed(
            &raw,
            offcpu.as_ref(),
            loops.as_ref(),
        );
        let path = dir.join("timeline.json");
        output::write_json(&path, &t)?;
        written_paths.push(path);
        symbols_report = Some(symbols);
        timeline = Some(t);
    }
    {
        let mut page = crate::report::Page::new(
            format!(
                "{} — {:.1} s at {} Hz on {} CPUs",
                output::hostname(),
                elapsed.as_secs_f64(),
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
        .with_timeline(timeline.as_ref());
        page.requests = requests.as_ref();
        page.symbols = symbols_report.as_ref();
        let path = dir.join("report.html");
        output::write_atomic(&path, |w| crate::report::write_html(&page, w))?;
        written_paths.insert(0, path);
    }
    let written = Instant::now();
    memory.mark("written");
    if args.capture.verbose {
        eprintln!("profiler: memory: {}", memory.render());
    }

    eprint!("{}", usereport::render_table(&report));
    if let Some(r) = &requests {
        eprint!("{}", crate::requests::render(r));
    }
    eprint!("{symbols_text}");
    // Now that everything is written: userspace CPU including the analysis.
    let mut end = cost_end.clone();
    end.cpu_s = selfcost::Reading::now(&[]).cpu_s;
    eprint!("{}", selfcost::render(&cost(&end)));
    print_summary(
        &raw,
        &folded,
        samples,
        elapsed,
        args.capture.frequency,
        &written_paths,
        written - stopped,
    );
    // Last, once everything is said: unregistering a tracepoint waits for
    // an RCU grace period, one after another (about 1 s here), left to a
    // helper process so that the command returns now.
    for e in capture.detach_and_exit_soon() {
        eprintln!("profiler: warning: {e} (the kernel detaches it when the profiler exits)");
    }
    // The process ends now: freeing what the analysis built, allocation
    // by allocation, would only delay its exit (tens of ms after a busy
    // capture); the kernel takes the memory back at once.
    std::mem::forget((
        raw,
        sym,
        folded,
        timeline,
        offcpu,
        loops,
        requests,
        report,
        attributor,
        symbols_report,
        capture,
    ));
    Ok(Outcome {
        dir,
        samples,
        unique_stacks,
        command_status,
    })
}

fn print_summary(
    raw: &RawProfile,
    folded: &Folded,
    samples: u64,
    elapsed: Duration,
    hz: u64,
    paths: &[PathBuf],
    post: Duration,
) {
    // With --unwind fp, stacks sent aside on collisions share the bound:
    // those past it are lost in userspace, the rest in the kernel's map.
    let lost_kernel = raw.counter(Counter::CountMapFull);
    let lost_aside = raw
        .unwind
        .as_ref()
        .filter(|u| u.samples == 0)
        .map_or(0, |u| u.dropped);
    let lost = lost_kernel + lost_aside;
    let dropped_user = raw.counter(Counter::UserStackDropped);
    let dropped_kernel = raw.counter(Counter::KernelStackDropped);
    let no_stack = raw.counter(Counter::NoStack);
    eprintln!(
        "profiler: {samples} samples in {:.1} s at {hz} Hz on {} CPUs; {} unique stacks",
        elapsed.as_secs_f64(),
        raw.cpus,
        folded.len()
    );
    let lost_where = if lost_aside > 0 {
        format!(
            " ({lost_kernel} in the kernel's count map, {lost_aside} sent aside past --max-stacks)"
        )
    } else {
        String::new()
    };
    eprintln!(
        "profiler: lost {lost} samples (count map full){lost_where}; stacks dropped: {dropped_user} user, {dropped_kernel} kernel (stack map full or collision); {no_stack} samples without any stack"
    );
    let warn = |c: Counter, what: &str| {
        let n = raw.counter(c);
        if n > 0 {
            eprintln!("profiler: {n} {what}");
        }
    };
    warn(
        Counter::UserStacksSentAside,
        "user stacks collided in the kernel's stack map and were sent to userspace as addresses instead (counted as lost above only past --max-stacks)",
    );
    warn(
        Counter::EventsLost,
        "new-process notifications lost: those processes may show unnamed frames",
    );
    warn(
        Counter::ForksDropped,
        "forked children could not be followed (pid filter full)",
    );
    warn(
        Counter::RunqStartFull,
        "wakeups not timed (run-queue map full)",
    );
    warn(Counter::RunqDepthFailed, "run-queue depth reads failed");
    warn(
        Counter::OffcpuStartFull,
        "blocks off the CPU not timed (off-CPU start map full)",
    );
    warn(
        Counter::OffcpuLostNs,
        "ns off the CPU not summed (off-CPU count map full)",
    );
    warn(
        Counter::OffcpuStackDropped,
        "off-CPU stacks dropped (off-CPU stack map full or collision)",
    );
    warn(
        Counter::LoopsFull,
        "epoll waits of threads not timed (event-loop map full)",
    );
    warn(Counter::StallsLost, "stalls not reported (stall ring full)");
    warn(
        Counter::ConnsFull,
        "connections not followed (connection map full): their requests are not counted",
    );
    warn(
        Counter::RequestEventsLost,
        "request, response or round-trip events lost (ring full)",
    );
    warn(
        Counter::LoopBlocksLost,
        "off-CPU blocks inside loop turns not reported (ring full): stalls miss them",
    );
    warn(
        Counter::RetransMapFull,
        "retransmits on connections beyond the per-connection map (in the total, not per connection)",
    );
    warn(
        Counter::OomEventsLost,
        "OOM kill events lost (ring buffer full; in the count, without details)",
    );
    warn(
        Counter::StackCopiesLost,
        "stack copies lost (ring buffer full: userspace did not keep up)",
    );
    warn(
        Counter::UserRegsMissing,
        "samples without user registers (counted with kernel frames only)",
    );
    if let Some(u) = raw.unwind.as_ref().filter(|u| u.untimed > 0) {
        eprintln!(
            "profiler: {} samples counted without their time (the timed cells were at their bound): the heat map misses them",
            u.untimed
        );
    }
    if let Some(u) = raw.unwind.as_ref().filter(|u| u.samples > 0) {
        eprintln!(
            "profiler: unwound {} user stacks in userspace: {} truncated at the copied window, {} stopped at a frame with no unwind rule, {} stopped at an address that is not code, {} dropped; {} JIT frames walked with jitdump CFI; {} copies reached the top of their stack; {} bytes of stack per sample",
            u.samples,
            u.truncated,
            u.lost,
            u.bad_address,
            u.dropped,
            u.jit_cfi_frames,
            raw.counter(Counter::StackCopiesShort),
            u.bytes.checked_div(u.samples).unwrap_or(0)
        );
    }
    eprintln!(
        "profiler: analysed and written in {} ms; peak RSS {} MiB",
        post.as_millis(),
        selfcost::peak_rss_bytes() >> 20
    );
    for p in paths {
        eprintln!("profiler: wrote {}", p.display());
    }
}
