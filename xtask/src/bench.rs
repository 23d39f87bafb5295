//! `cargo xtask bench`: the profiler against its peers, measured in the
//! same run on this machine, as ratios. Needs root, perf (linux-perf).
//!
//! Unwinding (issue 4): the known workload built three ways (framed leaves,
//! shrink-wrapped leaves, no frame pointers), profiled at 999 Hz by
//! `profiler record --unwind fp|dwarf`, `perf record -g` and
//! `perf record --call-graph dwarf`: the function shares each one finds;
//! the CPU seconds each tool spends (profiler record against perf record +
//! perf script); bytes moved per sample; the workload's slowdown.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Result, bail};

/// Capture length: the same 10 s as `cargo xtask capture`.
const SECONDS: &str = "10";

/// CPU seconds (user + system) of waited-for children so far.
pub(crate) fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Run {
    stdout: String,
    stderr: String,
    cpu_s: f64,
}

fn run(cmd: &mut Command) -> Result<Run> {
    let before = children_cpu();
    let out = crate::checked(cmd.stdin(Stdio::null()))?;
    Ok(Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        cpu_s: children_cpu() - before,
    })
}

/// (alpha, beta, gamma;delta) shares from stacks given outermost first.
fn shares<'a>(stacks: impl Iterator<Item = (Vec<&'a str>, u64)>) -> [f64; 3] {
    let (mut total, mut a, mut b, mut d) = (0u64, 0u64, 0u64, 0u64);
    for (f, n) in stacks {
        total += n;
        let main = f.contains(&"main");
        if main && f.contains(&"work_alpha") {
            a += n;
        }
        if main && f.contains(&"work_beta") {
            b += n;
        }
        if main && f.windows(2).any(|w| w == ["work_gamma", "work_delta"]) {
            d += n;
        }
    }
    let p = |x: u64| {
        if total == 0 {
            0.0
        } else {
            100.0 * x as f64 / total as f64
        }
    };
    [p(a), p(b), p(d)]
}

fn folded_shares(path: &Path) -> Result<[f64; 3]> {
    let text = std::fs::read_to_string(path)?;
    Ok(shares(text.lines().filter_map(|l| {
        let (stack, n) = l.rsplit_once(' ')?;
        let frames = stack
            .split(';')
            .map(|f| f.trim_end_matches("_[i]").trim_end_matches("_[k]"))
            .collect();
        Some((frames, n.parse().ok()?))
    })))
}

fn perf_script_shares(text: &str) -> [f64; 3] {
    let blocks: Vec<Vec<&str>> = text
        .split("\n\n")
        .map(|b| {
            let mut f: Vec<&str> = b
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(1))
                .map(|s| s.split("+0x").next().unwrap_or(s))
                .collect();
            f.reverse(); // perf script lists the leaf first
            f
        })
        .filter(|f| !f.is_empty())
        .collect();
    shares(blocks.into_iter().map(|f| (f, 1)))
}

/// The known workload (tests/workloads/known.c) with frame pointers, at `out`.
pub(crate) fn build_known(root: &Path, out: &Path) -> Result<()> {
    crate::run(
        Command::new("gcc")
            .args(["-O2", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(out)
            .arg(root.join("tests/workloads/known.c")),
    )
}

/// The busy host of the benches, for `secs`: `copies` of the known
/// workload (built at `known`), and a Node.js JIT workload when node is
/// installed (with the flags that name its frames).
pub(crate) fn busy_host(
    root: &Path,
    known: &Path,
    copies: usize,
    secs: u64,
) -> Result<Vec<std::process::Child>> {
    let mut kids = Vec::new();
    for _ in 0..copies {
        kids.push(
            Command::new(known)
                .arg(secs.to_string())
                .stdout(Stdio::null())
                .spawn()?,
        );
    }
    if Command::new("node").arg("--version").output().is_ok() {
        kids.push(
            Command::new("node")
                .args([
                    "--perf-basic-prof",
                    "--interpreted-frames-native-stack",
                    "--allow-natives-syntax",
                ])
                .arg(root.join("tests/workloads/busy.js"))
                .arg(secs.to_string())
                // --perf-basic-prof also writes V8's isolate log into the cwd.
                .current_dir(root.join("target"))
                .stdout(Stdio::null())
                .spawn()?,
        );
    }
    Ok(kids)
}

/// Work the known workload got done: the spins it prints ("N rounds M spins").
pub(crate) fn work(stdout: &str) -> f64 {
    stdout
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0)
}

/// Runs the unwinding bench; writes target/bench/report.{md,json}.
pub fn bench(profiler: &Path, root: &Path) -> Result<()> {
    if Command::new("perf").arg("--version").output().is_err() {
        bail!("perf is needed: apt-get install linux-perf");
    }
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let src = root.join("tests/workloads/known.c");
    let builds: [(&str, &[&str]); 3] = [
        (
            "framed",
            &[
                "-O2",
                "-g",
                "-fno-omit-frame-pointer",
                "-mno-omit-leaf-frame-pointer",
            ],
        ),
        (
            "shrink-wrapped",
            &["-O2", "-g", "-fno-omit-frame-pointer", "-DUNFRAMED_LEAVES"],
        ),
        ("no-fp", &["-O2", "-g", "-fomit-frame-pointer"]),
    ];
    let mut table: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut md = String::from(
        "# Unwinding bench (issue 4)\n\nKnown workload: expected shares alpha 50, beta 30, gamma;delta 20. 999 Hz, 10 s.\n\n| build | tool | alpha | beta | gamma;delta | tool CPU s | bytes/sample | workload spins (M) | slowdown |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, flags) in builds {
        let exe = dir.join(format!("known-{name}"));
        run(Command::new("gcc")
            .args(flags)
            .arg("-o")
            .arg(&exe)
            .arg(&src))?;
        let base = run(Command::new(&exe).arg(SECONDS))?;
        let base_rate = work(&base.stdout);
        let mut row = |tool: &str, sh: [f64; 3], cpu: f64, bytes: f64, rate: f64| {
            let slow = 100.0 * (1.0 - rate / base_rate);
            let _ = writeln!(
                md,
                "| {name} | {tool} | {:.1} | {:.1} | {:.1} | {cpu:.2} | {bytes:.0} | {:.0} | {slow:.1}% |",
                sh[0],
                sh[1],
                sh[2],
                rate / 1e6
            );
            eprintln!(
                "{name:15} {tool:28} alpha {:5.1} beta {:5.1} g;d {:5.1}  cpu {cpu:5.2}s  {bytes:6.0} B/sample  slowdown {slow:5.1}%",
                sh[0], sh[1], sh[2]
            );
            table.insert(
                format!("{name}/{tool}"),
                serde_json::json!({"alpha": sh[0], "beta": sh[1], "gamma_delta": sh[2], "tool_cpu_s": cpu, "bytes_per_sample": bytes, "workload_spins": rate, "slowdown_pct": slow}),
            );
        };
        for mode in ["fp", "dwarf"] {
            let out = dir.join(format!("ours-{name}-{mode}"));
            let r = run(Command::new(profiler)
                .args(["record", "-F", "999", "--unwind", mode, "-o"])
                .arg(&out)
                .args(["--", exe.to_str().unwrap(), SECONDS]))?;
            let bytes = r
                .stderr
                .lines()
                .find_map(|l| {
                    l.split("; ")
                        .find_map(|p| p.strip_suffix(" bytes of stack per sample"))
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0);
            let rate = work(&r.stdout);
            // The profiler's own CPU: its process, minus the workload's
            // (a child of it), measured alone above.
            row(
                &format!("profiler --unwind {mode}"),
                folded_shares(&out.join("stacks.folded"))?,
                r.cpu_s - base.cpu_s,
                bytes,
                rate,
            );
        }
        for (tool, cg) in [("perf -g", "fp"), ("perf --call-graph dwarf", "dwarf")] {
            let data = dir.join(format!("perf-{name}-{cg}.data"));
            let r = run(Command::new("perf")
                .args(["record", "-F", "999", "--call-graph", cg, "-o"])
                .arg(&data)
                .args(["--", exe.to_str().unwrap(), SECONDS]))?;
            let script = run(Command::new("perf").args(["script", "-i"]).arg(&data))?;
            let samples = script
                .stdout
                .split("\n\n")
                .filter(|b| !b.trim().is_empty())
                .count()
                .max(1);
            let bytes = std::fs::metadata(&data)?.len() as f64 / samples as f64;
            let rate = work(&r.stdout);
            row(
                &format!("{tool} (+ perf script)"),
                perf_script_shares(&script.stdout),
                r.cpu_s - base.cpu_s + script.cpu_s,
                bytes,
                rate,
            );
        }
    }
    md.push_str("\nSlowdown: loop iterations the workload got done in its 10 s, against a run alone (the workload spins for fixed times; the work it gets done in them falls with the profiler's in-context cost).\nTool CPU s: CPU time of the tool's own processes (record, plus perf script for perf), the workload's subtracted. Bytes/sample: ours, stack bytes copied per sample; perf, perf.data bytes per sample.\n");
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&table)?,
    )?;
    println!("{md}");
    eprintln!(
        "xtask: wrote {} and report.json",
        dir.join("report.md").display()
    );
    Ok(())
}
