//! `cargo xtask bench offcpu`: what off-CPU and event-loop tracing cost,
//! against libbpf-tools' offcputime, measured in the same run:
//! - the slowdown of `perf bench sched pipe` pinned to one CPU (about
//!   600,000 context switches a second here: the stress case) alone, under
//!   `profiler record` with off-CPU on and off, and under
//!   `offcputime -u -m 1000` (the same minimum as ours), in rounds of a
//!   rotating order; with the kernel cost per context switch of each;
//! - the cost of the event-loop tracing and of following requests on a
//!   Node HTTP server under autocannon: the profiler's CPU per request
//!   served, as a share of the server's own, with each on and off.
//!
//! Writes target/bench/offcpu.md and offcpu.json.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tests::node::{load, sigterm_and_wait, start_service};

use crate::bench_overhead::{enable_bpf_stats, mean_ci, prog_stats, stop, wait_for_line};

/// Round trips of the pipe bench per run.
const LOOPS: &str = "300000";

/// Seconds of `taskset -c 0 perf bench sched pipe`.
fn pipe_bench() -> Result<f64> {
    let out = Command::new("taskset")
        .args(["-c", "0", "perf", "bench", "sched", "pipe", "-l", LOOPS])
        .output()
        .context("perf bench (Debian: linux-perf) and taskset are needed")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Total time:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no total time in perf bench's output: {text}"))
}

/// One run of the pipe bench: its seconds, and the tool's kernel ns per
/// context switch (its switch program's).
struct Run {
    secs: f64,
    ns_per_switch: Option<f64>,
}

fn under_ours(profiler: &Path, out: &Path, extra: &[&str]) -> Result<Run> {
    let mut ours = Command::new(profiler)
        .arg("record")
        .args(extra)
        .arg("-o")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_for_line(ours.stderr.take().unwrap(), "profiler: recording")?;
    let secs = pipe_bench()?;
    stop(ours);
    let u: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("use.json"))?)?;
    let ns = u["profiler"]["programs"].as_array().and_then(|a| {
        a.iter()
            .find(|p| p["name"] == "offcpu_switch")
            .and_then(|p| p["ns_per_run"].as_f64())
    });
    Ok(Run {
        secs,
        ns_per_switch: ns,
    })
}

fn under_offcputime() -> Result<Run> {
    let stats = enable_bpf_stats()?;
    let mut peer = Command::new("offcputime")
        .args(["-u", "-m", "1000", "--stack-storage-size", "16384"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("offcputime (Debian: libbpf-tools) is needed")?;
    // It prints nothing when attached: give it the time it takes.
    std::thread::sleep(Duration::from_secs(2));
    let before = prog_stats(peer.id(), None);
    let secs = pipe_bench()?;
    let after = prog_stats(peer.id(), None);
    drop(stats);
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(peer.id() as i32, libc::SIGINT) };
    let _ = peer.wait();
    let runs = after.1.saturating_sub(before.1);
    Ok(Run {
        secs,
        ns_per_switch: (runs > 0).then(|| (after.0 - before.0) as f64 / runs as f64),
    })
}

/// CPU seconds (user + system) of a process so far.
pub(crate) fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), 3rd and later after the comm.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// The Node service under autocannon for 8 s, recorded with `extra`:
/// (requests, the server's CPU s, the profiler's CPU s, loop programs'
/// ns per run).
fn node_under(profiler: &Path, dir: &Path, extra: &[&str]) -> Result<(f64, f64, f64, Option<f64>)> {
    let (node, port) = start_service(dir, &[]);
    let mut warm = load(port, 3);
    warm.wait()?;
    let out = dir.join(format!("node-{}", extra.join("")));
    let mut ours = Command::new(profiler)
        .arg("record")
        .args(extra)
        .arg("-o")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_for_line(ours.stderr.take().unwrap(), "profiler: recording")?;
    let cpu0 = cpu_of(node.id());
    let ac = Command::new("node")
        .arg(tests::node::node_dir().join("node_modules/.bin/autocannon"))
        .args(["-c", "10", "-d", "8", "-j"])
        .arg(format!("http://127.0.0.1:{port}/docs/1"))
        .stderr(Stdio::null())
        .output()?;
    let server_cpu = cpu_of(node.id()) - cpu0;
    stop(ours);
    sigterm_and_wait(node);
    let v: serde_json::Value =
        serde_json::from_slice(&ac.stdout).context("autocannon -j printed no JSON")?;
    let requests = v["requests"]["total"]
        .as_f64()
        .context("no requests.total")?;
    let u: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("use.json"))?)?;
    let p = &u["profiler"];
    let ours_cpu =
        p["user_cpu_s"].as_f64().unwrap_or(0.0) + p["bpf_run_time_s"].as_f64().unwrap_or(0.0);
    let loop_ns = p["programs"].as_array().and_then(|a| {
        let l: Vec<f64> = a
            .iter()
            .filter(|p| p["name"] == "loop_enter" || p["name"] == "loop_exit")
            .filter_map(|p| p["ns_per_run"].as_f64())
            .collect();
        (!l.is_empty()).then(|| l.iter().sum::<f64>() / l.len() as f64)
    });
    Ok((requests, server_cpu, ours_cpu, loop_ns))
}

pub fn bench(profiler: &Path, root: &Path, rounds: usize) -> Result<()> {
    for tool in ["perf", "offcputime", "taskset"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            bail!("{tool} is needed: apt-get install linux-perf libbpf-tools util-linux");
        }
    }
    let dir = root.join("target/bench/offcpu");
    std::fs::create_dir_all(&dir)?;
    let mut md = String::from("# Off-CPU and event-loop bench (issue 12)\n\n");
    let mut json = serde_json::Map::new();

    // 1. perf bench sched pipe, one CPU.
    let names = [
        "alone",
        "profiler record (off-CPU on)",
        "profiler record --no-off-cpu",
        "offcputime -u -m 1000",
    ];
    let mut runs: Vec<Vec<Run>> = (0..names.len()).map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..names.len() {
            let t = (k + round) % names.len();
            let r = match t {
                0 => Run {
                    secs: pipe_bench()?,
                    ns_per_switch: None,
                },
                1 => under_ours(profiler, &dir.join("ours-on"), &[])?,
                2 => under_ours(profiler, &dir.join("ours-off"), &["--no-off-cpu"])?,
                _ => under_offcputime()?,
            };
            runs[t].push(r);
        }
        eprintln!("xtask: offcpu bench, round {} of {rounds} done", round + 1);
    }
    let slow = |t: usize| -> Vec<f64> {
        (0..rounds)
            .map(|r| 100.0 * (runs[t][r].secs / runs[0][r].secs - 1.0))
            .collect()
    };
    let _ = writeln!(
        md,
        "## perf bench sched pipe -l {LOOPS}, pinned to CPU 0\n\n{rounds} rounds, each alone and under every tool in a rotating order. \
         Slowdown = time under the tool / time alone in the same round - 1; mean [95% CI]. \
         Kernel ns per switch: ours offcpu_switch (use.json), offcputime its programs (BPF_ENABLE_STATS).\n\n\
         | tool | slowdown | per round | kernel ns per switch |\n|---|---|---|---|"
    );
    let alone: Vec<f64> = runs[0].iter().map(|r| r.secs).collect();
    json.insert("pipe_alone_s".into(), serde_json::json!(alone));
    for (t, name) in names.iter().enumerate().skip(1) {
        let d = slow(t);
        let (m, h) = mean_ci(&d);
        let ns: Vec<f64> = runs[t].iter().filter_map(|r| r.ns_per_switch).collect();
        let ns_mean = (!ns.is_empty()).then(|| ns.iter().sum::<f64>() / ns.len() as f64);
        let _ = writeln!(
            md,
            "| {name} | {m:+.1}% [{:+.1}, {:+.1}] | {} | {} |",
            m - h,
            m + h,
            d.iter()
                .map(|v| format!("{v:+.0}"))
                .collect::<Vec<_>>()
                .join(" "),
            ns_mean.map_or("-".into(), |n| format!("{n:.0}"))
        );
        json.insert(
            (*name).into(),
            serde_json::json!({
                "slowdown_pct": d, "mean_pct": m, "ci95_pct": [m - h, m + h],
                "secs": runs[t].iter().map(|r| r.secs).collect::<Vec<_>>(),
                "kernel_ns_per_switch": ns_mean,
            }),
        );
    }
    let diff: Vec<f64> = slow(1).iter().zip(slow(3)).map(|(o, p)| o - p).collect();
    let (m, h) = mean_ci(&diff);
    let verdict = format!(
        "target, ours no worse than offcputime: {} (ours minus offcputime {m:+.1} points [{:+.1}, {:+.1}])",
        if m - h <= 0.0 { "met" } else { "MISSED" },
        m - h,
        m + h
    );
    let _ = writeln!(md, "\n- {verdict}\n");
    json.insert("verdict".into(), verdict.clone().into());

    // 2. Event-loop tracing on a Node HTTP server under load.
    let mut node_rows = Vec::new();
    for (name, extra) in [
        ("event loops timed, requests followed", vec!["--no-off-cpu"]),
        (
            "requests followed",
            vec!["--no-off-cpu", "--no-event-loops"],
        ),
        (
            "neither",
            vec!["--no-off-cpu", "--no-event-loops", "--no-requests"],
        ),
    ] {
        let (requests, server, ours, loop_ns) = node_under(profiler, &dir, &extra)?;
        let share = ours / server.max(1e-9);
        node_rows.push((name, requests, server, ours, share, loop_ns));
    }
    let _ = writeln!(
        md,
        "## Event-loop tracing on the Node service (autocannon -c 10, 8 s)\n\n\
         Profiler CPU (userspace + eBPF) per request as a share of the server's CPU per request.\n\n\
         | capture | requests | server CPU s | profiler CPU s | profiler/server | loop programs ns per run |\n|---|---|---|---|---|---|"
    );
    for (name, requests, server, ours, share, loop_ns) in &node_rows {
        let _ = writeln!(
            md,
            "| {name} | {requests:.0} | {server:.2} | {ours:.3} | {:.2}% | {} |",
            100.0 * share,
            loop_ns.map_or("-".into(), |n| format!("{n:.0}"))
        );
        json.insert(
            format!("node/{name}"),
            serde_json::json!({"requests": requests, "server_cpu_s": server, "profiler_cpu_s": ours,
                "profiler_share_of_server": share, "loop_ns_per_run": loop_ns}),
        );
    }
    let cost = node_rows[0].4 - node_rows[1].4;
    let req_cost = node_rows[1].4 - node_rows[2].4;
    let _ = writeln!(
        md,
        "\nEvent-loop tracing: {:+.2} points of the server's CPU; following requests: {:+.2} points (differences of the rows; the host drifts by several points run to run, so read them with the programs' ns per run).",
        100.0 * cost,
        100.0 * req_cost
    );
    json.insert("node/event_loop_cost_points".into(), (100.0 * cost).into());
    json.insert(
        "node/requests_cost_points".into(),
        (100.0 * req_cost).into(),
    );

    std::fs::write(root.join("target/bench/offcpu.md"), &md)?;
    std::fs::write(
        root.join("target/bench/offcpu.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(json))?,
    )?;
    print!("{md}");
    eprintln!("bench offcpu: wrote target/bench/offcpu.md and offcpu.json");
    Ok(())
}
