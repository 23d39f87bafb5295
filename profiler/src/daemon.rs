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

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Semaphore, mpsc, oneshot},
};

use crate::{
    capture::{Capture, CaptureConfig},
    cli::{DaemonArgs, GroupBy},
    containers::{Attributor, group_of},
    fold, hostsnap,
    metrics::Metrics,
    model::{RawProfile, RawStack, RawStackPart},
    pprof, preflight,
    procs::ProcessTable,
    record::{RecordError, hostname, write_atomic},
    render, selfcost,
    symbolize::{Symbolizer, symbol_tables_with, symbolize_stack},
    usereport,
};

/// Profile requests served at once; more get 429.
pub const MAX_CONCURRENT_PROFILES: usize = 2;
/// Distinct stacks kept per window or request; past it samples are
/// counted as dropped.
pub const MAX_STACKS: usize = 100_000;
/// Default `seconds` of a profile request, as Go's net/http/pprof.
pub const DEFAULT_PROFILE_SECONDS: u64 = 30;

type StackId = (
    u32,
    String,
    RawStackPart,
    Option<crate::model::Cut>,
    RawStackPart,
);

/// Raw stacks summed over slices, bounded.
#[derive(Default)]
struct StackAgg {
    stacks: HashMap<StackId, u64>,
    dropped: u64,
}

impl StackAgg {
    fn add(&mut self, stacks: &[RawStack]) {
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

    fn to_raw(&self) -> Vec<RawStack> {
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

    fn has(&self, tgid: u32) -> bool {
        self.stacks.keys().any(|k| k.0 == tgid)
    }
}

/// What a profile request wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Pprof,
    Svg,
}

struct ProfileRequest {
    seconds: u64,
    want: Want,
    reply: oneshot::Sender<Vec<u8>>,
}

struct Active {
    start: SystemTime,
    started: Instant,
    deadline: Instant,
    want: Want,
    stacks: StackAgg,
    reply: oneshot::Sender<Vec<u8>>,
}

/// What the HTTP handlers share with the sampling loop.
struct Shared {
    metrics: Mutex<Metrics>,
    last_svg: Mutex<Option<Arc<Vec<u8>>>>,
    last_use: Mutex<Option<Arc<Vec<u8>>>>,
    requests: mpsc::Sender<ProfileRequest>,
    inflight: Arc<Semaphore>,
    max_seconds: u64,
    window: Duration,
}

/// Runs `profiler daemon` until SIGTERM or SIGINT.
pub fn run(args: &DaemonArgs) -> Result<(), RecordError> {
    preflight::check_frequency(args.frequency, preflight::max_sample_rate())?;
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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(daemon(args))
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into() + "\n",
    )
        .into_response()
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/debug/pprof/profile", get(pprof_profile))
        .route("/flamegraph.svg", get(flamegraph))
        .route("/use.json", get(use_json))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "not found; see / for the endpoints") })
        .with_state(shared)
}

async fn index() -> Response {
    text(
        StatusCode::OK,
        "profiler daemon\n\
         /metrics                          Prometheus metrics\n\
         /debug/pprof/profile?seconds=N    gzipped pprof CPU profile of the next N seconds\n\
         /flamegraph.svg[?seconds=N]       flame graph of the last window, or of the next N seconds\n\
         /use.json                         USE report of the last window\n\
         /healthz                          liveness",
    )
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let body = s.metrics.lock().unwrap().encode();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// The `seconds` of a request: a whole number from 1 to the maximum.
fn parse_seconds(q: &HashMap<String, String>, max: u64) -> Result<Option<u64>, Box<Response>> {
    let Some(v) = q.get("seconds") else {
        return Ok(None);
    };
    match v.trim().parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
        _ => Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            format!(
                "seconds={v:?}: use a whole number of seconds from 1 to {max} (the daemon's --max-profile-seconds)"
            ),
        ))),
    }
}

async fn run_request(s: &Shared, seconds: u64, want: Want) -> Response {
    let Ok(_permit) = s.inflight.clone().try_acquire_owned() else {
        return text(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{MAX_CONCURRENT_PROFILES} profiles are already being taken; retry when one has finished"
            ),
        );
    };
    let (reply, rx) = oneshot::channel();
    let req = ProfileRequest {
        seconds,
        want,
        reply,
    };
    if s.requests.send(req).await.is_err() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping");
    }
    match rx.await {
        Ok(body) if want == Want::Pprof => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"profile\"",
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            body,
        )
            .into_response(),
        Ok(body) => ([(header::CONTENT_TYPE, "image/svg+xml")], body).into_response(),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping"),
    }
}

async fn pprof_profile(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let seconds = match parse_seconds(&q, s.max_seconds) {
        Ok(v) => v.unwrap_or(DEFAULT_PROFILE_SECONDS.min(s.max_seconds)),
        Err(r) => return *r,
    };
    run_request(&s, seconds, Want::Pprof).await
}

async fn flamegraph(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match parse_seconds(&q, s.max_seconds) {
        Err(r) => *r,
        Ok(Some(seconds)) => run_request(&s, seconds, Want::Svg).await,
        Ok(None) => match s.last_svg.lock().unwrap().clone() {
            Some(svg) => {
                ([(header::CONTENT_TYPE, "image/svg+xml")], (*svg).clone()).into_response()
            }
            None => not_yet(&s),
        },
    }
}

async fn use_json(State(s): State<Arc<Shared>>) -> Response {
    match s.last_use.lock().unwrap().clone() {
        Some(j) => ([(header::CONTENT_TYPE, "application/json")], (*j).clone()).into_response(),
        None => not_yet(&s),
    }
}

fn not_yet(s: &Shared) -> Response {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "no window has finished yet (windows last {} s); retry then, or ask /flamegraph.svg?seconds=N",
            s.window.as_secs_f64()
        ),
    )
}

/// The window being sampled.
struct Window {
    started: Instant,
    start_time: SystemTime,
    host_start: hostsnap::HostSnapshot,
    clock: usereport::Clock,
    signals: RawProfile,
    stacks: StackAgg,
    cost_start: selfcost::Reading,
}

impl Window {
    /// A window starting now, its own cost counted from `cost_start`.
    fn new(cost_start: selfcost::Reading) -> Self {
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

/// How long one symbolizer (its parsed files) is kept: long enough to
/// spare re-reading DWARF every window, short enough to let go of files no
/// process uses any more and to see binaries replaced on disk.
const SYMBOLIZER_LIFETIME: Duration = Duration::from_secs(600);

/// Names containers of processes (labels, root frames), and symbolizes.
struct Naming {
    attributor: Attributor,
    sym: Symbolizer,
    sym_since: Instant,
}

impl Naming {
    fn symbolizer(&mut self) -> &mut Symbolizer {
        if self.sym_since.elapsed() > SYMBOLIZER_LIFETIME {
            self.sym = Symbolizer::new();
            self.sym_since = Instant::now();
        }
        &mut self.sym
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

async fn daemon(args: &DaemonArgs) -> Result<(), RecordError> {
    let cfg = CaptureConfig {
        frequency_hz: args.frequency,
        stacks: true,
        unwind: args.unwind,
        stack_bytes: args.stack_bytes,
        ..Default::default()
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| RecordError::Listen {
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
        last_use: Mutex::new(None),
        requests: tx,
        inflight: Arc::new(Semaphore::new(MAX_CONCURRENT_PROFILES)),
        max_seconds: args.max_profile_seconds,
        window: args.window,
    });
    let app = router(shared.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    eprintln!(
        "profiler: daemon sampling {} CPUs at {} Hz in {:.0} s windows; serving http://{}/metrics (and /debug/pprof/profile, /flamegraph.svg, /use.json, /healthz); SIGTERM to stop",
        capture.cpus(),
        args.frequency,
        args.window.as_secs_f64(),
        args.listen
    );
    let mut naming = Naming {
        attributor: Attributor::new(args.ecs_agent.0),
        sym: Symbolizer::new(),
        sym_since: Instant::now(),
    };
    let tick_period = Duration::from_secs(1).min(args.window);
    let mut tick = tokio::time::interval(tick_period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut window = Window::new(selfcost::Reading::now(&capture.bpf_stats()));
    let mut active: Vec<Active> = Vec::new();
    let mut windows_done = 0u64;
    let stop = loop {
        tokio::select! {
            r = capture.events_ready() => { r?; capture.drain_events(); }
            _ = tick.tick() => {
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
    crate::record::abort_on_signal(1);
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
) -> Result<(), RecordError> {
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
        a.stacks.add(&raw.stacks);
    }
    window.stacks.add(&raw.stacks);
    window.signals.merge_signals(raw);
    Ok(())
}

/// Answers the requests whose time is up (all of them with `all`).
fn finish_due(
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
                    frequency_hz: args.frequency,
                });
                for s in &stacks {
                    let container = naming.container_of(s.tgid, procs);
                    b.add(s, &tables, procs, container.as_deref());
                }
                b.finish()
            }
            Want::Svg => {
                let (folded, samples) = fold_stacks(&stacks, procs, args.group_by, naming);
                svg(&folded, a.started.elapsed(), args.frequency, samples)
            }
        };
        let _ = a.reply.send(body);
    }
}

fn fold_stacks(
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

fn svg(folded: &fold::Folded, took: Duration, hz: u64, samples: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let title = render::Title {
        host: hostname(),
        duration_s: took.as_secs_f64(),
        frequency_hz: hz,
        samples,
    };
    if render::flamegraph(folded, &title, &mut out).is_err() {
        out.clear();
    }
    out
}

/// Makes the window's flame graph and USE report, serves them from now
/// on, writes them with --output, and sets the window's gauges.
fn end_window(
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
        args.frequency,
        &window.clock,
    );
    let cost = selfcost::between(
        &window.cost_start,
        cost_end,
        elapsed.as_secs_f64(),
        raw.cpus,
        capture.stats_on(),
    );
    shared
        .metrics
        .lock()
        .unwrap()
        .set_self_share(cost.share_of_cpu);
    report.profiler = Some(cost);
    let use_json = serde_json::to_vec_pretty(&report).unwrap_or_default();
    let (folded, samples) = fold_stacks(&raw.stacks, procs, args.group_by, naming);
    let svg = svg(&folded, elapsed, args.frequency, samples);
    if let Some(dir) = &args.output
        && let Err(e) = write_window(
            dir,
            window.start_time,
            &folded,
            &svg,
            &use_json,
            args.retain,
        )
    {
        eprintln!(
            "profiler: could not write the window to {}: {e}",
            dir.display()
        );
    }
    *shared.last_svg.lock().unwrap() = Some(Arc::new(svg));
    *shared.last_use.lock().unwrap() = Some(Arc::new(use_json));
}

/// `DIR/window-<UTC time>/{stacks.folded,flamegraph.svg,use.json}`, then
/// the oldest window directories past `retain` removed.
fn write_window(
    dir: &Path,
    start: SystemTime,
    folded: &fold::Folded,
    svg: &[u8],
    use_json: &[u8],
    retain: u32,
) -> Result<(), RecordError> {
    let secs = start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let name = format!("window-{}", utc_stamp(secs));
    let mut out = dir.join(&name);
    let mut n = 1;
    while out.exists() {
        n += 1;
        out = dir.join(format!("{name}.{n}"));
    }
    preflight::create_dir(&out).map_err(|source| RecordError::Write {
        path: out.clone(),
        source,
    })?;
    write_atomic(&out.join("stacks.folded"), |w| {
        fold::write_folded(folded, w)
    })?;
    write_atomic(&out.join("flamegraph.svg"), |w| {
        io::Write::write_all(w, svg)
    })?;
    write_atomic(&out.join("use.json"), |w| io::Write::write_all(w, use_json))?;
    let mut windows: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("window-"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    windows.sort();
    let excess = windows.len().saturating_sub(retain as usize);
    for old in &windows[..excess] {
        let _ = fs::remove_dir_all(old);
    }
    Ok(())
}

/// `YYYYmmddTHHMMSSZ` of Unix seconds.
fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(1_795_651_200), "20261126T000000Z");
        assert_eq!(utc_stamp(951_782_400 + 3661), "20000229T010101Z");
    }

    #[test]
    fn seconds_are_bounded() {
        let q = |v: &str| HashMap::from([("seconds".to_string(), v.to_string())]);
        assert_eq!(parse_seconds(&HashMap::new(), 60).ok(), Some(None));
        assert_eq!(parse_seconds(&q("5"), 60).ok(), Some(Some(5)));
        for bad in ["0", "61", "-1", "abc", "1.5", ""] {
            let r = parse_seconds(&q(bad), 60).unwrap_err();
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn window_directories_are_retained() {
        let dir = tempfile::tempdir().unwrap();
        let folded = fold::Folded::from([("a;b".to_string(), 3)]);
        for i in 0..5u64 {
            let t = UNIX_EPOCH + Duration::from_secs(1_795_651_200 + i * 60);
            write_window(dir.path(), t, &folded, b"<svg/>", b"{}", 3).unwrap();
        }
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "window-20261126T000200Z",
                "window-20261126T000300Z",
                "window-20261126T000400Z"
            ]
        );
        let text = fs::read_to_string(dir.path().join(&names[2]).join("stacks.folded")).unwrap();
        assert_eq!(text, "a;b 3\n");
    }

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
