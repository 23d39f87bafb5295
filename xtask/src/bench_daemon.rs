//! `cargo xtask bench daemon`: the daemon over many windows on a busy
//! host (a C workload per CPU, a Node.js JIT workload, and process churn):
//! its RSS and CPU at window 10, 50, 100 and more, the time to serve
//! /metrics, the size of a pprof profile of a busy minute; and, as the
//! peer measured in the same run, `perf record -a -g` at the same
//! frequency for the same minute (its CPU seconds, and perf.data's size).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Windows to run (1 s each).
const WINDOWS: u64 = 110;
/// Sampling frequency: the daemon's default.
const HZ: &str = "49";

/// Status and body.
type Response = (u16, Vec<u8>);

fn get(addr: SocketAddr, path: &str) -> Result<Response> {
    tests::http_get(addr, path, Duration::from_secs(120))
        .with_context(|| format!("GET http://{addr}{path}"))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// CPU seconds and RSS (KiB) of a process.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks / hz, tests::rss_kib(pid))
}

struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: kill(2) on our own children.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// The busy host: a known C workload per CPU, Node.js, process churn.
fn workloads(root: &Path, dir: &Path, secs: u64) -> Result<Kill> {
    let known = dir.join("known-daemon");
    crate::bench::build_known(root, &known)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut kids = crate::bench::busy_host(root, &known, cpus, secs)?;
    kids.push(
        Command::new("sh")
            .args([
                "-c",
                &format!(
                    "end=$(($(date +%s) + {secs})); while [ $(date +%s) -lt $end ]; do /bin/true; sleep 0.05; done"
                ),
            ])
            .spawn()?,
    );
    Ok(Kill(kids))
}

/// A daemon with every signal on and windows of `window`, serving on a
/// free port of the loopback once it answers.
fn start_daemon(profiler: &Path, window: &str) -> Result<(Child, SocketAddr)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let daemon = Command::new(profiler)
        .args([
            "daemon",
            "--window",
            window,
            "-F",
            HZ,
            "--ecs-agent",
            "none",
            // Every signal on (off-CPU time is opt-in in the daemon).
            "--off-cpu",
            "--listen",
        ])
        .arg(addr.to_string())
        .stderr(Stdio::null())
        .spawn()
        .context("start the daemon")?;
    let waited = Instant::now();
    while get(addr, "/healthz").is_err() {
        if waited.elapsed() > Duration::from_secs(30) {
            bail!("the daemon did not serve within 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok((daemon, addr))
}

/// The daemon's count of finished windows.
fn windows_done(addr: SocketAddr) -> u64 {
    get(addr, "/metrics")
        .map(|(_, b)| metric(&String::from_utf8_lossy(&b), "profiler_windows_total"))
        .unwrap_or(0.0) as u64
}

/// RSS (KiB) of `pid` in each window of `at`: half a window (`window`)
/// after the daemon finished the one before, between the ends, where
/// the window's page and JSON are not being built.
fn rss_at(
    pid: u32,
    addr: SocketAddr,
    at: &[u64],
    window: Duration,
    limit: Duration,
) -> Result<Vec<(u64, u64)>> {
    let t0 = Instant::now();
    let mut marks = Vec::new();
    for &w in at {
        loop {
            let n = windows_done(addr);
            if n >= w {
                std::thread::sleep(window / 2);
                let (_, rss) = usage(pid);
                eprintln!("xtask: window {}: RSS {rss} KiB", n + 1);
                marks.push((n + 1, rss));
                break;
            }
            if t0.elapsed() > limit {
                bail!("the daemon made only {n} windows in {} s", limit.as_secs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(marks)
}

/// `cargo xtask bench soak`: the daemon's memory on the busy host with
/// every signal on: steady RSS with its default 60 s windows (in the
/// middle of windows 2 to 4), and a thousand 250 ms windows with process
/// churn (RSS in the 10th window against each later mark, up to the
/// 1000th); the peaks (VmHWM) beside them.
pub fn soak(profiler: &Path, root: &Path) -> Result<()> {
    const LIMIT_KIB: u64 = 64 * 1024;
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let _load = workloads(root, &dir, 4 * 60 + 30 + 400)?;
    let (mut daemon, addr) = start_daemon(profiler, "60s")?;
    let minute = rss_at(
        daemon.id(),
        addr,
        &[1, 2, 3],
        Duration::from_secs(60),
        Duration::from_secs(6 * 60),
    )?;
    let minute_peak = tests::status_kib(daemon.id(), "VmHWM:");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    daemon.wait()?;
    let steady = minute.iter().map(|m| m.1).max().unwrap_or(0);

    let (mut daemon, addr) = start_daemon(profiler, "250ms")?;
    let at = [9, 99, 249, 499, 749, 999];
    let soak = rss_at(
        daemon.id(),
        addr,
        &at,
        Duration::from_millis(250),
        Duration::from_secs(1000),
    )?;
    let soak_peak = tests::status_kib(daemon.id(), "VmHWM:");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    daemon.wait()?;
    let base = soak.first().map_or(1, |m| m.1.max(1));
    let worst = soak
        .iter()
        .map(|m| (m.1 as f64 - base as f64) / base as f64)
        .fold(0.0f64, |a, d| if d.abs() > a.abs() { d } else { a });

    let mut md = format!(
        "# Daemon soak (issue 15)\n\nBusy host (known-workload loops, Node.js, a process started every 50 ms); `profiler daemon -F {HZ} --off-cpu` (every signal on).\n\n\
         | windows | window | RSS KiB |\n|---|---|---|\n"
    );
    for (n, rss) in &minute {
        let _ = writeln!(md, "| {n} | 60 s | {rss} |");
    }
    for (n, rss) in &soak {
        let _ = writeln!(md, "| {n} | 250 ms | {rss} |");
    }
    let verdicts = [
        format!(
            "steady RSS with 60 s windows: {} MiB (mid-window, windows 2 to 4; peak {} MiB as windows end), at most 64 MiB: {}",
            steady >> 10,
            minute_peak >> 10,
            if steady <= LIMIT_KIB { "met" } else { "MISSED" }
        ),
        format!(
            "RSS from the 10th window to the 1000th (250 ms windows, churn): {:+.1}% at worst (peak {} MiB), within 5%: {}",
            100.0 * worst,
            soak_peak >> 10,
            if worst.abs() <= 0.05 { "met" } else { "MISSED" }
        ),
    ];
    md.push('\n');
    for v in &verdicts {
        let _ = writeln!(md, "- {v}");
        eprintln!("xtask: {v}");
    }
    std::fs::write(dir.join("soak.md"), &md)?;
    std::fs::write(
        dir.join("soak.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "minute_windows": minute.iter().map(|(n, r)| serde_json::json!({"window": n, "rss_kib": r})).collect::<Vec<_>>(),
            "short_windows": soak.iter().map(|(n, r)| serde_json::json!({"window": n, "rss_kib": r})).collect::<Vec<_>>(),
            "steady_rss_kib": steady,
            "minute_windows_peak_rss_kib": minute_peak,
            "short_windows_peak_rss_kib": soak_peak,
            "worst_change": worst,
        }))?,
    )?;
    eprintln!("xtask: wrote {}", dir.join("soak.md").display());
    Ok(())
}

pub fn bench(profiler: &Path, root: &Path) -> Result<()> {
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let _load = workloads(root, &dir, WINDOWS + 90)?;
    let (mut daemon, addr) = start_daemon(profiler, "1s")?;
    let pid = daemon.id();
    let windows = || windows_done(addr) as f64;
    // A busy minute's profile, asked for at window 20.
    let mut marks: Vec<(u64, f64, u64)> = Vec::new();
    let mut profile: Option<std::thread::JoinHandle<Result<Response>>> = None;
    let mut next = [10u64, 20, 50, 100, WINDOWS].into_iter().peekable();
    let t0 = Instant::now();
    while let Some(&at) = next.peek() {
        let n = windows() as u64;
        if n >= at {
            next.next();
            if at == 20 {
                profile = Some(std::thread::spawn(move || {
                    get(addr, "/debug/pprof/profile?seconds=60")
                }));
            } else {
                let (cpu, rss) = usage(pid);
                eprintln!("xtask: window {n}: daemon CPU {cpu:.2} s, RSS {rss} KiB");
                marks.push((n, cpu, rss));
            }
        }
        if t0.elapsed() > Duration::from_secs(WINDOWS * 3) {
            bail!(
                "the daemon made only {n} windows in {} s",
                t0.elapsed().as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (status, pprof) = profile
        .context("no profile was asked for")?
        .join()
        .map_err(|_| anyhow::anyhow!("profile thread panicked"))??;
    if status != 200 {
        bail!("profile request answered {status}");
    }
    // Time to serve /metrics.
    let mut times = Vec::new();
    let mut metrics_bytes = 0;
    for _ in 0..200 {
        let t = Instant::now();
        let (_, body) = get(addr, "/metrics")?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        metrics_bytes = body.len();
    }
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let p99 = times[times.len() * 99 / 100];
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    daemon.wait()?;

    // The peer: perf record -a -g at the same frequency, one minute.
    let data = dir.join("perf-daemon-peer.data");
    let before = crate::bench::children_cpu();
    let perf_ok = Command::new("perf")
        .args(["record", "-a", "-g", "-F", HZ, "-o"])
        .arg(&data)
        .args(["--", "sleep", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let perf_cpu = crate::bench::children_cpu() - before;
    let perf_bytes = std::fs::metadata(&data).map_or(0, |m| m.len());
    // perf's symbolized output of that minute, as the daemon makes one.
    let before = crate::bench::children_cpu();
    let _ = Command::new("perf")
        .args(["script", "-i"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let script_cpu = crate::bench::children_cpu() - before;

    let first = marks.first().copied().unwrap_or_default();
    let last = marks.last().copied().unwrap_or_default();
    let per_window_cpu = (last.1 - first.1) / (last.0 - first.0).max(1) as f64;
    let mut md = format!(
        "# Daemon bench (issue 5)\n\nBusy host: {} known-workload loops, Node.js, process churn; `profiler daemon --window 1s -F {HZ} --off-cpu`.\n\n| window | daemon CPU s (cumulative) | RSS KiB |\n|---|---|---|\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for (n, cpu, rss) in &marks {
        let _ = writeln!(md, "| {n} | {cpu:.2} | {rss} |");
    }
    let _ = write!(
        md,
        "\nDaemon CPU per 1 s window (windows {}..{}): {:.3} s = {:.1}% of one CPU.\n\
         RSS from window {} to {}: {} -> {} KiB ({:+.1}%).\n\
         /metrics: {metrics_bytes} bytes, served in {mean:.2} ms mean, {p99:.2} ms p99 (200 requests).\n\
         pprof profile of a busy minute (seconds=60): {} bytes gzipped.\n\
         Peer, same load, same minute: `perf record -a -g -F {HZ}`: {perf_cpu:.2} CPU s{}, perf.data {perf_bytes} bytes; `perf script` of it (symbolized): {script_cpu:.2} CPU s.\n\
         Ratio, daemon CPU per minute / perf record CPU per minute: {:.2}; / (perf record + perf script): {:.2}.\n",
        first.0,
        last.0,
        per_window_cpu,
        per_window_cpu * 100.0,
        first.0,
        last.0,
        first.2,
        last.2,
        100.0 * (last.2 as f64 - first.2 as f64) / first.2.max(1) as f64,
        pprof.len(),
        if perf_ok { "" } else { " (perf failed)" },
        per_window_cpu * 60.0 / perf_cpu.max(1e-9),
        per_window_cpu * 60.0 / (perf_cpu + script_cpu).max(1e-9),
    );
    std::fs::write(dir.join("daemon.md"), &md)?;
    std::fs::write(
        dir.join("daemon.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "marks": marks.iter().map(|(n, c, r)| serde_json::json!({"window": n, "cpu_s": c, "rss_kib": r})).collect::<Vec<_>>(),
            "cpu_per_window_s": per_window_cpu,
            "metrics_ms_mean": mean,
            "metrics_ms_p99": p99,
            "metrics_bytes": metrics_bytes,
            "pprof_minute_bytes": pprof.len(),
            "perf_record_cpu_s_minute": perf_cpu,
            "perf_data_bytes_minute": perf_bytes,
            "perf_script_cpu_s": script_cpu,
        }))?,
    )?;
    println!("{md}");
    eprintln!("xtask: wrote {}", dir.join("daemon.md").display());
    Ok(())
}
