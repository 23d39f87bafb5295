//! `cargo xtask bench startstop`: how fast `record` starts and stops
//! (issue 15), in the same run as perf:
//! - start: from spawning `profiler record -F 999` (system-wide) to its
//!   "recording" line, printed once every program is loaded, attached
//!   and sampling; use.json's `profiler.startup_ms` says where it went;
//! - stop on a busy host (the known workload and a Node.js program): from
//!   SIGINT after 10 s to the process's exit, against the analysis it
//!   reports ("analysed and written in"), and against perf's stop to a
//!   flame graph (`perf record -a -g` exiting after SIGINT, then `perf
//!   script | inferno-collapse-perf | inferno-flamegraph`);
//! - `record -F 999 -d 1 -p 1` on an idle host: wall time and CPU.
//!
//! Writes target/bench/startstop.md and startstop.json.

use std::{
    fmt::Write as _,
    io::BufRead,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::bench_overhead::mean_ci;

/// Seconds each capture of the busy host runs before SIGINT.
const BUSY_S: u64 = 10;

/// Waits (at most 10 s) until no detaching helper of an earlier capture
/// runs: a profiler process leading its own session, not a zombie. The
/// kernel lets one tracepoint go at a time, and a capture started
/// meanwhile waits for it: that is measured apart, not in each start.
fn wait_for_helpers() {
    let t = Instant::now();
    while !tests::detaching_helpers().is_empty() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigint(c: &Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
}

/// One start and stop of `record` on the busy host: (start s, stop-to-exit
/// s, analysis s as reported, startup_ms).
fn ours_busy(profiler: &Path, out: &Path) -> Result<(f64, f64, f64, serde_json::Value)> {
    let t = Instant::now();
    let mut c = Command::new(profiler)
        .args(["record", "-F", "999", "-o"])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufReader::new(c.stderr.take().unwrap()).lines();
    let start = loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("profiler: recording") => break t.elapsed(),
            Some(Ok(_)) => {}
            _ => bail!("record ended before it started recording"),
        }
    };
    std::thread::sleep(Duration::from_secs(BUSY_S));
    let t = Instant::now();
    sigint(&c);
    let mut analysis = None;
    for l in lines.map_while(Result::ok) {
        if let Some(rest) = l.strip_prefix("profiler: analysed and written in ") {
            analysis = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok());
        }
    }
    c.wait()?;
    let stop = t.elapsed();
    let use_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("use.json"))?)?;
    Ok((
        start.as_secs_f64(),
        stop.as_secs_f64(),
        analysis.context("no 'analysed and written in' line")? / 1000.0,
        use_json["profiler"]["startup_ms"].clone(),
    ))
}

/// perf on the busy host: SIGINT to perf record's exit, then the
/// pipeline to an SVG: (record's exit s, pipeline s).
fn perf_busy(tools: &Path, data: &Path, svg: &Path) -> Result<(f64, f64)> {
    let c = Command::new("perf")
        .args(["record", "-a", "-g", "-F", "999", "-q", "-o"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(BUSY_S));
    let t = Instant::now();
    sigint(&c);
    let mut c = c;
    c.wait()?;
    let exit = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "perf script -i {} 2>/dev/null | {}/inferno-collapse-perf | {}/inferno-flamegraph > {}",
            data.display(),
            tools.display(),
            tools.display(),
            svg.display()
        ))
        .status()?;
    if !status.success() {
        bail!("perf script | inferno failed");
    }
    Ok((exit, t.elapsed().as_secs_f64()))
}

fn stats(v: &[f64]) -> String {
    let (m, h) = mean_ci(v);
    format!(
        "{:.0} ms [{:.0}, {:.0}]",
        m * 1e3,
        (m - h) * 1e3,
        (m + h) * 1e3
    )
}

pub fn bench(profiler: &Path, root: &Path, rounds: usize) -> Result<()> {
    if Command::new("perf").arg("--version").output().is_err() {
        bail!("perf is needed: apt-get install linux-perf");
    }
    let tools = crate::installed_tool("inferno", "inferno-flamegraph")?;
    let dir = root.join("target/bench/startstop");
    std::fs::create_dir_all(&dir)?;
    let known = dir.join("known");
    crate::bench::build_known(root, &known)?;
    let mut md = String::from("# Start and stop bench (issue 15)\n\n");
    let mut json = serde_json::Map::new();

    // 1. Idle host: record -d 1, wall and CPU.
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    // One run: wall seconds.
    let idle_run = || -> Result<f64> {
        let t = Instant::now();
        let status = Command::new(profiler)
            .args(["record", "-F", "999", "-d", "1", "-p", "1", "-q", "-o"])
            .arg(dir.join("idle"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("record -d 1 -p 1 failed");
        }
        Ok(t.elapsed().as_secs_f64())
    };
    for _ in 0..rounds {
        wait_for_helpers();
        let cpu0 = crate::bench::children_cpu();
        walls.push(idle_run()?);
        cpus.push(crate::bench::children_cpu() - cpu0);
    }
    // Back to back: a capture started while the last one's helper still
    // lets its tracepoints go.
    let back_to_back = idle_run()?;
    let (wall, _) = mean_ci(&walls);
    let (cpu, _) = mean_ci(&cpus);
    let _ = writeln!(
        md,
        "## `record -F 999 -d 1 -p 1` on an idle host ({rounds} runs)\n\n\
         | | mean [95% CI] | target |\n|---|---|---|\n\
         | wall time | {} | 1200 ms: {} |\n| CPU (user + system) | {} | 100 ms: {} |\n\n\
         Each run starts once the last one's detaching helper is done; one started right after \
         another took {:.0} ms (it waits for the kernel to let the last one's tracepoints go).\n",
        stats(&walls),
        if wall <= 1.2 { "met" } else { "MISSED" },
        stats(&cpus),
        if cpu <= 0.1 { "met" } else { "MISSED" },
        back_to_back * 1e3,
    );
    json.insert(
        "idle_d1".into(),
        serde_json::json!({ "wall_s": walls, "cpu_s": cpus, "back_to_back_wall_s": back_to_back }),
    );

    // 2. Busy host: start, and stop against perf, round by round.
    let (mut starts, mut stops, mut analyses, mut margins) = (vec![], vec![], vec![], vec![]);
    let (mut perf_exits, mut perf_svgs, mut ratios) = (vec![], vec![], vec![]);
    let mut startup = Vec::new();
    for round in 0..rounds {
        wait_for_helpers();
        let load = crate::bench::busy_host(root, &known, 1, 2 * BUSY_S + 20)?;
        std::thread::sleep(Duration::from_secs(1));
        let (start, stop, analysis, parts) = ours_busy(profiler, &dir.join("ours"))?;
        let (perf_exit, perf_svg) =
            perf_busy(&tools, &dir.join("perf.data"), &dir.join("perf.svg"))?;
        for mut k in load {
            let _ = k.kill();
            let _ = k.wait();
        }
        eprintln!(
            "xtask: round {}: start {:.0} ms; stop to exit {:.0} ms (analysis {:.0} ms); perf stop to SVG {:.0} ms",
            round + 1,
            start * 1e3,
            stop * 1e3,
            analysis * 1e3,
            (perf_exit + perf_svg) * 1e3
        );
        starts.push(start);
        stops.push(stop);
        analyses.push(analysis);
        margins.push(stop - analysis);
        perf_exits.push(perf_exit);
        perf_svgs.push(perf_exit + perf_svg);
        ratios.push(stop / (perf_exit + perf_svg));
        startup.push(parts);
    }
    let (start, _) = mean_ci(&starts);
    let (margin, _) = mean_ci(&margins);
    let (ratio, ratio_h) = mean_ci(&ratios);
    // The start's parts, mean of the rounds.
    let mut parts: Vec<(String, f64)> = Vec::new();
    if let Some(first) = startup.first().and_then(|p| p.as_object()) {
        for k in first.keys() {
            let v: Vec<f64> = startup.iter().filter_map(|p| p[k].as_f64()).collect();
            parts.push((k.clone(), v.iter().sum::<f64>() / v.len().max(1) as f64));
        }
    }
    let _ = writeln!(
        md,
        "## A busy host (known workload + Node.js), system-wide at 999 Hz, {BUSY_S} s, {rounds} rounds\n\n\
         | | ours (`profiler record`) | perf record -a -g + perf script \\| inferno | target |\n|---|---|---|---|\n\
         | start: spawn to sampling | {} | - | 250 ms: {} |\n\
         | stop: SIGINT to exit | {} | {} (record's exit) | - |\n\
         | analysis (files written) | {} | - | - |\n\
         | stop to exit less the analysis | {} | - | 50 ms: {} |\n\
         | stop to flame graph | {} (all files) | {} | ours ≤ 0.25 × perf's: {} ({ratio:.2} [{:.2}, {:.2}]) |\n\n\
         Where the start went (use.json `profiler.startup_ms`, mean): {}.\n",
        stats(&starts),
        if start <= 0.25 { "met" } else { "MISSED" },
        stats(&stops),
        stats(&perf_exits),
        stats(&analyses),
        stats(&margins),
        if margin <= 0.05 { "met" } else { "MISSED" },
        stats(&stops),
        stats(&perf_svgs),
        if ratio <= 0.25 { "met" } else { "MISSED" },
        ratio - ratio_h,
        ratio + ratio_h,
        parts
            .iter()
            .map(|(k, v)| format!("{k} {v:.0} ms"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    json.insert(
        "busy".into(),
        serde_json::json!({
            "start_s": starts, "stop_to_exit_s": stops, "analysis_s": analyses,
            "perf_record_exit_s": perf_exits, "perf_stop_to_svg_s": perf_svgs,
            "ratio_to_perf": ratios, "startup_ms": startup,
        }),
    );
    let report = root.join("target/bench/startstop.md");
    std::fs::write(&report, &md)?;
    std::fs::write(
        root.join("target/bench/startstop.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("{md}");
    eprintln!("xtask: wrote {}", report.display());
    Ok(())
}
