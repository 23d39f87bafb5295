//! The real Node.js service of the tests and benches (tests/node: Express
//! rendering Markdown with marked, under autocannon), and reading what
//! perf and V8's own profiler say of it, to compare in the same run.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{pct, read_folded, workspace};

/// `count` requests for `path` on 127.0.0.1:`port` at `rate` a second
/// over `conns` connections, kept (`keepalive`), one per request
/// (`close`) or kept and left idle (`linger`), by tests/node/load.js:
/// the client's own figures (`statuses`, `p50_ms`, `p99_ms`, ...).
pub fn load_js(
    port: u16,
    path: &str,
    count: u32,
    rate: u32,
    conns: u32,
    mode: &str,
) -> serde_json::Value {
    let out = Command::new("node")
        .arg(workspace().join("tests/node/load.js"))
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .args([
            &count.to_string(),
            &rate.to_string(),
            &conns.to_string(),
            mode,
        ])
        .output()
        .expect("node is needed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "load.js: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The service's npm modules, installed by .ci/run (`npm ci` from the
/// lockfile; `cargo xtask test` does it too when they are missing).
pub fn node_dir() -> PathBuf {
    let d = workspace().join("tests/node");
    assert!(
        d.join("node_modules/express").is_dir() && d.join("node_modules/autocannon").is_dir(),
        "tests/node/node_modules is missing: run `npm ci --prefix tests/node` (cargo xtask test does)"
    );
    d
}

/// The service, started in `cwd` (where V8 writes its jitdump and CPU
/// profile) with `flags`; its port read from its first line of output.
pub fn start_service(cwd: &Path, flags: &[&str]) -> (Child, u16) {
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
pub fn load(port: u16, secs: u32) -> Child {
    Command::new("node")
        .arg(node_dir().join("node_modules/.bin/autocannon"))
        .args(["-c", "10", "-d", &secs.to_string()])
        .arg(format!("http://127.0.0.1:{port}/docs/1"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

pub fn sigterm_and_wait(mut child: Child) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// A JS function's identity whatever tier ran it: `JS:*name file:line:col`
/// and `JS:name file:line:col` are the same function.
pub fn js_function(frame: &str) -> Option<String> {
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
pub fn js_shares<'a>(stacks: impl Iterator<Item = (Vec<&'a str>, u64)>) -> HashMap<String, f64> {
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
///
/// A perf map has no times: where V8 put new code over freed code, an
/// address has had two names and the map alone cannot say which one a
/// sample saw. The lines a later one replaced are kept, so that such a
/// frame can be judged by every name it may have had.
pub struct PerfMap {
    newest: BTreeMap<u64, (u64, String)>,
    replaced: Vec<(u64, u64, String)>,
}

impl PerfMap {
    pub fn read(path: &Path) -> PerfMap {
        let mut newest: BTreeMap<u64, (u64, String)> = BTreeMap::new();
        let mut replaced = Vec::new();
        for line in std::fs::read_to_string(path).unwrap().lines() {
            let mut p = line.splitn(3, ' ');
            let (Some(a), Some(s), Some(n)) = (p.next(), p.next(), p.next()) else {
                continue;
            };
            let (Ok(a), Ok(s)) = (u64::from_str_radix(a, 16), u64::from_str_radix(s, 16)) else {
                continue;
            };
            let end = a + s;
            let over: Vec<u64> = newest
                .range(..end)
                .rev()
                .take_while(|(_, (e, _))| *e > a)
                .map(|(k, _)| *k)
                .collect();
            for k in over {
                let (e, name) = newest.remove(&k).unwrap();
                replaced.push((k, e, name));
            }
            newest.insert(a, (end, n.to_string()));
        }
        PerfMap { newest, replaced }
    }

    /// The newest name of the code at `a` (`[unknown]` if none), and the
    /// other names older lines gave it.
    fn names(&self, a: u64) -> PerfFrame {
        let name = self
            .newest
            .range(..=a)
            .next_back()
            .filter(|(_, (end, _))| a < *end)
            .map_or("[unknown]".to_string(), |(_, (_, n))| n.clone());
        let mut also: Vec<String> = self
            .replaced
            .iter()
            .filter(|(s, e, n)| (*s..*e).contains(&a) && *n != name)
            .map(|(_, _, n)| n.clone())
            .collect();
        also.sort();
        also.dedup();
        PerfFrame { name, also }
    }
}

/// One frame of perf's: its name, and for code in a perf map, the other
/// names the map gave its address over the run.
#[derive(Debug, Clone)]
pub struct PerfFrame {
    pub name: String,
    pub also: Vec<String>,
}

/// perf script's stacks (leaf first), frames in perf maps named again
/// from the map (see [`PerfMap`]).
pub fn perf_stacks(data: &Path, map: &PerfMap) -> Vec<Vec<PerfFrame>> {
    let out = Command::new("perf")
        .args(["script", "-i"])
        .arg(data)
        .output()
        .expect("perf is needed (.ci/run installs linux-perf)");
    assert!(out.status.success(), "perf script failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut stacks = Vec::new();
    let mut cur: Option<Vec<PerfFrame>> = None;
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
        let frame = if dso.contains("/perf-") && dso.ends_with(".map)") {
            map.names(if frames.is_empty() { addr } else { addr - 1 })
        } else {
            PerfFrame {
                name: sym.rsplit_once("+0x").map_or(sym, |(s, _)| s).to_string(),
                also: Vec::new(),
            }
        };
        frames.push(frame);
    }
    stacks.extend(cur);
    stacks
}

/// V8's own profile: one stack (outermost first) per sample, JS frames
/// named as the jitdump and perf map name them (1-based line and column).
pub fn cpu_profile_stacks(dir: &Path) -> Vec<(Vec<String>, u64)> {
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

/// The JS functions a perf frame may be.
fn frame_functions(f: &PerfFrame) -> HashSet<String> {
    std::iter::once(&f.name)
        .chain(&f.also)
        .filter_map(|n| js_function(n))
        .collect()
}

/// One JS function of [`SameRun::against_perf`]: shares (0..1) of samples
/// holding a JS frame.
pub struct PerfRow {
    pub function: String,
    /// perf's, by the newest names of its map.
    pub perf: f64,
    /// perf's at least and at most: a frame of code the map gave two
    /// functions' names counted for neither, then for both.
    pub perf_least: f64,
    pub perf_most: f64,
    /// Ours, by frames of JIT code.
    pub ours: f64,
    /// Ours with inlined frames, and V8's own profile's.
    pub ours_all: f64,
    pub v8: f64,
}

impl PerfRow {
    /// Whether ours agrees with perf's within `points` (0..1): with its
    /// share by the newest names, or, where the map named the same code
    /// twice, anywhere in perf's range if V8's own profile agrees with
    /// ours too. A second witness, not a wider range: perf's map alone
    /// cannot say which name a sample saw, V8's profile can.
    pub fn agrees(&self, points: f64) -> bool {
        let in_range =
            self.ours >= self.perf_least - points && self.ours <= self.perf_most + points;
        (self.ours - self.perf).abs() <= points
            || (in_range && (self.ours_all - self.v8).abs() <= points)
    }
}

pub fn is_unknown(frame: &str) -> bool {
    frame.starts_with("[unknown") || frame.contains("+0x")
}

/// What one run of the service said, profiled three ways at once.
pub struct SameRun {
    /// Our folded stacks.
    pub folded: BTreeMap<String, u64>,
    /// Our stderr.
    pub stderr: String,
    /// perf -g's stacks (leaf first).
    pub perf: Vec<Vec<PerfFrame>>,
    /// V8's own profile (outermost first, JS frames only).
    pub v8: Vec<(Vec<String>, u64)>,
}

/// Node flags for the same-run comparison: a perf map for perf, a jitdump
/// with unwinding info for us, and V8's own profile.
pub const SAME_RUN_FLAGS: &[&str] = &[
    "--perf-basic-prof",
    "--perf-prof",
    "--perf-prof-unwinding-info",
    "--interpreted-frames-native-stack",
    "--cpu-prof",
];

/// The service under autocannon, warmed for 3 s, then profiled for `secs`
/// by `profiler record -F 999 -p PID` (`profiler` the binary, `extra` more
/// arguments), `perf record -g -F 999 -p PID` and V8's `--cpu-prof`, all
/// at once, in `dir`.
pub fn same_run(profiler: &Path, dir: &Path, secs: u32, extra: &[&str]) -> SameRun {
    let cwd = dir.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let (node, port) = start_service(&cwd, SAME_RUN_FLAGS);
    let node_pid = node.id();
    let load = crate::KillOnDrop(vec![load(port, secs + 8)]);
    // Warm: V8 compiles and inlines the hot paths first.
    std::thread::sleep(Duration::from_secs(3));
    let perf_data = dir.join("perf.data");
    let mut perf = Command::new("perf")
        .args(["record", "-q", "-g", "-F", "999", "-p"])
        .arg(node_pid.to_string())
        .arg("-o")
        .arg(&perf_data)
        .args(["--", "sleep", &secs.to_string()])
        .stderr(Stdio::null())
        .spawn()
        .expect("perf is needed (.ci/run installs linux-perf)");
    let out_dir = dir.join("out");
    let rec = Command::new(profiler)
        .current_dir(dir)
        .args(["record", "-F", "999", "-d", &secs.to_string(), "-p"])
        .arg(node_pid.to_string())
        .arg("-o")
        .arg(&out_dir)
        .args(extra)
        .output()
        .expect("run profiler");
    let stderr = String::from_utf8_lossy(&rec.stderr).into_owned();
    assert!(rec.status.success(), "profiler record failed:\n{stderr}");
    assert!(perf.wait().unwrap().success(), "perf record failed");
    // The load ends before the service, so that it exits idle.
    drop(load);
    sigterm_and_wait(node);
    let map = PerfMap::read(Path::new(&format!("/tmp/perf-{node_pid}.map")));
    SameRun {
        folded: read_folded(&out_dir),
        stderr,
        perf: perf_stacks(&perf_data, &map),
        v8: cpu_profile_stacks(&cwd),
    }
}

impl SameRun {
    /// Percent of our samples, and of perf's, with an unknown frame.
    pub fn unknown_pct(&self) -> (f64, f64) {
        let total: u64 = self.folded.values().sum();
        let unknown: u64 = self
            .folded
            .iter()
            .filter(|(l, _)| l.split(';').any(is_unknown))
            .map(|(_, n)| n)
            .sum();
        let perf_unknown = self
            .perf
            .iter()
            .filter(|s| s.iter().any(|f| is_unknown(&f.name)))
            .count() as u64;
        (
            pct(unknown, total),
            pct(perf_unknown, self.perf.len() as u64),
        )
    }

    /// Per JS function perf puts on `min` of samples or more (newest name
    /// first): perf's share and ours by frames of JIT code only, most first.
    pub fn against_perf(&self, min: f64) -> Vec<PerfRow> {
        let ours = js_shares(
            self.folded
                .iter()
                .map(|(l, n)| (l.split(';').filter(|f| f.ends_with("_[j]")).collect(), *n)),
        );
        let ours_all = self.our_shares();
        let v8 = self.v8_shares();
        let [newest, least, most] = self.perf_bounds();
        let share = |m: &HashMap<String, f64>, f: &str| m.get(f).copied().unwrap_or(0.0);
        let mut rows: Vec<PerfRow> = newest
            .iter()
            .filter(|(_, p)| **p >= min)
            .map(|(f, p)| PerfRow {
                function: f.clone(),
                perf: *p,
                perf_least: share(&least, f),
                perf_most: share(&most, f),
                ours: share(&ours, f),
                ours_all: share(&ours_all, f),
                v8: share(&v8, f),
            })
            .collect();
        rows.sort_by(|a, b| b.perf.total_cmp(&a.perf).then(a.function.cmp(&b.function)));
        rows
    }

    /// perf's samples with a frame of JIT code that the perf map gave two
    /// different JS functions' names.
    pub fn perf_ambiguous(&self) -> usize {
        self.perf
            .iter()
            .filter(|s| s.iter().any(|f| frame_functions(f).len() > 1))
            .count()
    }

    /// V8's own shares per JS function (inlined ones included).
    fn v8_shares(&self) -> HashMap<String, f64> {
        js_shares(
            self.v8
                .iter()
                .map(|(f, n)| (f.iter().map(String::as_str).collect(), *n)),
        )
    }

    /// Our shares per JS function, inlined frames included.
    fn our_shares(&self) -> HashMap<String, f64> {
        js_shares(
            self.folded
                .iter()
                .map(|(l, n)| (l.split(';').collect(), *n)),
        )
    }

    fn perf_shares(&self) -> HashMap<String, f64> {
        let [newest, _, _] = self.perf_bounds();
        newest
    }

    /// Per JS function, the share (0..1) of perf's samples holding a JS
    /// frame that hold it: by the newest names, and at least and at most,
    /// a frame whose address had two functions' names counting for either.
    fn perf_bounds(&self) -> [HashMap<String, f64>; 3] {
        let mut total = 0u64;
        let mut counts: [HashMap<String, u64>; 3] = Default::default();
        for s in &self.perf {
            let newest: HashSet<String> = s.iter().filter_map(|f| js_function(&f.name)).collect();
            let mut least = HashSet::new();
            let mut most = HashSet::new();
            for f in s {
                let fns = frame_functions(f);
                if fns.len() == 1 {
                    least.extend(fns.iter().cloned());
                }
                most.extend(fns);
            }
            if most.is_empty() {
                continue;
            }
            total += 1;
            for (c, set) in counts.iter_mut().zip([newest, least, most]) {
                for f in set {
                    *c.entry(f).or_default() += 1;
                }
            }
        }
        counts.map(|c| {
            c.into_iter()
                .map(|(k, v)| (k, v as f64 / total.max(1) as f64))
                .collect()
        })
    }

    /// Per JS function V8 puts on `min` or more: (V8's share, ours with
    /// inlined frames, perf's), most first.
    pub fn against_v8(&self, min: f64) -> Vec<(String, f64, f64, f64)> {
        let v8 = self.v8_shares();
        let ours = self.our_shares();
        let perf = self.perf_shares();
        let mut rows: Vec<(String, f64, f64, f64)> = v8
            .iter()
            .filter(|(_, v)| **v >= min)
            .map(|(f, v)| {
                (
                    f.clone(),
                    *v,
                    ours.get(f).copied().unwrap_or(0.0),
                    perf.get(f).copied().unwrap_or(0.0),
                )
            })
            .collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        rows
    }

    /// JIT frames the run walked with jitdump CFI (from the summary).
    pub fn jit_cfi_frames(&self) -> u64 {
        self.stderr
            .split("; ")
            .find_map(|p| p.strip_suffix(" JIT frames walked with jitdump CFI"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}
