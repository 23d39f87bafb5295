//! `profiler daemon`: loads the programs once and samples until SIGTERM, in
//! consecutive windows. Every second the kernel maps are drained into a
//! slice (counts, histograms, retransmits, OOM kills) that feeds the
//! Prometheus metrics, the current window and any profile being served;
//! at the end of each window its flame graph and USE report are made (and
//! written with `--output`), and processes that have exited are forgotten,
//! so that memory follows the live processes, not the uptime.
//!
//! HTTP (axum): `/metrics`, `/debug/pprof/profile?seconds=N`,
//! `/flamegraph.svg[?seconds=N]`, `/use.json`, `/healthz`. Nothing a request
//! says reaches the filesystem; profile requests are bounded in length and
//! in number.

mod http;
mod window;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Semaphore, mpsc},
};

use crate::{
    capture::{Capture, CaptureConfig, CaptureError},
    cli::DaemonArgs,
    containers::Attributor,
    metrics::Metrics,
    model::RawProfile,
    output::{self, OutputError},
    preflight::{self, PreflightError},
    procs::ProcessTable,
    selfcost,
    symbolize::Symbolizer,
};
use http::{ProfileRequest, Shared};
use window::{Active, StackAgg, Window, end_window, finish_due};

/// Why the daemon could not run or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad input or an unmet requirement, found before starting.
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// The capture could not start, or reading its maps failed.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr}: {source}. Pick a free port with --listen ADDR:PORT")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An output could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The runtime (signals, timers) failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl DaemonError {
    /// True for errors of the user's input (exit code 2), false for
    /// failures while running (exit code 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, DaemonError::Preflight(_) | DaemonError::Listen { .. })
    }
}

/// Profile requests served at once; more get 429.
pub const MAX_CONCURRENT_PROFILES: usize = 2;
/// Distinct stacks kept per window or request; past it samples are
/// counted as dropped.
pub const MAX_STACKS: usize = 100_000;
/// Default `seconds` of a profile request, as Go's net/http/pprof.
pub const DEFAULT_PROFILE_SECONDS: u64 = 30;

/// Runs `profiler daemon` until SIGTERM or SIGINT.
pub fn run(args: &DaemonArgs) -> Result<(), DaemonError> {
    preflight::check_frequency(args.capture.frequency, preflight::max_sample_rate())?;
    if let Some(dir) = &args.output {
        preflight::prepare_output(dir)?;
    }
    preflight::check_capabilities(preflight::effective_caps())?;
    if preflight::ensure_tracefs()? {
        eprintln!("profiler: mounted tracefs at {}", preflight::TRACEFS);
    }
    if !args.listen.ip().is_loopback() {
        eprintln!(
            "profiler: serving on {}, reachable from other hosts: protect the port (firewall, security group, NetworkPolicy)",
            args.listen
        );
    }
    // One thread: capabilities are per thread, and the daemon drops them
    // once attached; a worker started before the drop would keep them.
    map_big_blocks_apart();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(daemon(args))
}

/// How long the names of an address are kept when no stack asks for it
/// (at least two windows): the windows' stacks are mostly of the same
/// addresses, and naming a new one means parsing its binary again (1 s
/// windows cost 23% of a CPU when each window parsed every binary). The
/// binaries parsed for a window's new addresses are let go at its end:
/// the daemon holds names, not binaries.
const NAMES_KEPT_IDLE: Duration = Duration::from_secs(60);

/// Returns the heap's free pages to the kernel: glibc keeps what a dropped
/// symbolizer freed (parsed sections, symbol tables) in its arenas, where
/// it counts in the RSS until reused.
fn give_back_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes glibc map every block of 1 MiB or more on its own, and unmap it
/// when freed. By default the threshold rises to the largest block freed
/// so far (up to 32 MiB), so once a 4 MB symbol table was let go, the next
/// ones came from the heap, where they left holes that the RSS kept: a
/// daemon with short windows grew by 13% over a thousand of them.
fn map_big_blocks_apart() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt has no preconditions; called before any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Names containers of processes (labels, root frames), and symbolizes.
struct Naming {
    attributor: Attributor,
    sym: Symbolizer,
    /// The windows' length.
    window: Duration,
}

impl Naming {
    fn symbolizer(&mut self) -> &mut Symbolizer {
        &mut self.sym
    }

    /// Before a window's stacks are named: the addresses not named yet
    /// are, one binary after another, each parse let go once its
    /// addresses are named (as `record` does).
    fn before_naming(&mut self, raw: &RawProfile, procs: &ProcessTable) {
        self.sym.prefetch(raw.all_stacks(), procs);
    }

    /// After a window: what was parsed is let go, and the names of
    /// addresses no stack asked for lately; kallsyms' table goes with the
    /// kernel names, once a minute (see `Symbolizer::forget_unused`).
    fn after_window(&mut self) {
        self.sym
            .forget_unused(NAMES_KEPT_IDLE.max(self.window.saturating_mul(2)));
    }

    fn container_of(&mut self, tgid: u32, procs: &ProcessTable) -> Option<String> {
        let p = procs.get(tgid)?;
        self.attributor
            .container(p.cgroup.as_deref())
            .map(|c| c.label())
    }

    fn container_of_path(&mut self, cgroup: Option<&str>) -> Option<String> {
        self.attributor.container(cgroup).map(|c| c.label())
    }
}

async fn daemon(args: &DaemonArgs) -> Result<(), DaemonError> {
    let cfg = CaptureConfig {
        frequency_hz: args.capture.frequency,
        stacks: true,
        unwind: args.capture.unwind,
        stack_bytes: args.capture.stack_bytes,
        verbose: args.capture.verbose,
        offcpu: args.off_cpu,
        offcpu_min_ns: u64::try_from(args.off_cpu_min.as_nanos()).unwrap_or(u64::MAX),
        loops: !args.no_event_loops,
        stall_ns: u64::try_from(args.stall_threshold.as_nanos()).unwrap_or(u64::MAX),
        requests: !args.no_requests,
        ..Default::default()
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: args.listen,
            source,
        })?;
    let mut capture = Capture::start(&cfg)?;
    // Attached: from here on, only map reads, /proc and files of other
    // processes, and kernel symbols are needed.
    match crate::privs::drop_all_but(&crate::privs::KEEP_AFTER_ATTACH) {
        Ok(kept) => eprintln!(
            "profiler: programs attached; capabilities dropped but {}",
            match crate::privs::names(kept) {
                n if n.is_empty() => "none".to_string(),
                n => n.join(", "),
            }
        ),
        Err(e) => eprintln!("profiler: could not drop capabilities ({e}); running with them"),
    }

    let (tx, mut rx) = mpsc::channel::<ProfileRequest>(MAX_CONCURRENT_PROFILES * 2);
    let shared = Arc::new(Shared {
        metrics: Mutex::new(Metrics::new()),
        last_svg: Mutex::new(None),
        last_report: Mutex::new(None),
        last_use: Mutex::new(None),
        requests: tx,
        inflight: Arc::new(Semaphore::new(MAX_CONCURRENT_PROFILES)),
        max_seconds: args.max_profile_seconds,
        window: args.window,
    });
    let app = http::router(shared.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    eprintln!(
        "profiler: daemon sampling {} CPUs at {} Hz in {:.0} s windows; serving http://{}/metrics (and /debug/pprof/profile, /flamegraph.svg, /use.json, /healthz); SIGTERM to stop",
        capture.cpus(),
        args.capture.frequency,
        args.window.as_secs_f64(),
        args.listen
    );
    let mut naming = Naming {
        attributor: Attributor::new(args.ecs_agent.0),
        sym: Symbolizer::new(),
        window: args.window,
    };
    let tick_period = Duration::from_secs(1).min(args.window);
    if let Err(e) = crate::privs::lower_priority(args.capture.nice) {
        eprintln!(
            "profiler: warning: cannot lower its priority to nice {}: {e}",
            args.capture.nice
        );
    }
    let mut tick = tokio::time::interval(tick_period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut window = Window::new(selfcost::Reading::now(&capture.bpf_stats()));
    let mut active: Vec<Active> = Vec::new();
    let mut windows_done = 0u64;
    let stop = loop {
        tokio::select! {
            r = capture.events_ready() => { r?; capture.drain_events(); }
            _ = tick.tick() => {
                capture.second();
                slice(&mut capture, &shared, &mut naming, &mut window, &mut active)?;
                finish_due(&mut active, &capture.procs, args, &mut naming, false);
                // Ticks and windows start together: a window ends at the
                // tick nearest its length, not one tick after it.
                if window.started.elapsed() + tick_period / 4 >= args.window {
                    // One reading ends this window's cost and starts the
                    // next one's.
                    let cost = selfcost::Reading::now(&capture.bpf_stats());
                    end_window(&mut capture, &shared, &mut naming, &window, &cost, args);
                    windows_done += 1;
                    naming.after_window();
                    // The window's page, JSON and flame graphs were built
                    // and freed: their pages go back to the kernel rather
                    // than stay in glibc's arenas until the next window.
                    give_back_freed_memory();
                    capture.forget_exited(|pid| active.iter().any(|a| a.stacks.has(pid)));
                    let mut m = shared.metrics.lock().unwrap();
                    m.update_self(&cost.programs);
                    m.set_tracked(capture.procs.len());
                    drop(m);
                    window = Window::new(cost);
                }
            }
            Some(req) = rx.recv() => {
                let now = Instant::now();
                active.push(Active {
                    start: SystemTime::now(),
                    started: now,
                    deadline: now + Duration::from_secs(req.seconds),
                    want: req.want,
                    stacks: StackAgg::default(),
                    reply: req.reply,
                });
            }
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
        }
    };
    eprintln!("profiler: {stop}: finishing the window and answering profile requests");
    output::abort_on_signal(1);
    // What was sampled so far still counts: the partial window and the
    // requests in flight get what they have.
    slice(&mut capture, &shared, &mut naming, &mut window, &mut active)?;
    finish_due(&mut active, &capture.procs, args, &mut naming, true);
    if window.started.elapsed() >= Duration::from_secs(1) || windows_done == 0 {
        let cost = selfcost::Reading::now(&capture.bpf_stats());
        end_window(&mut capture, &shared, &mut naming, &window, &cost, args);
    }
    let stopped = capture.stop().err();
    for e in stopped.into_iter().chain(capture.detach()) {
        eprintln!("profiler: warning: {e} (the kernel detaches it when the profiler exits)");
    }
    server.abort();
    eprintln!("profiler: daemon stopped after {} windows", windows_done);
    Ok(())
}

/// One second of samples: into the metrics, the window and the requests.
fn slice(
    capture: &mut Capture,
    shared: &Shared,
    naming: &mut Naming,
    window: &mut Window,
    active: &mut [Active],
) -> Result<(), DaemonError> {
    let raw = capture.collect_window(true)?;
    {
        let procs = &capture.procs;
        let mut m = shared.metrics.lock().unwrap();
        let n = std::cell::RefCell::new(&mut *naming);
        m.add_slice(
            &raw,
            &mut |tgid| n.borrow_mut().container_of(tgid, procs),
            &mut |raw, i| {
                let owner = raw.retransmits[i].1.owner_tgid;
                let path = raw
                    .socket_owners
                    .get(&owner)
                    .and_then(|o| o.cgroup.clone())
                    .or_else(|| procs.get(owner).and_then(|p| p.cgroup.clone()));
                n.borrow_mut().container_of_path(path.as_deref())
            },
            &mut |raw, i| {
                let path = raw.oom_kills[i].victim_cgroup.clone();
                n.borrow_mut().container_of_path(path.as_deref())
            },
        );
    }
    for a in active.iter_mut() {
        a.stacks.add(&raw.stacks, None);
    }
    window.stacks.add(&raw.stacks, Some(&raw.stack_times));
    window.signals.time_origin_ns = raw.time_origin_ns;
    window.signals.merge_signals(raw);
    Ok(())
}
