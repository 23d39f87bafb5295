//! Helpers for the end-to-end tests: find the profiler binary, build the
//! workloads from source, run `profiler record`, and read its folded stacks.
//!
//! The tests run the real binary as root against real processes; without
//! root they say they are skipped and why.

pub mod browser;
pub mod node;
pub mod watchdog;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The profiler binary: `$PROFILER_BIN` (set by `cargo xtask test`), or
/// `target/release/profiler`.
pub fn profiler_bin() -> PathBuf {
    let p = std::env::var_os("PROFILER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/release/profiler"));
    assert!(
        p.is_file(),
        "profiler binary {} not found: run the tests with `cargo xtask test` (it builds it first)",
        p.display()
    );
    p
}

/// True when running as root; otherwise prints why the test is skipped.
pub fn require_root(test: &str) -> bool {
    watchdog::arm();
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED {test}: needs root to load eBPF programs (CI runs as root)");
    }
    root
}

/// A fresh scratch directory under the target dir, removed first if it exists.
pub fn scratch(name: &str) -> PathBuf {
    watchdog::arm();
    let d = workspace().join("target/e2e").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compiles `tests/workloads/<src>` with gcc and the given flags into `dir`.
pub fn build_c(src: &str, out: &Path, flags: &[&str]) -> PathBuf {
    let status = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(workspace().join("tests/workloads").join(src))
        .status()
        .expect("gcc is needed to build the test workloads");
    assert!(status.success(), "gcc failed on {src}");
    out.to_path_buf()
}

/// Runs `profiler record ARGS` in the scratch directory `cwd` and returns
/// its output (asserting nothing).
pub fn record_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(profiler_bin())
        .current_dir(cwd)
        .arg("record")
        .args(args)
        .output()
        .expect("run profiler")
}

/// Like [`record_in`], panicking with the profiler's stderr unless it succeeded.
pub fn record_ok(cwd: &Path, args: &[&str]) -> Output {
    let out = record_in(cwd, args);
    assert!(
        out.status.success(),
        "profiler record {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Folded stacks read back: line (frames) to count.
pub fn read_folded(dir: &Path) -> BTreeMap<String, u64> {
    read_folded_file(dir, "stacks.folded")
}

/// A folded file of `dir` (`offcpu.folded`, `stalls.folded`) read back.
pub fn read_folded_file(dir: &Path, name: &str) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    text.lines()
        .map(|l| {
            let (stack, count) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad folded line {l:?}"));
            (
                stack.to_string(),
                count
                    .parse()
                    .unwrap_or_else(|_| panic!("bad count in {l:?}")),
            )
        })
        .collect()
}

/// Frames of a folded line with their `_[k]`/`_[i]`/`_[j]` annotation removed.
pub fn frames(line: &str) -> Vec<&str> {
    line.split(';')
        .map(|f| {
            f.strip_suffix("_[k]")
                .or_else(|| f.strip_suffix("_[i]"))
                .or_else(|| f.strip_suffix("_[j]"))
                .unwrap_or(f)
        })
        .collect()
}

/// Samples of the stacks rooted at `process` whose frames satisfy `pred`.
pub fn samples_where(
    folded: &BTreeMap<String, u64>,
    process: &str,
    pred: impl Fn(&[&str]) -> bool,
) -> u64 {
    folded
        .iter()
        .filter(|(l, _)| {
            let f = frames(l);
            f.first() == Some(&process) && pred(&f)
        })
        .map(|(_, c)| c)
        .sum()
}

/// Percentage helper.
pub fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// use.json read back.
pub fn read_use(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("use.json")).expect("use.json written");
    serde_json::from_str(&text).expect("use.json is JSON")
}

/// Starts `n` busy loops (shell `while :; do :; done`) that end by
/// themselves after `secs`.
pub fn busy_loops(n: usize, secs: u32) -> Vec<std::process::Child> {
    (0..n)
        .map(|_| {
            std::os::unix::process::CommandExt::process_group(
                Command::new("timeout").arg(secs.to_string()).args([
                    "sh",
                    "-c",
                    "while :; do :; done",
                ]),
                0,
            )
            .spawn()
            .expect("spawn busy loop")
        })
        .collect()
}

/// Online CPUs.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A `profiler record` running in the background.
pub struct Recording {
    child: std::process::Child,
    stderr: std::thread::JoinHandle<String>,
    early: String,
}

/// Reads a child's stderr until a line starting with `marker` (panicking
/// with what it said if it ends first); the rest is read by a thread.
fn read_until(
    child: &mut std::process::Child,
    marker: &str,
    what: &str,
) -> (String, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader};
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut early = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            let status = child.wait().unwrap();
            panic!("profiler {what} ended ({status}) before {marker:?}:\n{early}");
        }
        early.push_str(&line);
        if line.starts_with(marker) {
            break;
        }
    }
    let stderr = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
        rest
    });
    (early, stderr)
}

/// Children killed (and reaped) when dropped, even when a test fails;
/// with their process group when they lead one (the shell under a
/// `timeout` of [`busy_loops`] would otherwise spin on, orphaned).
pub struct KillOnDrop(pub Vec<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: kill(2) of a process group we made (ESRCH if the
            // child leads none).
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `profiler record ARGS` and returns once it says it is recording
/// (its programs are attached), so that events made after this are seen.
pub fn start_record(args: &[&str]) -> Recording {
    let mut child = Command::new(profiler_bin())
        .arg("record")
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run profiler");
    let (early, stderr) = read_until(
        &mut child,
        "profiler: recording",
        &format!("record {args:?}"),
    );
    Recording {
        child,
        stderr,
        early,
    }
}

impl Recording {
    /// The profiler's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ends the recording now (SIGINT, as Ctrl-C) and waits for its files.
    pub fn stop(self) -> String {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.finish()
    }

    /// Waits for the end, however it ends: exit code and stderr.
    pub fn wait_any(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        (status.code(), self.early + &self.stderr.join().unwrap())
    }

    /// Waits for the end; panics with stderr unless it succeeded.
    pub fn finish(mut self) -> String {
        let status = self.child.wait().unwrap();
        let err = self.early + &self.stderr.join().unwrap();
        assert!(
            status.success(),
            "profiler record failed ({status}):\n{err}"
        );
        err
    }
}

/// Shares of the known workload's functions (tests/workloads/known.c) in
/// a capture: work_alpha and work_beta under main, work_delta directly
/// under work_gamma under main; with the process's total samples.
pub struct KnownShares {
    /// work_alpha, %.
    pub alpha: f64,
    /// work_beta, %.
    pub beta: f64,
    /// work_gamma;work_delta, %.
    pub delta: f64,
    /// Samples of the process.
    pub total: u64,
}

/// Reads the known workload's shares from a capture directory.
pub fn known_shares(out_dir: &Path, process: &str) -> KnownShares {
    let folded = read_folded(out_dir);
    let total = samples_where(&folded, process, |_| true);
    let under_main =
        |name: &'static str| move |f: &[&str]| f.contains(&"main") && f.contains(&name);
    let share = |n: u64| pct(n, total);
    KnownShares {
        alpha: share(samples_where(&folded, process, under_main("work_alpha"))),
        beta: share(samples_where(&folded, process, under_main("work_beta"))),
        delta: share(samples_where(&folded, process, |f| {
            f.contains(&"main") && f.windows(2).any(|w| w == ["work_gamma", "work_delta"])
        })),
        total,
    }
}

/// Asserts the known workload's shares: 50/30/20, each within 3 points,
/// from at least `min_samples` samples.
pub fn assert_known_shares(what: &str, s: &KnownShares, min_samples: u64) {
    eprintln!(
        "{what}: alpha {:.1}% beta {:.1}% gamma;delta {:.1}% of {} samples",
        s.alpha, s.beta, s.delta, s.total
    );
    assert!(s.total >= min_samples, "{what}: only {} samples", s.total);
    for (name, got, want) in [
        ("work_alpha", s.alpha, 50.0),
        ("work_beta", s.beta, 30.0),
        ("work_gamma;work_delta", s.delta, 20.0),
    ] {
        assert!(
            (got - want).abs() <= 3.0,
            "{what}: {name} {got:.1}% of samples, expected {want}% ± 3"
        );
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `profiler daemon` running in the background; SIGTERM when dropped.
pub struct Daemon {
    child: Option<std::process::Child>,
    stderr: Option<std::thread::JoinHandle<String>>,
    early: String,
    /// Where it serves.
    pub addr: std::net::SocketAddr,
}

/// Starts `profiler daemon ARGS` serving on `addr` (added as `--listen`
/// unless `None`: the default), and returns once it serves.
pub fn start_daemon(listen: Option<std::net::SocketAddr>, args: &[&str]) -> Daemon {
    let mut cmd = Command::new(profiler_bin());
    cmd.arg("daemon").args(args);
    if let Some(a) = listen {
        cmd.arg("--listen").arg(a.to_string());
    }
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run profiler daemon");
    let (early, stderr) = read_until(
        &mut child,
        "profiler: daemon sampling",
        &format!("daemon {args:?}"),
    );
    Daemon {
        child: Some(child),
        stderr: Some(stderr),
        early,
        addr: listen.unwrap_or_else(|| "127.0.0.1:9464".parse().unwrap()),
    }
}

impl Daemon {
    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// `GET path`: status and body.
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        http_get(self.addr, path, std::time::Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("GET {path} from {}: {e}", self.addr))
    }

    /// SIGTERM, then its stderr; panics unless it exited 0.
    pub fn stop(mut self) -> String {
        self.terminate()
    }

    fn terminate(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return String::new();
        };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        let err = std::mem::take(&mut self.early)
            + &self
                .stderr
                .take()
                .map(|h| h.join().unwrap())
                .unwrap_or_default();
        assert!(
            status.success(),
            "profiler daemon failed ({status}):\n{err}"
        );
        err
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An HTTP GET (the project's one client, ureq): status code and body,
/// whatever the status; the connection must open within 5 s and the whole
/// answer arrive within `timeout`.
pub fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> Result<(u16, Vec<u8>), ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(std::time::Duration::from_secs(5)))
        .timeout_global(Some(timeout))
        .build()
        .into();
    let mut resp = agent.get(&format!("http://{addr}{path}")).call()?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_vec()?;
    Ok((status, body))
}

/// The detaching helpers of `record` still running: profiler processes
/// leading a session of their own, not yet zombies (a helper's memory,
/// and so /proc/PID/exe, is gone while it closes its files).
pub fn detaching_helpers() -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some((head, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            head.ends_with("(profiler")
                && f.first().is_some_and(|s| *s != "Z")
                && f.get(3).and_then(|s| s.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

/// The value of the line `name` (e.g. `"VmRSS:"`) of /proc/PID/status.
pub fn status_field(pid: u32, name: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
}

/// A `kB` line of /proc/PID/status (`"VmRSS:"`, `"VmHWM:"`), in KiB; 0
/// when the process is gone.
pub fn status_kib(pid: u32, name: &str) -> u64 {
    status_field(pid, name)
        .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The value of a sample line `name{labels} value` in a Prometheus
/// exposition, summed over the lines whose name and labels start with
/// `prefix`.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
