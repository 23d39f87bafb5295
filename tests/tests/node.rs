//! Node.js on a real service (Express rendering Markdown with marked, from
//! npm: tests/node/) under a real load generator (autocannon), compared in
//! the same run with `perf record -g` (completeness, shares) and V8's own
//! `--cpu-prof` (names of inlined functions). V8 re-decides its inlining on
//! every run, so only same-run comparisons are fair.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tests::*;

/// The service's npm modules, installed by .ci/run (`npm ci` from the
/// lockfile; `cargo xtask test` does it too when they are missing).
fn node_dir() -> PathBuf {
    let d = workspace().join("tests/node");
    assert!(
        d.join("node_modules/express").is_dir() && d.join("node_modules/autocannon").is_dir(),
        "tests/node/node_modules is missing: run `npm ci --prefix tests/node` (cargo xtask test does)"
    );
    d
}

/// The service, started in `cwd` (where V8 writes its jitdump and CPU
/// profile) with `flags`; its port read from its first line of output.
fn start_service(cwd: &Path, flags: &[&str]) -> (Child, u16) {
    let mut child = Command::new("node")
        .current_dir(cwd)
        .args(flags)
        .arg(node_dir().join("server.js"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("node is needed (.ci/run installs it)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("the service printed {line:?}, not its port"));
    (child, port)
}

/// autocannon against the service for `secs`, 10 connections.
fn load(port: u16, secs: u32) -> Child {
    Command::new("node")
        .arg(node_dir().join("node_modules/.bin/autocannon"))
        .args(["-c", "10", "-d", &secs.to_string()])
        .arg(format!("http://127.0.0.1:{port}/docs/1"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn sigterm_and_wait(mut child: Child) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// A JS function's identity whatever tier ran it: `JS:*name file:line:col`
/// and `JS:name file:line:col` are the same function.
fn js_function(frame: &str) -> Option<String> {
    let f = frame
        .strip_suffix("_[j]")
        .or_else(|| frame.strip_suffix("_[i]"))
        .unwrap_or(frame);
    let rest = f.strip_prefix("JS:")?;
    let rest = rest.trim_start_matches(['*', '~', '^', '+']);
    let (_, place) = rest.rsplit_once(' ')?;
    // name file:line:col, the place being file:line:col.
    let mut it = place.rsplitn(3, ':');
    let (_col, _line) = (
        it.next()?.parse::<u32>().ok()?,
        it.next()?.parse::<u32>().ok()?,
    );
    Some(format!("JS:{rest}"))
}

/// Per function, the share (0..1) of the stacks holding a JS frame that
/// hold it, from (frames, count) pairs.
fn js_shares<'a>(stacks: impl Iterator<Item = (Vec<&'a str>, u64)>) -> HashMap<String, f64> {
    let mut total = 0u64;
    let mut per: HashMap<String, u64> = HashMap::new();
    for (frames, n) in stacks {
        let fns: HashSet<String> = frames.iter().filter_map(|f| js_function(f)).collect();
        if fns.is_empty() {
            continue;
        }
        total += n;
        for f in fns {
            *per.entry(f).or_default() += n;
        }
    }
    per.into_iter()
        .map(|(k, v)| (k, v as f64 / total.max(1) as f64))
        .collect()
}

/// A perf map read the way the profiler reads one: a later line replaces
/// the earlier ones it overlaps. perf 6.1 looks up the nearest start
/// instead and calls an address inside a newer, longer range that starts
/// before an older one `[unknown]`; judging its walks by its own look-ups
/// would count that against perf.
fn perf_map_names(path: &Path) -> BTreeMap<u64, (u64, String)> {
    let mut m: BTreeMap<u64, (u64, String)> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let mut p = line.splitn(3, ' ');
        let (Some(a), Some(s), Some(n)) = (p.next(), p.next(), p.next()) else {
            continue;
        };
        let (Ok(a), Ok(s)) = (u64::from_str_radix(a, 16), u64::from_str_radix(s, 16)) else {
            continue;
        };
        let end = a + s;
        let over: Vec<u64> = m
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > a)
            .map(|(k, _)| *k)
            .collect();
        for k in over {
            m.remove(&k);
        }
        m.insert(a, (end, n.to_string()));
    }
    m
}

/// perf script's stacks (leaf first), frames in perf maps named again
/// from the map (see [`perf_map_names`]).
fn perf_stacks(data: &Path, map: &BTreeMap<u64, (u64, String)>) -> Vec<Vec<String>> {
    let out = Command::new("perf")
        .args(["script", "-i"])
        .arg(data)
        .output()
        .expect("perf is needed (.ci/run installs linux-perf)");
    assert!(out.status.success(), "perf script failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut stacks = Vec::new();
    let mut cur: Option<Vec<String>> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            stacks.extend(cur.take());
            continue;
        }
        if !line.starts_with(['\t', ' ']) {
            stacks.extend(cur.take());
            cur = Some(Vec::new());
            continue;
        }
        let Some(frames) = cur.as_mut() else { continue };
        // "\t    7f99f0243b53 sym+0x13 (dso)"
        let l = line.trim();
        let Some((addr, rest)) = l.split_once(' ') else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        let (sym, dso) = rest.rsplit_once(" (").unwrap_or((rest, ""));
        let name = if dso.contains("/perf-") && dso.ends_with(".map)") {
            let a = if frames.is_empty() { addr } else { addr - 1 };
            map.range(..=a)
                .next_back()
                .filter(|(_, (end, _))| a < *end)
                .map_or("[unknown]".to_string(), |(_, (_, n))| n.clone())
        } else {
            sym.rsplit_once("+0x").map_or(sym, |(s, _)| s).to_string()
        };
        frames.push(name);
    }
    stacks.extend(cur);
    stacks
}

/// V8's own profile: one stack (outermost first) per sample, JS frames
/// named as the jitdump and perf map name them (1-based line and column).
fn cpu_profile_stacks(dir: &Path) -> Vec<(Vec<String>, u64)> {
    let path = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "cpuprofile"))
        .expect("node --cpu-prof wrote no .cpuprofile");
    let prof: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let nodes = prof["nodes"].as_array().unwrap();
    let mut parent: HashMap<u64, u64> = HashMap::new();
    let mut name: HashMap<u64, Option<String>> = HashMap::new();
    for n in nodes {
        let id = n["id"].as_u64().unwrap();
        for c in n["children"].as_array().into_iter().flatten() {
            parent.insert(c.as_u64().unwrap(), id);
        }
        let cf = &n["callFrame"];
        let url = cf["url"].as_str().unwrap_or("");
        name.insert(
            id,
            (!url.is_empty()).then(|| {
                format!(
                    "JS:{} {}:{}:{}",
                    cf["functionName"].as_str().unwrap_or(""),
                    url.strip_prefix("file://").unwrap_or(url),
                    cf["lineNumber"].as_u64().unwrap_or(0) + 1,
                    cf["columnNumber"].as_u64().unwrap_or(0) + 1
                )
            }),
        );
    }
    let mut counts: HashMap<u64, u64> = HashMap::new();
    for s in prof["samples"].as_array().unwrap() {
        *counts.entry(s.as_u64().unwrap()).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(leaf, n)| {
            let mut frames = Vec::new();
            let mut at = Some(leaf);
            while let Some(id) = at {
                frames.extend(name[&id].clone());
                at = parent.get(&id).copied();
            }
            frames.reverse();
            (frames, n)
        })
        .collect()
}

fn is_unknown(frame: &str) -> bool {
    frame.starts_with("[unknown") || frame.contains("+0x")
}

/// The service under autocannon, profiled by `profiler record` (default
/// unwinding), `perf record -g` and V8's `--cpu-prof` at once; Node writes
/// a perf map (for perf) and a jitdump with unwinding info (ours wins with
/// it). Ours must be as complete as perf's (unknown frames within a
/// point), agree with perf on every JS function perf puts on 5% of
/// samples or more (frames of JIT code only: perf maps cannot name
/// inlined functions), name JS frames with file and line, and, with the
/// inlined functions V8's debug info places, agree with V8's own profile
/// better than perf does.
#[test]
fn node_service_stacks_are_as_complete_as_perfs() {
    if !require_root("node_service_stacks_are_as_complete_as_perfs") {
        return;
    }
    let dir = scratch("node_service");
    let cwd = dir.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let (node, port) = start_service(
        &cwd,
        &[
            "--perf-basic-prof",
            "--perf-prof",
            "--perf-prof-unwinding-info",
            "--interpreted-frames-native-stack",
            "--cpu-prof",
        ],
    );
    let node_pid = node.id();
    let mut guard = KillOnDrop(vec![load(port, 16)]);
    // Warm: V8 compiles and inlines the hot paths first.
    std::thread::sleep(Duration::from_secs(3));
    let perf_data = dir.join("perf.data");
    let perf = Command::new("perf")
        .args(["record", "-q", "-g", "-F", "999", "-p"])
        .arg(node_pid.to_string())
        .arg("-o")
        .arg(&perf_data)
        .args(["--", "sleep", "8"])
        .stderr(Stdio::null())
        .spawn()
        .expect("perf is needed (.ci/run installs linux-perf)");
    let out_dir = dir.join("out");
    let rec = record_ok(
        &dir,
        &[
            "-F",
            "999",
            "-d",
            "8",
            "-p",
            &node_pid.to_string(),
            "-o",
            out_dir.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&rec.stderr).into_owned();
    let mut perf = perf;
    assert!(perf.wait().unwrap().success(), "perf record failed");
    for c in guard.0.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    guard.0.clear();
    sigterm_and_wait(node);
    eprintln!("{stderr}");

    let folded = read_folded(&out_dir);
    let ours_total: u64 = folded.values().sum();
    assert!(ours_total > 2000, "too few samples: {ours_total}\n{stderr}");
    let ours_unknown: u64 = folded
        .iter()
        .filter(|(l, _)| l.split(';').any(is_unknown))
        .map(|(_, n)| n)
        .sum();
    let map = perf_map_names(Path::new(&format!("/tmp/perf-{node_pid}.map")));
    let perf_st = perf_stacks(&perf_data, &map);
    let perf_total = perf_st.len() as u64;
    assert!(perf_total > 2000, "perf took too few samples: {perf_total}");
    let perf_unknown = perf_st
        .iter()
        .filter(|s| s.iter().any(|f| is_unknown(f)))
        .count() as u64;
    let (ours_pct, perf_pct) = (pct(ours_unknown, ours_total), pct(perf_unknown, perf_total));
    eprintln!(
        "samples with an unknown frame: ours {ours_pct:.2}% of {ours_total}, perf -g {perf_pct:.2}% of {perf_total}"
    );
    assert!(
        ours_pct <= perf_pct + 1.0,
        "ours {ours_pct:.2}% of samples with an unknown frame, perf -g {perf_pct:.2}%"
    );

    // Every JS function perf puts on 5% or more: within 5 points, by the
    // frames of JIT code (not the inlined ones, which perf cannot see).
    let ours_jit = js_shares(
        folded
            .iter()
            .map(|(l, n)| (l.split(';').filter(|f| f.ends_with("_[j]")).collect(), *n)),
    );
    let perf_shares = js_shares(
        perf_st
            .iter()
            .map(|s| (s.iter().map(String::as_str).collect(), 1)),
    );
    let mut compared = 0;
    for (f, p) in perf_shares.iter().filter(|(_, p)| **p >= 0.05) {
        let o = ours_jit.get(f).copied().unwrap_or(0.0);
        eprintln!("{f}: perf {:.1}%, ours {:.1}%", 100.0 * p, 100.0 * o);
        assert!(
            (o - p).abs() <= 0.05,
            "{f}: perf puts it on {:.1}% of samples, ours {:.1}%",
            100.0 * p,
            100.0 * o
        );
        compared += 1;
    }
    assert!(compared >= 5, "perf put only {compared} JS functions on 5%");

    // JS frames carry their file and line; some inlined JS functions are
    // shown as frames of their own.
    let js_frames: Vec<&str> = folded
        .keys()
        .flat_map(|l| l.split(';'))
        .filter(|f| f.starts_with("JS:"))
        .collect();
    assert!(
        js_frames.iter().all(|f| js_function(f).is_some()),
        "a JS frame without file:line:col: {:?}",
        js_frames.iter().find(|f| js_function(f).is_none())
    );
    let inlined: HashSet<&str> = js_frames
        .iter()
        .filter(|f| f.ends_with("_[i]"))
        .copied()
        .collect();
    assert!(!inlined.is_empty(), "no inlined JS frame from the jitdump");

    // Against V8's own profile of the same run: with inlined functions
    // shown, ours is closer to it than perf's, function by function.
    let v8 = js_shares(
        cpu_profile_stacks(&cwd)
            .iter()
            .map(|(f, n)| (f.iter().map(String::as_str).collect(), *n)),
    );
    let ours_all = js_shares(folded.iter().map(|(l, n)| (l.split(';').collect(), *n)));
    let (mut d_ours, mut d_perf) = (0.0, 0.0);
    let mut rows: Vec<(&String, &f64)> = v8.iter().filter(|(_, v)| **v >= 0.05).collect();
    rows.sort_by(|a, b| b.1.total_cmp(a.1));
    for (f, v) in &rows {
        let o = ours_all.get(*f).copied().unwrap_or(0.0);
        let p = perf_shares.get(*f).copied().unwrap_or(0.0);
        eprintln!(
            "V8 {:5.1}%  ours {:5.1}%  perf {:5.1}%  {f}",
            100.0 * **v,
            100.0 * o,
            100.0 * p
        );
        d_ours += (o - **v).abs();
        d_perf += (p - **v).abs();
    }
    eprintln!(
        "sum of distances to V8's shares over {} functions: ours {:.2}, perf {:.2}",
        rows.len(),
        d_ours,
        d_perf
    );
    assert!(rows.len() >= 5, "V8's profile has few JS functions");
    assert!(
        d_ours < d_perf,
        "ours is no closer to V8's own profile than perf's ({d_ours:.2} vs {d_perf:.2})"
    );
    // The jitdump was what named them (no perf map needed).
    assert!(
        stderr.contains("JIT frames walked with jitdump CFI"),
        "{stderr}"
    );
    let cfi_frames: u64 = stderr
        .split("; ")
        .find_map(|p| p.strip_suffix(" JIT frames walked with jitdump CFI"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(cfi_frames > 0, "no JIT frame walked with the jitdump's CFI");
}

/// `--unwind fp` on the same service: thousands of distinct stacks collide
/// in the kernel's stack map (16.6% of samples were dropped for it); the
/// collided ones now reach userspace as addresses, and none is lost.
#[test]
fn node_service_fp_stacks_are_not_dropped_on_collisions() {
    if !require_root("node_service_fp_stacks_are_not_dropped_on_collisions") {
        return;
    }
    let dir = scratch("node_fp");
    let cwd = dir.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let (node, port) = start_service(
        &cwd,
        &["--perf-basic-prof", "--interpreted-frames-native-stack"],
    );
    let node_pid = node.id();
    let _load = KillOnDrop(vec![load(port, 10)]);
    std::thread::sleep(Duration::from_secs(2));
    let out_dir = dir.join("out");
    let rec = record_ok(
        &dir,
        &[
            "-F",
            "999",
            "-d",
            "6",
            "--unwind",
            "fp",
            "-p",
            &node_pid.to_string(),
            "-o",
            out_dir.to_str().unwrap(),
        ],
    );
    sigterm_and_wait(node);
    let stderr = String::from_utf8_lossy(&rec.stderr);
    eprintln!("{stderr}");
    assert!(
        stderr.contains("stacks dropped: 0 user"),
        "user stacks dropped: {stderr}"
    );
    assert!(
        stderr.contains("sent to userspace as addresses"),
        "no collision in the stack map this run (fewer distinct stacks than expected): {stderr}"
    );
    let folded = read_folded(&out_dir);
    let total: u64 = folded.values().sum();
    let dropped: u64 = folded
        .iter()
        .filter(|(l, _)| l.split(';').any(|f| f == "[unknown: stack dropped]"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        dropped, 0,
        "{dropped} of {total} samples with a dropped user stack"
    );
    let named = folded
        .iter()
        .filter(|(l, _)| !l.split(';').any(is_unknown))
        .map(|(_, n)| n)
        .sum::<u64>();
    assert!(
        pct(named, total) > 95.0,
        "only {:.1}% of {total} samples fully named",
        pct(named, total)
    );
}

/// System-wide at 999 Hz while short-lived processes run (pgrep, ls, date
/// in a loop: sampled while ld.so and libc are being mapped), in both
/// unwinding modes: a walk that reaches an address in no mapping or not in
/// code ends there, with that one frame as its outermost; no run of
/// unknown frames.
#[test]
fn short_lived_processes_have_no_runs_of_unmapped_frames() {
    if !require_root("short_lived_processes_have_no_runs_of_unmapped_frames") {
        return;
    }
    let dir = scratch("short_lived");
    let churn = KillOnDrop(vec![
        Command::new("sh")
            .args([
                "-c",
                "end=$(( $(date +%s) + 12 )); while [ $(date +%s) -lt $end ]; do pgrep -f zzz-none >/dev/null; ls /usr/lib >/dev/null; date >/dev/null; done",
            ])
            .spawn()
            .unwrap(),
    ]);
    std::thread::sleep(Duration::from_millis(300));
    for mode in ["auto", "fp"] {
        let out_dir = dir.join(mode);
        record_ok(
            &dir,
            &[
                "-F",
                "999",
                "-d",
                "4",
                "--unwind",
                mode,
                "-o",
                out_dir.to_str().unwrap(),
            ],
        );
        let folded = read_folded(&out_dir);
        let bad =
            |f: &str| f == "[unknown: unmapped address]" || f.starts_with("[unknown: not code");
        let mut stopped = 0;
        for (line, n) in &folded {
            let user: Vec<&str> = line
                .split(';')
                .skip(1)
                .take_while(|f| !f.ends_with("_[k]"))
                .collect();
            let at: Vec<usize> = user
                .iter()
                .enumerate()
                .filter(|(_, f)| bad(f))
                .map(|(i, _)| i)
                .collect();
            assert!(
                at.len() <= 1 && at.first().is_none_or(|&i| i == 0),
                "{mode}: a walk went on past an address that is not code ({n} samples): {line}"
            );
            if !at.is_empty() {
                stopped += n;
            }
        }
        let total: u64 = folded.values().sum();
        let deepest = folded
            .keys()
            .map(|l| l.split(';').count())
            .max()
            .unwrap_or(0);
        eprintln!(
            "{mode}: {total} samples, {stopped} ending at an address that is not code; deepest stack {deepest} frames"
        );
        let processes: HashSet<&str> = folded.keys().filter_map(|l| l.split(';').next()).collect();
        assert!(
            ["pgrep", "ls", "date"]
                .iter()
                .any(|p| processes.contains(p)),
            "{mode}: no short-lived process sampled: {processes:?}"
        );
    }
    drop(churn);
}
