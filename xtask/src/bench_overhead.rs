//! `cargo xtask bench overhead`: what a system-wide capture costs, against
//! the peers installed from Debian (perf, bpftrace), measured in the same
//! run as ratios:
//! - the slowdown of a fixed CPU workload (tests/workloads/known.c, which
//!   counts the work it gets done in TSC-timed rounds) under a capture at
//!   99 and 999 Hz: ours, `bpftrace profile:hz`, `perf record -a -g`;
//! - the time from the end of a 10 s, 999 Hz capture of a busy host (a
//!   Node.js service among the load) to its flame graph written: ours,
//!   against `perf script | inferno-collapse-perf | inferno-flamegraph`;
//! - CPU seconds and peak RSS of each tool for that capture, our kernel
//!   cost per sample and per scheduler event, and the output sizes.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Seconds the fixed workload runs.
const WORK_S: &str = "10";

fn spins(stdout: &[u8]) -> f64 {
    String::from_utf8_lossy(stdout)
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0)
}

fn run_known(known: &Path) -> Result<f64> {
    let out = Command::new(known).arg(WORK_S).output()?;
    Ok(spins(&out.stdout))
}

fn stop(mut c: Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
    let _ = c.wait();
}

/// inferno's command-line tools, installed once under target/tools.
fn inferno(root: &Path) -> Result<PathBuf> {
    let bin = root.join("target/tools/bin");
    if !bin.join("inferno-flamegraph").is_file() {
        eprintln!("xtask: installing inferno's command-line tools into target/tools");
        crate::run(
            Command::new("cargo")
                .args(["install", "--locked", "inferno", "--root"])
                .arg(root.join("target/tools")),
        )?;
    }
    Ok(bin)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Runs a command to its end: its stderr, CPU seconds and peak RSS (KiB)
/// from wait4, which covers it and the descendants it waited for.
fn measured(cmd: &mut Command) -> Result<(String, f64, u64)> {
    use std::io::Read;
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err)?;
    let mut status = 0;
    // SAFETY: wait4 on our own child fills the status and the rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    if rc < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed: {err}");
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((err, tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_maxrss as u64))
}

pub fn bench(profiler: &Path, root: &Path) -> Result<()> {
    for (tool, pkg) in [("perf", "linux-perf"), ("bpftrace", "bpftrace")] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is needed: apt-get install {pkg}");
        }
    }
    let tools = inferno(root)?;
    let dir = root.join("target/bench/overhead");
    std::fs::create_dir_all(&dir)?;
    let known = dir.join("known");
    crate::bench::build_known(root, &known)?;
    let mut md = String::from("# Overhead bench (issue 6)\n\n");
    let mut json = serde_json::Map::new();

    // 1. Slowdown of the fixed workload under each tool.
    md.push_str("## Slowdown of a fixed CPU workload (10 s, one CPU of the host busy)\n\n| Hz | tool | work done (M spins) | slowdown |\n|---|---|---|---|\n");
    for hz in ["99", "999"] {
        let base = run_known(&known)?;
        let mut row = |tool: &str, work: f64| {
            let slow = 100.0 * (1.0 - work / base);
            let _ = writeln!(md, "| {hz} | {tool} | {:.0} | {slow:.1}% |", work / 1e6);
            eprintln!(
                "{hz:>4} Hz  {tool:24} work {:8.0}M  slowdown {slow:5.1}%",
                work / 1e6
            );
            json.insert(
                format!("slowdown/{hz}/{tool}"),
                serde_json::json!({"work": work, "baseline": base, "slowdown_pct": slow}),
            );
        };
        row("alone", base);
        let ours = Command::new(profiler)
            .args(["record", "-F", hz, "-d", "13", "-o"])
            .arg(dir.join(format!("ours-{hz}")))
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_secs(2));
        let w = run_known(&known)?;
        let _ = ours.wait_with_output();
        row("profiler record", w);
        let bt = Command::new("bpftrace")
            .args([
                "-e",
                &format!("profile:hz:{hz} {{ @[kstack, ustack, comm] = count(); }}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_secs(3));
        let w = run_known(&known)?;
        stop(bt);
        row("bpftrace profile:hz", w);
        let perf = Command::new("perf")
            .args(["record", "-a", "-g", "-F", hz, "-o"])
            .arg(dir.join(format!("perf-{hz}.data")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_secs(2));
        let w = run_known(&known)?;
        stop(perf);
        row("perf record -a -g", w);
    }

    // 2. A busy host, 10 s at 999 Hz: stop to flame graph.
    let load = |secs: u64| crate::bench::busy_host(root, &known, 1, secs);
    let kids = load(14)?;
    std::thread::sleep(Duration::from_secs(1));
    let out = dir.join("ours-busy");
    let (err, ours_cpu, ours_rss) = measured(
        Command::new(profiler)
            .args(["record", "-F", "999", "-d", "10", "-o"])
            .arg(&out),
    )?;
    for mut k in kids {
        let _ = k.wait();
    }
    let ours_ms: f64 = err
        .lines()
        .find_map(|l| l.strip_prefix("profiler: analysed and written in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("no 'analysed and written in' line")?;
    let use_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("use.json"))?)?;
    let programs = use_json["profiler"]["programs"].clone();
    let per = |name: &str| -> f64 {
        programs
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == name))
            .and_then(|p| p["ns_per_run"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let ours_bytes = dir_bytes(&out);

    let kids = load(14)?;
    std::thread::sleep(Duration::from_secs(1));
    let data = dir.join("perf-busy.data");
    let (_, record_cpu, record_rss) = measured(
        Command::new("perf")
            .args(["record", "-a", "-g", "-F", "999", "-o"])
            .arg(&data)
            .args(["--", "sleep", "10"]),
    )?;
    let t = Instant::now();
    let svg = dir.join("perf-busy.svg");
    let (_, pipeline_cpu, pipeline_rss) = measured(Command::new("sh").arg("-c").arg(format!(
        "perf script -i {} 2>/dev/null | {}/inferno-collapse-perf | {}/inferno-flamegraph > {}",
        data.display(),
        tools.display(),
        tools.display(),
        svg.display()
    )))?;
    let perf_ms = t.elapsed().as_secs_f64() * 1000.0;
    let perf_rss = record_rss.max(pipeline_rss);
    for mut k in kids {
        let _ = k.wait();
    }
    let perf_bytes = std::fs::metadata(&data)?.len() + std::fs::metadata(&svg)?.len();

    let _ = write!(
        md,
        "\n## A busy host (known workload + Node.js), 10 s at 999 Hz on every CPU\n\n\
         | | ours (`profiler record`) | perf record -a -g + perf script \\| inferno |\n|---|---|---|\n\
         | end of capture to flame graph written | {ours_ms:.0} ms | {perf_ms:.0} ms |\n\
         | ratio | {:.2} | 1 |\n\
         | CPU seconds, whole run | {ours_cpu:.2} | {:.2} (record {record_cpu:.2} + pipeline {pipeline_cpu:.2}) |\n\
         | peak RSS (largest process) | {} MiB | {} MiB |\n\
         | output bytes | {ours_bytes} (folded, SVG, JSON) | {perf_bytes} (perf.data + SVG) |\n\n\
         Our kernel-side cost (BPF_ENABLE_STATS): {:.0} ns per sample (sample_stack), {:.0} ns per sched_switch, {:.0} ns per sched_wakeup.\n\
         CPU and peak RSS: wait4's rusage of each tool's process (with the children it waited for).\n",
        ours_ms / perf_ms,
        record_cpu + pipeline_cpu,
        ours_rss / 1024,
        perf_rss / 1024,
        per("sample_stack"),
        per("sched_switch"),
        per("sched_wakeup"),
    );
    json.insert(
        "busy".into(),
        serde_json::json!({
            "ours_stop_to_svg_ms": ours_ms, "perf_inferno_stop_to_svg_ms": perf_ms,
            "ours_cpu_s": ours_cpu, "perf_record_cpu_s": record_cpu, "perf_pipeline_cpu_s": pipeline_cpu,
            "ours_peak_rss_kib": ours_rss, "ours_bytes": ours_bytes, "perf_bytes": perf_bytes,
            "ns_per_sample": per("sample_stack"), "ns_per_sched_switch": per("sched_switch"),
            "ns_per_sched_wakeup": per("sched_wakeup"),
        }),
    );
    let report = root.join("target/bench/overhead.md");
    std::fs::write(&report, &md)?;
    std::fs::write(
        root.join("target/bench/overhead.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("{md}");
    eprintln!("xtask: wrote {}", report.display());
    Ok(())
}
