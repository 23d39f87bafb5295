//! `cargo xtask bench node`: the profiler on the tests' real Node.js
//! service (Express + marked under autocannon, tests/node).
//!
//! - What Node's profiling flags cost the service: requests per second
//!   under autocannon with none, a perf map, a jitdump with unwinding
//!   info, rounds in a rotating order (the VM drifts between runs).
//! - Completeness and agreement, in one run: `profiler record`, `perf
//!   record -g` and V8's `--cpu-prof` at once: samples with an unknown
//!   frame, each JS function's share against perf's, and with inlined
//!   functions against V8's own profile.
//! - `--unwind fp` on the same service: stacks lost to collisions in the
//!   kernel's stack map (none: they are sent as addresses), counted.
//!
//! Writes target/bench/node.md and node.json.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tests::node::{load, same_run, sigterm_and_wait, start_service};

/// Node flag sets whose cost is measured.
const FLAG_SETS: [(&str, &[&str]); 3] = [
    ("none", &[]),
    (
        "perf map",
        &["--perf-basic-prof", "--interpreted-frames-native-stack"],
    ),
    (
        "jitdump + unwinding info",
        &[
            "--perf-prof",
            "--perf-prof-unwinding-info",
            "--interpreted-frames-native-stack",
        ],
    ),
];

/// Requests per second of the service started with `flags`, after a 3 s
/// warm-up, over 8 s of autocannon -c 10; and the service's RSS then.
fn throughput(dir: &Path, flags: &[&str]) -> Result<(f64, u64)> {
    let (node, port) = start_service(dir, flags);
    let mut warm = load(port, 3);
    warm.wait()?;
    let out = Command::new("node")
        .arg(tests::node::node_dir().join("node_modules/.bin/autocannon"))
        .args(["-c", "10", "-d", "8", "-j"])
        .arg(format!("http://127.0.0.1:{port}/docs/1"))
        .stderr(Stdio::null())
        .output()?;
    let rss = tests::rss_kib(node.id());
    sigterm_and_wait(node);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("autocannon -j printed no JSON")?;
    let rps = v["requests"]["average"]
        .as_f64()
        .context("no requests.average in autocannon's JSON")?;
    Ok((rps, rss))
}

pub fn bench(profiler: &Path, root: &Path) -> Result<()> {
    if Command::new("perf").arg("--version").output().is_err() {
        bail!("perf is needed: apt-get install linux-perf");
    }
    crate::node_modules(root)?;
    let dir = root.join("target/bench/node");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut md = String::from("# Node.js service bench (issue 10)\n\n");
    let mut json = serde_json::Map::new();

    // What the flags cost.
    const ROUNDS: usize = 3;
    let mut rps = vec![Vec::new(); FLAG_SETS.len()];
    let mut rss = vec![0u64; FLAG_SETS.len()];
    for round in 0..ROUNDS {
        for k in 0..FLAG_SETS.len() {
            let i = (k + round) % FLAG_SETS.len();
            let cwd = dir.join(format!("cost-{i}-{round}"));
            std::fs::create_dir_all(&cwd)?;
            let (r, m) = throughput(&cwd, FLAG_SETS[i].1)?;
            eprintln!("bench node: {} round {round}: {r:.0} req/s", FLAG_SETS[i].0);
            rps[i].push(r);
            rss[i] = rss[i].max(m);
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let base = mean(&rps[0]);
    md.push_str(&format!(
        "## What Node's flags cost the service\n\nautocannon -c 10 for 8 s after 3 s of warm-up, {ROUNDS} rounds in a rotating order; GET /docs/1 renders a Markdown document.\n\n| flags | req/s (mean) | rounds | vs none | RSS MiB |\n|---|---|---|---|---|\n"
    ));
    let mut cost = Vec::new();
    for (i, (name, flags)) in FLAG_SETS.iter().enumerate() {
        let m = mean(&rps[i]);
        let rounds: Vec<String> = rps[i].iter().map(|r| format!("{r:.0}")).collect();
        let shown = if flags.is_empty() {
            String::new()
        } else {
            format!(" (`{}`)", flags.join(" "))
        };
        writeln!(
            md,
            "| {name}{shown} | {m:.0} | {} | {:+.1}% | {} |",
            rounds.join(", "),
            100.0 * (m / base - 1.0),
            rss[i] >> 10
        )?;
        cost.push(
            serde_json::json!({"flags": name, "rps": rps[i], "rps_mean": m, "rss_kib": rss[i]}),
        );
    }
    json.insert("flag_cost".into(), cost.into());

    // Completeness and agreement, one run.
    let run = same_run(profiler, &dir.join("same-run"), 8, &[]);
    let (ours, perf) = run.unknown_pct();
    let ours_total: u64 = run.folded.values().sum();
    writeln!(
        md,
        "\n## One run, three profilers\n\nNode with `{}`; `profiler record -F 999 -d 8 -p PID` (default unwinding; the jitdump names JIT code), `perf record -g -F 999 -p PID` (perf map; its perf-map frames named again newest-wins, as perf 6.1's nearest-start look-up calls code laid over older code unknown) and V8's `--cpu-prof`, at once.\n\n| | samples | with an unknown frame |\n|---|---|---|\n| ours | {ours_total} | {ours:.2}% |\n| perf -g | {} | {perf:.2}% |\n\nJIT frames walked with jitdump CFI: {}.\n",
        tests::node::SAME_RUN_FLAGS.join(" "),
        run.perf.len(),
        run.jit_cfi_frames()
    )?;
    md.push_str("\n### JS functions perf puts on 5% or more (shares of samples with a JS frame; ours by JIT-code frames, as perf sees them)\n\nperf's range: where V8 laid new code over freed code, its map gave an address two functions' names, and such a frame counts for neither, then for both; V8's own profile is the second witness there.\n\n| function | perf | perf's range | ours | difference | V8 | ours with inlined |\n|---|---|---|---|---|---|---|\n");
    let mut worst: f64 = 0.0;
    for r in run.against_perf(0.05) {
        worst = worst.max((r.ours - r.perf).abs());
        writeln!(
            md,
            "| `{}` | {:.1}% | {:.1}-{:.1}% | {:.1}% | {:+.1} | {:.1}% | {:.1}% |",
            r.function,
            100.0 * r.perf,
            100.0 * r.perf_least,
            100.0 * r.perf_most,
            100.0 * r.ours,
            100.0 * (r.ours - r.perf),
            100.0 * r.v8,
            100.0 * r.ours_all
        )?;
    }
    writeln!(
        md,
        "\nLargest difference: {:.1} points; perf samples with a frame its map named twice: {} of {}.",
        100.0 * worst,
        run.perf_ambiguous(),
        run.perf.len()
    )?;
    md.push_str("\n### Against V8's own profile (functions V8 puts on 5% or more; ours with inlined frames)\n\n| function | V8 | ours | perf |\n|---|---|---|---|\n");
    let (mut d_ours, mut d_perf) = (0.0, 0.0);
    let rows = run.against_v8(0.05);
    for (f, v, o, p) in &rows {
        d_ours += (o - v).abs();
        d_perf += (p - v).abs();
        writeln!(
            md,
            "| `{f}` | {:.1}% | {:.1}% | {:.1}% |",
            100.0 * v,
            100.0 * o,
            100.0 * p
        )?;
    }
    writeln!(
        md,
        "\nSum of distances to V8's shares over {} functions: ours {d_ours:.2}, perf {d_perf:.2}.",
        rows.len()
    )?;
    json.insert(
        "same_run".into(),
        serde_json::json!({
            "ours_samples": ours_total, "ours_unknown_pct": ours,
            "perf_samples": run.perf.len(), "perf_unknown_pct": perf,
            "largest_difference_vs_perf": worst, "perf_ambiguous_samples": run.perf_ambiguous(),
            "distance_to_v8": {"ours": d_ours, "perf": d_perf, "functions": rows.len()},
            "jit_cfi_frames": run.jit_cfi_frames(),
        }),
    );

    // --unwind fp: collisions.
    let fp_dir = dir.join("fp");
    std::fs::create_dir_all(fp_dir.join("cwd"))?;
    let (node, port) = start_service(
        &fp_dir.join("cwd"),
        &["--perf-basic-prof", "--interpreted-frames-native-stack"],
    );
    let lg = tests::KillOnDrop(vec![load(port, 11)]);
    std::thread::sleep(Duration::from_secs(2));
    let out = Command::new(profiler)
        .args(["record", "-F", "999", "-d", "8", "--unwind", "fp", "-p"])
        .arg(node.id().to_string())
        .arg("-o")
        .arg(fp_dir.join("out"))
        .output()?;
    drop(lg);
    sigterm_and_wait(node);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = |prefix: &str| {
        stderr
            .lines()
            .find(|l| l.contains(prefix))
            .unwrap_or("(not printed)")
            .trim_start_matches("profiler: ")
            .to_string()
    };
    writeln!(
        md,
        "\n## `--unwind fp` on the same service (its own run, 8 s at 999 Hz)\n\n- {}\n- {}\n- {}\n",
        line("unique stacks"),
        line("stacks dropped"),
        line("sent to userspace as addresses")
    )?;
    json.insert(
        "fp".into(),
        serde_json::json!({"summary": [line("unique stacks"), line("stacks dropped"), line("sent to userspace as addresses")]}),
    );

    let bench_dir = root.join("target/bench");
    std::fs::write(bench_dir.join("node.md"), &md)?;
    std::fs::write(
        bench_dir.join("node.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    print!("{md}");
    eprintln!("bench node: wrote target/bench/node.md and node.json");
    Ok(())
}
