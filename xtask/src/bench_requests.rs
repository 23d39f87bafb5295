//! `cargo xtask bench requests`: what following requests and connections
//! costs on a real Node service (tests/node/server.js, Express) under
//! autocannon, in rounds of a rotating order of three runs: `profiler
//! record` following requests, the same with `--no-requests`, and no
//! profiler at all. Per run: requests per second, the server's CPU, the
//! profiler's CPU (its process and its eBPF programs' run time), and the
//! request programs' runs and run time. Reports the profiler's CPU per
//! request as a share of the server's CPU per request (target: at most
//! 5%), what following requests adds to it, the kernel ns per syscall
//! event, and requests per second with and without, with their spread.
//!
//! Writes target/bench/requests.md and requests.json.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use tests::node::{load, sigterm_and_wait, start_service};

use crate::{
    bench_offcpu::cpu_of,
    bench_overhead::{mean_ci, stop, wait_for_line},
};

/// Seconds of autocannon per run.
const SECS: &str = "6";

/// One run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    requests: f64,
    req_per_s: f64,
    server_cpu_s: f64,
    profiler_cpu_s: f64,
    /// Runs of the req_* programs and their run time, ns.
    req_runs: f64,
    req_ns: f64,
}

/// The three configurations, in the order of the first round.
const CONFIGS: [(&str, Option<&[&str]>); 3] = [
    (
        "requests followed",
        Some(&["--no-off-cpu", "--no-event-loops"]),
    ),
    (
        "--no-requests",
        Some(&["--no-off-cpu", "--no-event-loops", "--no-requests"]),
    ),
    ("no profiler", None),
];

/// One run: the service under autocannon, recorded with `extra` (or not
/// recorded).
fn run(profiler: &Path, dir: &Path, port: u16, server: u32, extra: Option<&[&str]>) -> Result<Run> {
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    let ours = match extra {
        Some(extra) => {
            let mut c = Command::new(profiler)
                .arg("record")
                .args(extra)
                .arg("-o")
                .arg(&out)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            wait_for_line(c.stderr.take().unwrap(), "profiler: recording")?;
            Some(c)
        }
        None => None,
    };
    let cpu0 = cpu_of(server);
    let ac = Command::new("node")
        .arg(tests::node::node_dir().join("node_modules/.bin/autocannon"))
        .args(["-c", "10", "-d", SECS, "-j"])
        .arg(format!("http://127.0.0.1:{port}/docs/1"))
        .stderr(Stdio::null())
        .output()?;
    let server_cpu_s = cpu_of(server) - cpu0;
    let v: serde_json::Value =
        serde_json::from_slice(&ac.stdout).context("autocannon -j printed no JSON")?;
    let mut r = Run {
        requests: v["requests"]["total"]
            .as_f64()
            .context("no requests.total")?,
        req_per_s: v["requests"]["average"]
            .as_f64()
            .context("no requests.average")?,
        server_cpu_s,
        ..Default::default()
    };
    if let Some(c) = ours {
        stop(c);
        let u: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("use.json"))?)?;
        let p = &u["profiler"];
        r.profiler_cpu_s =
            p["user_cpu_s"].as_f64().unwrap_or(0.0) + p["bpf_run_time_s"].as_f64().unwrap_or(0.0);
        for prog in p["programs"].as_array().into_iter().flatten() {
            if prog["name"].as_str().is_some_and(|n| n.starts_with("req_")) {
                let runs = prog["runs"].as_f64().unwrap_or(0.0);
                r.req_runs += runs;
                r.req_ns += runs * prog["ns_per_run"].as_f64().unwrap_or(0.0);
            }
        }
    }
    Ok(r)
}

pub fn bench(profiler: &Path, root: &Path, rounds: usize) -> Result<()> {
    if Command::new("node").arg("--version").output().is_err() {
        bail!("bench requests needs node (and `npm ci --prefix tests/node`)");
    }
    let dir = root.join("target/bench/requests");
    std::fs::create_dir_all(&dir)?;
    let (node, port) = start_service(&dir, &[]);
    load(port, 3).wait()?;
    let mut runs: Vec<[Run; 3]> = Vec::new();
    for round in 0..rounds {
        let mut row = [Run::default(); 3];
        for k in 0..3 {
            let i = (round + k) % 3;
            row[i] = run(profiler, &dir, port, node.id(), CONFIGS[i].1)?;
            eprintln!(
                "bench requests: round {} {}: {:.0} req/s",
                round + 1,
                CONFIGS[i].0,
                row[i].req_per_s
            );
        }
        runs.push(row);
    }
    sigterm_and_wait(node);

    let mut md = format!(
        "# Following requests: cost on the Node service\n\n\
         autocannon -c 10 -d {SECS} on tests/node/server.js (`GET /docs/1`, Express), {rounds} rounds of a rotating order; profiler CPU = its process's user+system time and its eBPF programs' run time.\n\n\
         | round | capture | req/s | requests | server CPU s | profiler CPU s | profiler/server per request |\n|---|---|---|---|---|---|---|\n"
    );
    let share = |r: &Run| {
        (r.profiler_cpu_s / r.requests.max(1.0)) / (r.server_cpu_s / r.requests.max(1.0)).max(1e-12)
    };
    for (i, row) in runs.iter().enumerate() {
        for (k, r) in row.iter().enumerate() {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.2} | {:.3} | {} |",
                i + 1,
                CONFIGS[k].0,
                r.req_per_s,
                r.requests,
                r.server_cpu_s,
                r.profiler_cpu_s,
                if CONFIGS[k].1.is_some() {
                    format!("{:.2}%", 100.0 * share(r))
                } else {
                    "-".into()
                }
            );
        }
    }
    let col =
        |k: usize, f: &dyn Fn(&Run) -> f64| -> Vec<f64> { runs.iter().map(|r| f(&r[k])).collect() };
    let spread = |v: &[f64]| {
        let (m, h) = mean_ci(v);
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        format!("{m:.2} ± {h:.2} (min {lo:.2}, max {hi:.2})")
    };
    let with_share = col(0, &|r| 100.0 * share(r));
    let without_share = col(1, &|r| 100.0 * share(r));
    let added: Vec<f64> = with_share
        .iter()
        .zip(&without_share)
        .map(|(a, b)| a - b)
        .collect();
    let ns_per_event: Vec<f64> = col(0, &|r| r.req_ns / r.req_runs.max(1.0));
    let events_per_request: Vec<f64> = col(0, &|r| r.req_runs / r.requests.max(1.0));
    let rps: Vec<Vec<f64>> = (0..3).map(|k| col(k, &|r| r.req_per_s)).collect();
    // Paired per round: the change in req/s against no profiler.
    let change = |k: usize| -> Vec<f64> {
        rps[k]
            .iter()
            .zip(&rps[2])
            .map(|(a, b)| 100.0 * (a - b) / b.max(1e-9))
            .collect()
    };
    let (m_with, h_with) = mean_ci(&with_share);
    let verdict = format!(
        "target, profiler CPU per request at most 5% of the server's with requests followed: {} ({m_with:.2}% ± {h_with:.2})",
        if m_with + h_with <= 5.0 {
            "met"
        } else if m_with <= 5.0 {
            "met on the mean, not on the interval"
        } else {
            "MISSED"
        }
    );
    let _ = write!(
        md,
        "\n| figure (mean ± 95% CI, min, max over rounds) | value |\n|---|---|\n\
         | profiler/server CPU per request, requests followed (%) | {} |\n\
         | profiler/server CPU per request, --no-requests (%) | {} |\n\
         | added by following requests (points) | {} |\n\
         | kernel ns per syscall event (req_* programs) | {} |\n\
         | syscall events per request | {} |\n\
         | req/s, requests followed | {} |\n\
         | req/s, --no-requests | {} |\n\
         | req/s, no profiler | {} |\n\
         | req/s change, requests followed vs none (%) | {} |\n\
         | req/s change, --no-requests vs none (%) | {} |\n\
         \n- {verdict}\n",
        spread(&with_share),
        spread(&without_share),
        spread(&added),
        spread(&ns_per_event),
        spread(&events_per_request),
        spread(&rps[0]),
        spread(&rps[1]),
        spread(&rps[2]),
        spread(&change(0)),
        spread(&change(1)),
    );
    let json = serde_json::json!({
        "rounds": runs.iter().map(|row| row.iter().zip(CONFIGS).map(|(r, (name, _))| serde_json::json!({
            "capture": name, "req_per_s": r.req_per_s, "requests": r.requests,
            "server_cpu_s": r.server_cpu_s, "profiler_cpu_s": r.profiler_cpu_s,
            "req_program_runs": r.req_runs, "req_program_ns": r.req_ns,
        })).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "profiler_share_with_requests_pct": mean_ci(&with_share).0,
        "profiler_share_without_requests_pct": mean_ci(&without_share).0,
        "requests_added_points": mean_ci(&added).0,
        "kernel_ns_per_syscall_event": mean_ci(&ns_per_event).0,
        "syscall_events_per_request": mean_ci(&events_per_request).0,
        "req_per_s_change_pct": mean_ci(&change(0)).0,
        "verdict": verdict,
    });
    std::fs::write(root.join("target/bench/requests.md"), &md)?;
    std::fs::write(
        root.join("target/bench/requests.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    print!("{md}");
    eprintln!("bench requests: wrote target/bench/requests.md and requests.json");
    Ok(())
}
