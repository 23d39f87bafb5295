//! End-to-end: the USE signals against real events — run-queue saturation
//! from more busy loops than CPUs, TCP retransmits through a lossy firewall
//! rule in a network namespace, an OOM kill in a memory cgroup.

use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use tests::*;

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").args(["-c", cmd]).output().expect("sh")
}

fn sh_ok(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Idle, then three busy loops per CPU: the depth rises to the expected
/// two waiting tasks per CPU, the waits lengthen, utilization is full.
#[test]
fn runqueue_saturation_is_measured() {
    if !require_root("runqueue_saturation_is_measured") {
        return;
    }
    let dir = scratch("runq");
    let idle = dir.join("idle");
    record_ok(
        &dir,
        &["--no-stacks", "-d", "2", "-o", idle.to_str().unwrap()],
    );
    let idle = read_use(&idle);

    let cpus = online_cpus();
    let loops = busy_loops(3 * cpus, 6);
    thread::sleep(Duration::from_millis(500));
    let busy_dir = dir.join("busy");
    let out = record_ok(
        &dir,
        &["--no-stacks", "-d", "3", "-o", busy_dir.to_str().unwrap()],
    );
    for mut l in loops {
        let _ = l.wait();
    }
    let busy = read_use(&busy_dir);
    // The profiler's own cost, measured in the run: its programs' kernel
    // time (BPF_ENABLE_STATS), its CPU and memory, as shares.
    let own = &busy["profiler"];
    assert!(own["bpf_runs"].as_u64().unwrap_or(0) > 100, "{own}");
    assert!(own["bpf_ns_per_run"].as_f64().unwrap_or(0.0) > 0.0, "{own}");
    let share = own["share_of_cpu"].as_f64().unwrap();
    assert!(share > 0.0 && share < 0.5, "{own}");
    assert!(own["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{own}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("profiler: own cost: eBPF"), "{stderr}");
    // The statistics were ours for the run only, not a sysctl left on.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
            .unwrap()
            .trim(),
        "0"
    );
    assert!(
        !busy_dir.join("stacks.folded").exists(),
        "--no-stacks wrote stacks"
    );

    let depth = |v: &serde_json::Value| {
        v["cpu"]["runqueue_depth"]["mean"]
            .as_f64()
            .expect("depth mean")
    };
    let p50 = |v: &serde_json::Value| {
        v["cpu"]["runqueue_latency_us"]["p50"]
            .as_u64()
            .expect("latency p50")
    };
    let util = |v: &serde_json::Value| v["cpu"]["utilization"].as_f64().expect("utilization");
    eprintln!(
        "idle: depth {:.2}, p50 {} us, util {:.2}; busy: depth {:.2}, p50 {} us, util {:.2}",
        depth(&idle),
        p50(&idle),
        util(&idle),
        depth(&busy),
        p50(&busy),
        util(&busy)
    );
    // 3 runnable tasks per CPU: 2 waiting while 1 runs.
    let expected = 2.0;
    assert!(
        (depth(&busy) - expected).abs() <= 0.5,
        "depth {:.2}, expected {expected} ± 0.5",
        depth(&busy)
    );
    assert!(depth(&idle) < 0.5, "idle depth {:.2}", depth(&idle));
    assert!(
        p50(&busy) >= 1000,
        "busy p50 {} us: three CPU hogs per CPU wait milliseconds",
        p50(&busy)
    );
    assert!(p50(&busy) > 4 * p50(&idle).max(1));
    assert!(
        util(&busy) > 0.9,
        "utilization {:.2} with every CPU busy",
        util(&busy)
    );
    assert!(util(&idle) < 0.5, "idle utilization {:.2}", util(&idle));
    let hist = busy["cpu"]["runqueue_latency_us"]["histogram"]
        .as_array()
        .unwrap();
    assert!(hist.iter().all(|b| b["le"].is_u64() && b["count"].is_u64()));
    assert_eq!(busy["cpu"]["count"].as_u64(), Some(cpus as u64));
    assert_eq!(
        busy["cpu"]["runqueue_latency_us"]["per_cpu"]
            .as_array()
            .unwrap()
            .len(),
        cpus
    );
}

/// Run beside libbpf-tools' runqlat on the same steady load, the
/// histograms agree: same median bucket, 90th percentile within a bucket.
#[test]
fn runqueue_latency_agrees_with_runqlat() {
    if !require_root("runqueue_latency_agrees_with_runqlat") {
        return;
    }
    let runqlat = ["/usr/sbin/runqlat", "/usr/bin/runqlat"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(runqlat) = runqlat else {
        panic!(
            "libbpf-tools' runqlat is needed (apt-get install libbpf-tools); .ci/run installs it"
        );
    };
    let dir = scratch("runqlat");
    let loops = busy_loops(3 * online_cpus(), 8);
    thread::sleep(Duration::from_millis(300));
    let peer = Command::new(runqlat)
        .args(["4", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    let out = dir.join("out");
    record_ok(
        &dir,
        &["--no-stacks", "-d", "3", "-o", out.to_str().unwrap()],
    );
    let peer = peer.wait_with_output().unwrap();
    for mut l in loops {
        let _ = l.wait();
    }
    let text = String::from_utf8_lossy(&peer.stdout);
    // Lines like "      4096 -> 8191       : 1039     |****|"
    let theirs: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let (range, rest) = l.split_once(':')?;
            let hi = range.split("->").nth(1)?.trim().parse().ok()?;
            let count = rest.split_whitespace().next()?.parse().ok()?;
            Some((hi, count))
        })
        .collect();
    assert!(
        !theirs.is_empty(),
        "runqlat printed no histogram: {text}\n{}",
        String::from_utf8_lossy(&peer.stderr)
    );
    let ours: Vec<(u64, u64)> = read_use(&out)["cpu"]["runqueue_latency_us"]["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["le"].as_u64().unwrap(), b["count"].as_u64().unwrap()))
        .collect();
    let bucket_at = |h: &[(u64, u64)], q: f64| -> u64 {
        let total: u64 = h.iter().map(|b| b.1).sum();
        let mut seen = 0;
        for &(le, c) in h {
            seen += c;
            if seen as f64 >= q * total as f64 {
                return le;
            }
        }
        0
    };
    eprintln!("ours {ours:?}\nrunqlat {theirs:?}");
    assert_eq!(
        bucket_at(&ours, 0.5),
        bucket_at(&theirs, 0.5),
        "median buckets differ"
    );
    let (a, b) = (bucket_at(&ours, 0.9), bucket_at(&theirs, 0.9));
    assert!(
        a == b || a == 2 * b + 1 || b == 2 * a + 1,
        "p90 buckets {a} and {b} are more than one apart"
    );
}

/// A network namespace of the test's own, with an nftables rule dropping
/// 30% of the data packets to one port on its loopback: the retransmits
/// are counted exactly as the kernel's RetransSegs counts them, attributed
/// to the connection and to the client process that owns the socket.
/// (Only data is dropped, not SYN, FIN or ACK: then every retransmit is
/// over once the server has read everything, and both counts cover the
/// same window.)
#[test]
fn tcp_retransmits_are_counted_and_attributed() {
    if !require_root("tcp_retransmits_are_counted_and_attributed") {
        return;
    }
    let ns = format!("profretr{}", std::process::id());
    let _ = sh(&format!("ip netns del {ns}"));
    sh_ok(&format!(
        "ip netns add {ns} && ip netns exec {ns} ip link set lo up"
    ));
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _guard = Ns(ns.clone());
    sh_ok(&format!(
        "ip netns exec {ns} nft -f - <<'EOF'\ntable inet lossy {{\n  chain input {{\n    type filter hook input priority 0;\n    tcp dport 5201 meta length > 200 numgen random mod 10 < 3 drop\n  }}\n}}\nEOF"
    ));
    let snmp = |ns: &str| -> i64 {
        let text = sh_ok(&format!("ip netns exec {ns} cat /proc/net/snmp"));
        let tcp: Vec<&str> = text.lines().filter(|l| l.starts_with("Tcp:")).collect();
        let names: Vec<&str> = tcp[0].split_whitespace().collect();
        let vals: Vec<&str> = tcp[1].split_whitespace().collect();
        vals[names.iter().position(|n| *n == "RetransSegs").unwrap()]
            .parse()
            .unwrap()
    };

    let dir = scratch("retrans");
    // One IPv4 and one IPv6 connection through the same lossy port.
    let server = r#"
import socket, threading
def serve(fam, addr):
    s = socket.socket(fam)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 5201))
    s.listen(1)
    c, _ = s.accept()
    # A client whose orphaned socket gave up retransmitting (30% of its
    # segments dropped) never sends its FIN: stop after 20 s of silence.
    c.settimeout(20)
    try:
        while c.recv(65536):
            pass
    except socket.timeout:
        pass
t = [threading.Thread(target=serve, args=a) for a in [(socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')]]
[x.start() for x in t]
[x.join() for x in t]
"#;
    let client = r#"
import socket, time
cs = [socket.create_connection((a, 5201)) for a in ['127.0.0.1', '::1']]
for c in cs:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
end = time.time() + 2.5
while time.time() < end:
    for c in cs:
        c.sendall(b'x' * 1000)
    time.sleep(0.002)
for c in cs:
    c.close()
"#;
    let mut srv = Command::new("ip")
        .args(["netns", "exec", &ns, "python3", "-c", server])
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    let out = dir.join("out");
    // Stopped once both ends are done, however long that takes (a loaded
    // machine slows the retransmit timers' backoff).
    let profiler = start_record(&["--no-stacks", "-d", "120", "-o", out.to_str().unwrap()]);
    let before = snmp(&ns);
    let mut cli = Command::new("ip")
        .args(["netns", "exec", &ns, "python3", "-c", client])
        .spawn()
        .unwrap();
    let client_pid = cli.id();
    assert!(cli.wait().unwrap().success());
    // The server has read all the data and the FIN: no retransmit is due.
    let _ = srv.wait();
    let after = snmp(&ns);
    profiler.stop();
    let kernel = after - before;

    let u = read_use(&out);
    let ours = u["network"]["tcp_retransmits"].as_i64().unwrap();
    let conns = u["network"]["retransmits_by_connection"]
        .as_array()
        .unwrap();
    eprintln!("retransmits: ours {ours}, kernel RetransSegs {kernel}; connections: {conns:#?}");
    assert!(kernel > 10, "the lossy rule made only {kernel} retransmits");
    // RetransSegs also counts retransmits that take another path (SYN-ACK
    // retransmits have a tracepoint of their own): allow one in twenty.
    assert!(
        (ours - kernel).abs() <= (kernel / 20).max(1),
        "traced retransmits {ours} differ from the kernel's RetransSegs {kernel} by more than 5%"
    );
    let conn = conns
        .iter()
        .find(|c| c["dport"] == 5201 && c["daddr"] == "127.0.0.1")
        .unwrap_or_else(|| panic!("no connection to port 5201 in {conns:#?}"));
    let per_conn: i64 = conns
        .iter()
        .filter(|c| c["dport"] == 5201)
        .map(|c| c["count"].as_i64().unwrap())
        .sum();
    assert_eq!(per_conn, ours);
    // Each retransmit keeps its time, to its 10 ms slice, within the
    // capture.
    let times: Vec<(u64, u64)> = u["network"]["retransmit_times"]
        .as_array()
        .expect("network.retransmit_times")
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap()))
        .collect();
    assert_eq!(
        times.iter().map(|t| t.1).sum::<u64>() as i64,
        ours,
        "every retransmit has its time: {times:?}"
    );
    let duration_ms = u["duration_s"].as_f64().unwrap() * 1000.0;
    assert!(
        times.windows(2).all(|w| w[0].0 < w[1].0)
            && times
                .iter()
                .all(|t| t.0 % 10 == 0 && (t.0 as f64) < duration_ms + 20.0),
        "retransmit times in order, in 10 ms slices of the {duration_ms} ms capture: {times:?}"
    );
    // Spread over the client's 2.5 s of sending, not lumped.
    assert!(
        times.len() > 5 && times.last().unwrap().0 - times[0].0 > 1000,
        "{times:?}"
    );
    assert_eq!(conn["family"], "ipv4");
    let v6 = conns
        .iter()
        .find(|c| c["dport"] == 5201 && c["daddr"] == "::1")
        .unwrap_or_else(|| panic!("no IPv6 connection to port 5201 in {conns:#?}"));
    assert_eq!(
        (v6["family"].as_str(), v6["saddr"].as_str()),
        (Some("ipv6"), Some("::1"))
    );
    assert_eq!(v6["pid"].as_u64(), Some(client_pid as u64), "{v6:#?}");
    // `ip netns exec` execs python3 in place: the client's pid owns the
    // socket; its name was read while it lived.
    assert_eq!(conn["pid"].as_u64(), Some(client_pid as u64), "{conn:#?}");
    assert_eq!(conn["comm"], "python3", "{conn:#?}");
    // Retransmits while sending, and after close while the FIN waits.
    let states: Vec<&str> = conns
        .iter()
        .filter(|c| c["dport"] == 5201)
        .filter_map(|c| c["state"].as_str())
        .collect();
    assert!(states.contains(&"ESTABLISHED"), "{states:?}");
    assert!(
        states.iter().all(|s| [
            "ESTABLISHED",
            "SYN_SENT",
            "FIN_WAIT1",
            "CLOSING",
            "LAST_ACK"
        ]
        .contains(s)),
        "{states:?}"
    );
    let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
    assert!(
        events
            .lines()
            .any(|l| l.contains("\"event\":\"tcp_retransmits\"") && l.contains("5201")),
        "{events}"
    );
}

/// The hierarchy of a cgroup controller: (its root, whether it is v1).
/// `v1_file` is a file only the v1 hierarchy of that controller has.
fn cgroup_parent(controller: &str, v1_file: &str) -> Option<(std::path::PathBuf, bool)> {
    let v1 = Path::new("/sys/fs/cgroup").join(controller);
    if v1.join(v1_file).exists() {
        return Some((v1, true));
    }
    let v2 = Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    controllers
        .split_whitespace()
        .any(|c| c == controller)
        .then(|| (v2.to_path_buf(), false))
}

/// A cgroup made for a test: its process (if any) killed and the group
/// removed when dropped, even when an assertion fails.
struct TestCgroup(std::path::PathBuf, Option<std::process::Child>);

impl TestCgroup {
    fn new(parent: &Path, name: &str) -> Self {
        let cg = parent.join(name);
        let _ = std::fs::remove_dir(&cg);
        std::fs::create_dir(&cg).unwrap();
        TestCgroup(cg, None)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Some(mut c) = self.1.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A hog in a 64 MiB memory cgroup is OOM-killed: the kill is recorded
/// with the victim's pid, name, memory and cgroup.
#[test]
fn oom_kill_in_a_memory_cgroup_is_recorded() {
    if !require_root("oom_kill_in_a_memory_cgroup_is_recorded") {
        return;
    }
    let (parent, v1) = cgroup_parent("memory", "memory.limit_in_bytes")
        .expect("no memory cgroup controller (v1 or v2) on this host");
    let name = format!("profiler-oom-{}", std::process::id());
    let guard = TestCgroup::new(&parent, &name);
    let cg = guard.0.clone();
    if v1 {
        std::fs::write(cg.join("memory.limit_in_bytes"), "64M").unwrap();
        let _ = std::fs::write(cg.join("memory.memsw.limit_in_bytes"), "64M");
    } else {
        std::fs::write(cg.join("memory.max"), "64M").unwrap();
        let _ = std::fs::write(cg.join("memory.swap.max"), "0");
    }

    let dir = scratch("oom");
    let out = dir.join("out");
    let profiler = start_record(&["--no-stacks", "-d", "3", "-o", out.to_str().unwrap()]);
    // The hog joins the group, then execs python3 (same pid) and grows.
    let procs = cg.join("cgroup.procs");
    let mut hog = Command::new("sh")
        .args([
            "-c",
            &format!(
                "echo $$ > {} && exec python3 -c 'a=[]\nwhile True: a.append(bytearray(8<<20))'",
                procs.display()
            ),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let victim = hog.id();
    let status = hog.wait().unwrap();
    assert!(!status.success(), "the hog was not killed");
    let stderr = profiler.finish();

    let u = read_use(&out);
    let kills = u["memory"]["oom_kills"].as_array().unwrap();
    eprintln!("{kills:#?}");
    let k = kills
        .iter()
        .find(|k| k["pid"].as_u64() == Some(victim as u64))
        .unwrap_or_else(|| panic!("victim {victim} not among {kills:#?}"));
    assert_eq!(k["comm"], "python3");
    assert!(k["anon_rss_kb"].as_u64().unwrap() > 30 * 1024, "{k:#?}");
    assert!(k["total_vm_kb"].as_u64().unwrap() >= k["anon_rss_kb"].as_u64().unwrap());
    assert!(
        k["cgroup"].as_str().is_some_and(|c| c.contains(&name)),
        "cgroup of {k:#?}"
    );
    assert!(k["uid"].as_u64() == Some(0));
    assert!(u["memory"]["kernel_oom_kill_count"].as_u64().unwrap_or(0) >= 1);
    assert!(stderr.contains("OOM kills: python3"), "{stderr}");
    let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
    assert!(
        events
            .lines()
            .any(|l| l.contains("\"event\":\"oom_kill\"")
                && l.contains(&format!("\"pid\":{victim}"))),
        "{events}"
    );
}

/// `pgmajfault` of /proc/vmstat: the kernel's count of major faults.
fn vmstat_major_faults() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("pgmajfault "))
        .and_then(|v| v.trim().parse().ok())
        .expect("pgmajfault in /proc/vmstat")
}

/// Counted events against known work: a pipe ping-pong of 20,000 round
/// trips switches context at least 40,000 times; a binary run after the
/// page cache was dropped faults its pages in from disk, and no more
/// major faults are counted than the kernel's own count around the run.
#[test]
fn counted_events_agree_with_known_work() {
    if !require_root("counted_events_agree_with_known_work") {
        return;
    }
    let dir = scratch("counted");
    let out_dir = dir.join("out");
    let faults_before = vmstat_major_faults();
    record_ok(
        &dir,
        &[
            "--no-stacks",
            "-o",
            out_dir.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "perf bench sched pipe -l 20000 >/dev/null && sync && \
             echo 3 > /proc/sys/vm/drop_caches && perf --version >/dev/null",
        ],
    );
    let faults_after = vmstat_major_faults();
    let u = read_use(&out_dir);
    let secs = u["duration_s"].as_f64().unwrap();
    let switches = u["cpu"]["context_switches_per_s"].as_f64().unwrap() * secs;
    assert!(
        switches >= 40_000.0,
        "{switches:.0} context switches counted"
    );
    assert!(u["cpu"]["migrations_per_s"].as_f64().is_some());
    let faults = (u["memory"]["major_faults_per_s"].as_f64().unwrap() * secs).round() as u64;
    assert!(faults > 0, "no major fault counted");
    assert!(
        faults <= faults_after - faults_before,
        "{faults} major faults counted, the kernel saw {}",
        faults_after - faults_before
    );
}

/// A busy loop in a cgroup held to a quarter of a CPU (25 ms every
/// 100 ms): throttled in most periods, about 75 ms of each waiting, and
/// the report says so, in use.json and in the table.
#[test]
fn cpu_throttling_of_a_quarter_cpu_is_reported() {
    if !require_root("cpu_throttling_of_a_quarter_cpu_is_reported") {
        return;
    }
    let (parent, v1) =
        cgroup_parent("cpu", "cpu.cfs_quota_us").expect("no cpu cgroup controller (v1 or v2)");
    let name = format!("profiler-throttle-{}", std::process::id());
    let mut guard = TestCgroup::new(&parent, &name);
    let cg = guard.0.clone();
    if v1 {
        std::fs::write(cg.join("cpu.cfs_period_us"), "100000").unwrap();
        std::fs::write(cg.join("cpu.cfs_quota_us"), "25000").unwrap();
    } else {
        let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+cpu");
        std::fs::write(cg.join("cpu.max"), "25000 100000").unwrap();
    }
    guard.1 = Some(
        Command::new("sh")
            .args([
                "-c",
                &format!(
                    "echo $$ > {} && exec sh -c 'while :; do :; done'",
                    cg.join("cgroup.procs").display()
                ),
            ])
            .spawn()
            .unwrap(),
    );
    thread::sleep(Duration::from_millis(300));
    let dir = scratch("throttle");
    let out_dir = dir.join("out");
    let busy = guard.1.as_ref().unwrap().id().to_string();
    let out = record_ok(
        &dir,
        &["-p", &busy, "-d", "3", "-o", out_dir.to_str().unwrap()],
    );
    let u = read_use(&out_dir);
    let all = u["cpu"]["throttling"].as_array().expect("cpu.throttling");
    let t = all
        .iter()
        .find(|t| t["cgroup"].as_str().is_some_and(|c| c.ends_with(&name)))
        .unwrap_or_else(|| panic!("{name} not in {all:#?}"));
    let periods = t["periods"].as_u64().unwrap();
    let throttled = t["throttled_periods"].as_u64().unwrap();
    let secs = t["throttled_s"].as_f64().unwrap();
    assert!(periods >= 20, "{t}");
    assert!(
        throttled * 2 >= periods,
        "throttled in too few periods: {t}"
    );
    // About 2.25 s over 3 s at 25% of a CPU.
    assert!((1.0..=3.5).contains(&secs), "{t}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.contains(&name) && l.contains("throttled")),
        "{err}"
    );
    // The loop's time off the CPU is its wait for quota: `throttled`, the
    // same seconds the cgroup counted (or `cpu`, where the kernel does
    // not let us tell, and use.json says so).
    let o = &u["offcpu"];
    let p = o["by_process"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64().map(|v| v.to_string()) == Some(busy.clone()))
        .unwrap_or_else(|| panic!("the loop is not in {o:#}"));
    let cause = if o["throttled_told_apart"].as_bool().unwrap() {
        "throttled"
    } else {
        "cpu"
    };
    let waited = p["by_cause_s"][cause].as_f64().unwrap();
    assert!(
        (waited - secs).abs() <= 0.15 * secs,
        "{cause} {waited:.3} s against the cgroup's {secs:.3} s throttled: {o:#}"
    );
}
