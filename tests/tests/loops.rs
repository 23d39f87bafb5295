//! End-to-end: event-loop stalls of a real Node.js program that blocks its
//! loop at a known pace, against Node's own monitorEventLoopDelay measured
//! in the same run; and a Node.js loop that idles.

use std::{path::Path, time::Duration};

use tests::*;

/// `profiler record` of `node stall.js ARGS`: Node's JSON line and use.json.
fn record_node(
    dir: &Path,
    extra: &[&str],
    args: &[&str],
) -> (serde_json::Value, serde_json::Value) {
    let out_dir = dir.join("out");
    // No npm module needed.
    let script = workspace().join("tests/node/stall.js");
    let mut argv: Vec<&str> = extra.to_vec();
    argv.extend([
        "-o",
        out_dir.to_str().unwrap(),
        "--",
        "node",
        "--perf-basic-prof",
    ]);
    argv.push(script.to_str().unwrap());
    argv.extend(args);
    let out = record_ok(dir, &argv);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("node printed no result: {stdout}"));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    (serde_json::from_str(line).unwrap(), read_use(&out_dir))
}

/// The main thread's loop entry of process `pid` in use.json.
fn main_loop(u: &serde_json::Value, pid: u64) -> serde_json::Value {
    let loops = u["event_loops"]["loops"]
        .as_array()
        .expect("event_loops.loops");
    loops
        .iter()
        .find(|l| l["pid"].as_u64() == Some(pid) && l["tid"].as_u64() == Some(pid))
        .cloned()
        .unwrap_or_else(|| panic!("no loop of node's main thread {pid} in {loops:#?}"))
}

/// Five blocks of 150 ms, one every 500 ms: five stalls over a 100 ms
/// threshold, the worst within 10 ms of Node's own worst delay, and the
/// blocking function in at least 90% of stalls.folded.
#[test]
fn node_stalls_match_nodes_own_delay_monitor() {
    if !require_root("node_stalls_match_nodes_own_delay_monitor") {
        return;
    }
    let dir = scratch("loops-node-stalls");
    let (node, u) = record_node(
        &dir,
        &["--stall-threshold", "100ms"],
        &["block", "5", "150", "500"],
    );
    let pid = node["pid"].as_u64().unwrap();
    assert_eq!(node["blocks"].as_u64(), Some(5), "{node}");
    let l = main_loop(&u, pid);
    assert_eq!(l["stalls"].as_u64(), Some(5), "{l:#}");
    let worst = l["worst"][0]["duration_ms"].as_f64().unwrap();
    let theirs = node["max_delay_ms"].as_f64().unwrap();
    assert!(
        (worst - theirs).abs() <= 10.0,
        "worst stall {worst:.1} ms, Node's own worst delay {theirs:.1} ms"
    );
    assert!(l["turns"].as_u64().unwrap() > 50, "{l:#}");
    // Busy in JS: on the CPU, and it says where.
    let w = &l["worst"][0];
    assert!(w["on_cpu_ms"].as_f64().unwrap() > 0.8 * worst, "{w:#}");
    assert!(
        w["top_frames"][0]["frame"]
            .as_str()
            .is_some_and(|f| f.contains("blockTheLoop")),
        "{w:#}"
    );
    let folded = read_folded_file(&dir.join("out"), "stalls.folded");
    let (all, culprit) = folded
        .iter()
        .filter(|(line, _)| line.starts_with("node;"))
        .fold((0u64, 0u64), |(a, c), (line, us)| {
            (
                a + us,
                c + if line.contains("blockTheLoop") {
                    *us
                } else {
                    0
                },
            )
        });
    assert!(all > 0, "{folded:#?}");
    assert!(
        culprit as f64 >= 0.9 * all as f64,
        "blockTheLoop in {:.1}% of stalls.folded",
        100.0 * culprit as f64 / all as f64
    );
    assert!(
        std::fs::read_to_string(dir.join("out/stalls.svg"))
            .unwrap()
            .contains("Event-loop stalls flame graph")
    );
    // The stalls' time keeps its time: in timeline.json, five bursts of
    // about 150 ms, 500 ms apart, holding all of stalls.folded.
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/timeline.json")).unwrap())
            .unwrap();
    let spans: Vec<u64> = t["stalls"]["spans"]
        .as_array()
        .expect("timeline.json stalls")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let timed_us: u64 = spans.chunks(4).map(|c| c[3]).sum();
    let folded_us: u64 = folded.values().sum();
    assert!(
        timed_us.abs_diff(folded_us) <= folded_us / 100 + spans.len() as u64,
        "timed {timed_us} us, stalls.folded {folded_us} us"
    );
    let mut at: Vec<(u64, u64)> = spans.chunks(4).map(|c| (c[0], c[1])).collect();
    at.sort_unstable();
    // Bursts: intervals closer than 200 ms (20 slices) to the last one.
    let mut bursts: Vec<(u64, u64)> = Vec::new();
    for (a, b) in at {
        match bursts.last_mut() {
            Some(last) if a <= last.1 + 20 => last.1 = last.1.max(b),
            _ => bursts.push((a, b)),
        }
    }
    assert_eq!(bursts.len(), 5, "stall time in bursts (slices): {bursts:?}");
    assert!(
        bursts.iter().all(|(a, b)| b - a <= 20),
        "each burst within a 150 ms stall: {bursts:?}"
    );
    // In the report, selecting the first burst's range folds the stall
    // flame graph to that stall alone.
    let mut b = tests::browser::Browser::launch(1200, 900);
    b.open(&dir.join("out/report.html"), Duration::from_secs(30));
    assert!(b.errors.is_empty(), "page errors: {:?}", b.errors);
    let whole = b.eval("report.flames.stalls.root.value").as_f64().unwrap();
    assert!(
        (whole - folded_us as f64).abs() <= 1.0,
        "the page's stall graph {whole} us, stalls.folded {folded_us} us"
    );
    let (a, z) = bursts[0];
    let first = b
        .eval(&format!(
            "report.select({a}, {}), report.flames.stalls.root.value",
            z + 1
        ))
        .as_f64()
        .unwrap();
    assert!(
        first > 0.1 * whole && first < 0.4 * whole,
        "the first of five stalls: {first} us of {whole}"
    );
    assert!(b.errors.is_empty(), "page errors: {:?}", b.errors);
}

/// A loop that waits for a timer: idle, no stall.
#[test]
fn an_idle_node_loop_is_idle_not_stalled() {
    if !require_root("an_idle_node_loop_is_idle_not_stalled") {
        return;
    }
    let dir = scratch("loops-node-idle");
    let (node, u) = record_node(&dir, &["--stall-threshold", "100ms"], &["idle", "2"]);
    let pid = node["pid"].as_u64().unwrap();
    let l = main_loop(&u, pid);
    assert_eq!(l["stalls"].as_u64(), Some(0), "{l:#}");
    let p = u["offcpu"]["by_process"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64() == Some(pid))
        .cloned()
        .unwrap_or_else(|| panic!("node not in {:#}", u["offcpu"]));
    let by = &p["by_cause_s"];
    let idle = by["idle"].as_f64().unwrap();
    assert!(idle >= 1.5, "idle {idle:.2} s: {p:#}");
    // Its thread pools wait for work on condition variables, not locks.
    let busy: f64 = ["cpu", "lock", "disk", "sleep", "net", "pipe", "other"]
        .iter()
        .map(|c| by[c].as_f64().unwrap())
        .sum();
    assert!(busy < 0.1 * idle, "{p:#}");
}
