//! `profiler daemon` end to end, with its real consumers: Prometheus
//! (Debian's package) scraping it, `go tool pprof` (Debian's golang-go)
//! reading its profiles, and real processes in cgroups named as Docker and
//! Kubernetes name them.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use tests::{
    KillOnDrop, build_c, free_port, http_get, metric_sum, read_folded, record_ok, require_root,
    rss_kib, scratch, start_daemon,
};

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until `f` gives a value, or panics with `what` after `secs`.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {secs} s waiting for {what}"
        );
        thread::sleep(Duration::from_millis(250));
    }
}

fn tool(name: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()));
    assert!(
        found,
        "{name} is needed for this test (.ci/run installs it: apt-get install prometheus golang-go)"
    );
    found
}

/// The default address is loopback only: listening on 127.0.0.1:9464,
/// not on every address.
#[test]
fn default_bind_is_loopback() {
    if !require_root("default_bind_is_loopback") {
        return;
    }
    let d = start_daemon(None, &["--window", "2s", "--ecs-agent", "none"]);
    let (status, body) = d.get("/healthz");
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));
    // /proc/net/tcp: local address 0100007F:24F8 (127.0.0.1:9464), LISTEN.
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let listening: Vec<&str> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(3) == Some(&"0A") && f[1].ends_with(":24F8")).then_some(f[1])
        })
        .collect();
    assert_eq!(listening, ["0100007F:24F8"], "{tcp}");
    let tcp6 = std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    assert!(
        !tcp6
            .lines()
            .any(|l| l.contains(":24F8 ") && l.contains(" 0A ")),
        "listening on IPv6 too:\n{tcp6}"
    );
    d.stop();
}

/// A real Prometheus scrapes the daemon: the target is up, and every
/// metric the issue names is stored.
#[test]
fn prometheus_scrapes_the_daemon() {
    if !require_root("prometheus_scrapes_the_daemon") || !tool("prometheus") {
        return;
    }
    let dir = scratch("prometheus");
    let port = free_port();
    let d = start_daemon(
        Some(loopback(port)),
        &["--window", "2s", "--ecs-agent", "none", "--off-cpu"],
    );
    let prom_port = free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: profiler\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let _prom = KillOnDrop(vec![
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus"),
    ]);
    let api = |q: &str| -> Option<serde_json::Value> {
        let (status, body) = http_get(loopback(prom_port), q, Duration::from_secs(5)).ok()?;
        (status == 200).then(|| serde_json::from_slice(&body).ok())?
    };
    // Scraped and up, with a window finished (gauges set).
    wait_for(60, "Prometheus to see the target up", || {
        let v = api("/api/v1/query?query=up%7Bjob%3D%22profiler%22%7D")?;
        let up = v["data"]["result"][0]["value"][1].as_str()?.to_string();
        (up == "1").then_some(())
    });
    thread::sleep(Duration::from_secs(3));
    let names = wait_for(30, "metric names in Prometheus", || {
        let v = api("/api/v1/label/__name__/values")?;
        let names: Vec<String> = v["data"]
            .as_array()?
            .iter()
            .filter_map(|n| n.as_str().map(String::from))
            .collect();
        names
            .iter()
            .any(|n| n == "profiler_cpu_utilization_ratio")
            .then_some(names)
    });
    for want in [
        "profiler_cpu_samples_total",
        "profiler_cpu_utilization_ratio",
        "profiler_runqueue_latency_seconds_bucket",
        "profiler_runqueue_latency_seconds_sum",
        "profiler_runqueue_latency_seconds_count",
        "profiler_runqueue_depth",
        "profiler_tcp_retransmits_total",
        "profiler_oom_kills_total",
        "profiler_lost_samples_total",
        "profiler_context_switches_total",
        "profiler_cpu_migrations_total",
        "profiler_major_page_faults_total",
        "profiler_process_cpu_seconds_total",
        "profiler_process_resident_memory_bytes",
        "profiler_bpf_run_time_seconds_total",
        "profiler_self_cpu_share_ratio",
        "profiler_offcpu_seconds_total",
        "profiler_event_loop_turn_seconds_bucket",
        "profiler_event_loop_turn_seconds_count",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    // A query over the stored samples: the histogram's count grows.
    let v = api("/api/v1/query?query=sum(profiler_cpu_samples_total)").unwrap();
    let samples: f64 = v["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(samples > 0.0, "{v}");
    // Context switches happen on any running host: counted, and stored.
    let v = api("/api/v1/query?query=profiler_context_switches_total").unwrap();
    let switches: f64 = v["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(switches > 0.0, "{v}");
    // How long /metrics takes to serve, for the record.
    let t = Instant::now();
    for _ in 0..20 {
        assert_eq!(d.get("/metrics").0, 200);
    }
    eprintln!(
        "/metrics served in {:.2} ms on average",
        t.elapsed().as_secs_f64() * 1000.0 / 20.0
    );
    d.stop();
}

/// `go tool pprof` reads the daemon's profile endpoint and names the known
/// workload's hottest function; bad and excess requests get clear 4xx.
#[test]
fn go_tool_pprof_reads_the_profile() {
    if !require_root("go_tool_pprof_reads_the_profile") || !tool("go") {
        return;
    }
    let dir = scratch("pprof");
    let known = build_c(
        "known.c",
        &dir.join("known"),
        &["-O2", "-g", "-fno-omit-frame-pointer"],
    );
    let port = free_port();
    let d = start_daemon(
        Some(loopback(port)),
        &["--window", "60s", "--ecs-agent", "none", "-F", "199"],
    );
    let mut work = Command::new(&known)
        .arg("12")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    let url = format!("http://127.0.0.1:{port}/debug/pprof/profile?seconds=4");
    let out = Command::new("go")
        .args(["tool", "pprof", "-top", "-nodecount=40", &url])
        .env("HOME", &dir)
        .env("PPROF_TMPDIR", &dir)
        .output()
        .expect("run go tool pprof");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}\n{text}");
    assert!(out.status.success(), "go tool pprof failed:\n{err}");
    assert!(
        err.contains("Fetched") || err.contains("Saved profile"),
        "{err}"
    );
    // Cumulative time per function, from `-top`: "flat flat% sum% cum cum%
    // name" (flat time is in inlined helpers such as tsc()).
    let cum = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.split_whitespace().last() == Some(name))
            .and_then(|l| l.split_whitespace().nth(3))
            .map(|v| {
                let (num, unit) =
                    v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap_or(v.len()));
                let n: f64 = num.parse().unwrap_or(0.0);
                n * match unit {
                    "ms" => 0.001,
                    "us" => 1e-6,
                    _ => 1.0,
                }
            })
            .unwrap_or_else(|| panic!("{name} not in pprof's top:\n{text}"))
    };
    let (a, b, d4) = (cum("work_alpha"), cum("work_beta"), cum("work_delta"));
    assert!(a > b && b > d4 && d4 > 0.0, "alpha {a} beta {b} delta {d4}");
    let share = a / (a + b + d4);
    assert!(
        (0.40..0.60).contains(&share),
        "work_alpha share {share:.2}, expected ~0.5"
    );
    // pprof's own view of the mappings: the workload with its build id.
    let raw = Command::new("go")
        .args([
            "tool",
            "pprof",
            "-raw",
            &url.replace("seconds=4", "seconds=1"),
        ])
        .env("HOME", &dir)
        .env("PPROF_TMPDIR", &dir)
        .output()
        .unwrap();
    let raw_text = String::from_utf8_lossy(&raw.stdout);
    let known_path = known.display().to_string();
    let build_id = raw_text
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let at = f.iter().position(|w| *w == known_path)?;
            f.get(at + 1).map(|s| s.to_string())
        })
        .unwrap_or_default();
    assert!(
        build_id.len() == 40 && build_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "no mapping of {known_path} with a build id:\n{raw_text}"
    );
    let _ = work.kill();
    let _ = work.wait();

    // Bad requests: a clear 400 that says what to do.
    let (status, body) = d.get("/debug/pprof/profile?seconds=abc");
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("whole number of seconds"));
    let (status, _) = d.get("/debug/pprof/profile?seconds=100000");
    assert_eq!(status, 400);
    // More than two at once: 429.
    let addr = d.addr;
    let long: Vec<_> = (0..2)
        .map(|_| {
            thread::spawn(move || {
                http_get(
                    addr,
                    "/debug/pprof/profile?seconds=3",
                    Duration::from_secs(30),
                )
                .unwrap()
                .0
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(700));
    let (status, body) = d.get("/debug/pprof/profile?seconds=1");
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    for h in long {
        assert_eq!(h.join().unwrap(), 200);
    }
    // Unknown paths never reach the filesystem.
    assert_eq!(d.get("/../../etc/passwd").0, 404);
    assert_eq!(d.get("/flamegraph.svg?seconds=1").0, 200);
    d.stop();
}

/// Many short windows, with processes coming and going all the while:
/// the daemon's memory stays flat.
#[test]
fn many_short_windows_keep_memory_flat() {
    if !require_root("many_short_windows_keep_memory_flat") {
        return;
    }
    let dir = scratch("windows");
    let out = dir.join("windows");
    let port = free_port();
    let d = start_daemon(
        Some(loopback(port)),
        &[
            "--window",
            "500ms",
            "--ecs-agent",
            "none",
            "-F",
            "199",
            "-o",
            out.to_str().unwrap(),
            "--retain",
            "5",
        ],
    );
    // Process churn: short-lived processes, each a new pid to announce,
    // read and forget.
    let churn = Command::new("sh")
        .args([
            "-c",
            "end=$(($(date +%s) + 40)); while [ $(date +%s) -lt $end ]; do for i in 1 2 3 4 5 6 7 8; do /bin/sh -c 'i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done' & done; wait; done",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _churn = KillOnDrop(vec![churn]);
    let windows = |d: &tests::Daemon| {
        let (_, body) = d.get("/metrics");
        metric_sum(&String::from_utf8_lossy(&body), "profiler_windows_total")
    };
    wait_for(30, "10 windows", || (windows(&d) >= 10.0).then_some(()));
    let early = rss_kib(d.pid());
    let mut peak = early;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(25) {
        thread::sleep(Duration::from_millis(500));
        peak = peak.max(rss_kib(d.pid()));
    }
    let n = windows(&d);
    let late = rss_kib(d.pid());
    eprintln!("RSS after 10 windows {early} KiB; after {n} windows {late} KiB; peak {peak} KiB");
    assert!(n >= 30.0, "only {n} windows");
    assert!(
        late <= early + early / 4 + 4096,
        "RSS grew from {early} KiB to {late} KiB over {n} windows"
    );
    let kept = std::fs::read_dir(&out).unwrap().count();
    assert_eq!(kept, 5, "--retain 5 kept {kept}");
    d.stop();
}

/// Where cgroup v2 is mounted (hybrid hosts: /sys/fs/cgroup/unified).
fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.controllers").exists())
}

/// A cgroup made for the test, removed (with its processes moved out) at
/// the end.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(root: &Path, rel: &str) -> Self {
        let p = root.join(rel);
        std::fs::create_dir_all(&p).unwrap();
        Cgroup(p)
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Innermost first; the test's processes are dead by now.
        let mut p = self.0.clone();
        for _ in 0..4 {
            if std::fs::remove_dir(&p).is_err() {
                break;
            }
            p.pop();
        }
    }
}

/// Busy loops in cgroups named as Docker and Kubernetes (containerd)
/// name them: `record --group-by container` roots their stacks at the
/// container, and the daemon labels their samples and profiles with it.
#[test]
fn containers_are_attributed() {
    if !require_root("containers_are_attributed") {
        return;
    }
    let Some(root) = cgroup2_root() else {
        panic!("no cgroup v2 hierarchy mounted (needed to place processes as containers)");
    };
    let dir = scratch("containers");
    let id = |n: u64| {
        format!(
            "{:016x}",
            0x5eed_0000_0000_0000 ^ (n << 32) ^ std::process::id() as u64
        )
        .repeat(4)
    };
    let (id1, id2) = (id(1), id(2));
    let pod = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
    let docker = Cgroup::new(&root, &format!("docker/{id1}"));
    let k8s = Cgroup::new(&root, &format!("kubepods/burstable/pod{pod}/{id2}"));
    // Busy without forking: every sample is the shell itself.
    let busy = || {
        Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap()
    };
    // Killed before the cgroups are removed (dropped first), even when an
    // assertion fails.
    let busy_shells = KillOnDrop(vec![busy(), busy()]);
    docker.add(busy_shells.0[0].id());
    k8s.add(busy_shells.0[1].id());
    // A host process sampled for sure: with the two loops on two CPUs the
    // host's own processes and idle could go unsampled.
    let host_shell = KillOnDrop(vec![busy()]);

    let out = dir.join("rec");
    record_ok(
        &dir,
        &[
            "-d",
            "2",
            "--group-by",
            "container",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    drop(host_shell);
    let folded = read_folded(&out);
    let root_of = |prefix: &str| -> u64 {
        folded
            .iter()
            .filter(|(l, _)| l.starts_with(prefix))
            .map(|(_, c)| c)
            .sum()
    };
    let (d_label, k_label) = (
        format!("docker:{}", &id1[..12]),
        format!("cri:{}", &id2[..12]),
    );
    assert!(root_of(&format!("{d_label};sh;")) > 50, "{folded:#?}");
    assert!(root_of(&format!("{k_label};sh;")) > 50, "{folded:#?}");
    assert!(root_of("host;") > 0, "host processes are grouped as host");

    let port = free_port();
    let d = start_daemon(
        Some(loopback(port)),
        &["--window", "1s", "--ecs-agent", "none"],
    );
    thread::sleep(Duration::from_secs(3));
    let (_, body) = d.get("/metrics");
    let text = String::from_utf8_lossy(&body);
    for label in [&d_label, &k_label] {
        let n = metric_sum(
            &text,
            &format!("profiler_cpu_samples_total{{container=\"{label}\"}}"),
        );
        assert!(n > 20.0, "{label}: {n} samples in\n{text}");
        assert!(
            text.contains(&format!(
                "profiler_cpu_utilization_ratio{{container=\"{label}\"}}"
            )),
            "{text}"
        );
    }
    // The flame graph of the last window has them as root frames.
    let (status, svg) = d.get("/flamegraph.svg");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&svg).contains(&d_label));
    d.stop();
    drop(busy_shells);
}

/// With --off-cpu, the daemon's windows carry off-CPU time and event-loop
/// stalls: a Node.js loop blocked three times 150 ms is counted in
/// profiler_event_loop_stalls_total, its blocks in the windows'
/// stalls.folded, its idle time in profiler_offcpu_seconds_total.
#[test]
fn daemon_counts_off_cpu_time_and_stalls() {
    if !require_root("daemon_counts_off_cpu_time_and_stalls") {
        return;
    }
    let dir = scratch("daemon-offcpu");
    let port = free_port();
    let out = dir.join("windows");
    let d = start_daemon(
        Some(loopback(port)),
        &[
            "--window",
            "2s",
            "--ecs-agent",
            "none",
            "--off-cpu",
            "--stall-threshold",
            "100ms",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    let script = tests::workspace().join("tests/node/stall.js");
    let node = Command::new("node")
        .arg("--perf-basic-prof")
        .arg(&script)
        .args(["block", "3", "150", "400"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("node");
    let result = node.wait_with_output().unwrap();
    assert!(result.status.success());
    let metrics = wait_for(20, "three stalls of node in /metrics", || {
        let (_, body) = d.get("/metrics");
        let text = String::from_utf8_lossy(&body).into_owned();
        let stalls = metric_sum(
            &text,
            "profiler_event_loop_stalls_total{container=\"host\",comm=\"node\"}",
        );
        (stalls >= 3.0).then_some(text)
    });
    assert_eq!(
        metric_sum(
            &metrics,
            "profiler_event_loop_stalls_total{container=\"host\",comm=\"node\"}"
        ),
        3.0,
        "{metrics}"
    );
    assert!(
        metric_sum(
            &metrics,
            "profiler_event_loop_turn_seconds_count{container=\"host\",comm=\"node\"}"
        ) > 10.0,
        "{metrics}"
    );
    assert!(
        metric_sum(&metrics, "profiler_offcpu_seconds_total{cause=\"idle\"") > 0.5,
        "{metrics}"
    );
    // Windows written: the stall flame graph holds the blocking function.
    let mut culprit = 0u64;
    let mut offcpu_files = 0;
    for w in std::fs::read_dir(&out).unwrap() {
        let w = w.unwrap().path();
        if w.join("offcpu.folded").is_file() && w.join("offcpu.svg").is_file() {
            offcpu_files += 1;
        }
        if let Ok(text) = std::fs::read_to_string(w.join("stalls.folded")) {
            culprit += text
                .lines()
                .filter(|l| l.contains("blockTheLoop"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    assert!(
        offcpu_files > 0,
        "no window with offcpu.folded and offcpu.svg"
    );
    assert!(
        culprit >= 300_000,
        "{culprit} us of blockTheLoop in the windows' stalls.folded"
    );
    d.stop();
}

/// The daemon follows requests and outbound connections: a Node server's
/// routes by status class, their durations, and its round trips to a
/// TCP server, in /metrics.
#[test]
fn daemon_exports_requests_and_round_trips() {
    if !require_root("daemon_exports_requests_and_round_trips") {
        return;
    }
    let port = free_port();
    let d = start_daemon(
        Some(loopback(port)),
        &["--window", "2s", "--ecs-agent", "none"],
    );
    let node = |script: &str, env: Vec<(&str, String)>| -> (KillOnDrop, u16) {
        use std::io::BufRead;
        let mut c = Command::new("node")
            .arg(tests::workspace().join("tests/node").join(script))
            .envs(env)
            .stdout(Stdio::piped())
            .spawn()
            .expect("node");
        let mut line = String::new();
        std::io::BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let p = line.trim().parse().unwrap();
        (KillOnDrop(vec![c]), p)
    };
    let (_echo, echo_port) = node("echo.js", vec![]);
    let (_server, server_port) = node("red.js", vec![("DOWNSTREAM_PORT", echo_port.to_string())]);
    tests::node::load_js(server_port, "/fanout/1", 20, 50, 1, "keepalive");
    tests::node::load_js(server_port, "/flaky/2", 40, 50, 1, "keepalive");
    let route = |r: &str, code: &str| {
        format!(
            "profiler_http_requests_total{{container=\"host\",route=\"{r}\",method=\"GET\",code=\"{code}\"}}"
        )
    };
    let text = wait_for(20, "the requests in /metrics", || {
        let (_, body) = d.get("/metrics");
        let text = String::from_utf8_lossy(&body).into_owned();
        (metric_sum(&text, &route("/flaky/:id", "2xx"))
            + metric_sum(&text, &route("/flaky/:id", "5xx"))
            >= 40.0)
            .then_some(text)
    });
    assert_eq!(
        metric_sum(&text, &route("/fanout/:id", "2xx")),
        20.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, &route("/flaky/:id", "5xx")),
        10.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(
            &text,
            "profiler_http_request_duration_seconds_count{container=\"host\",route=\"/fanout/:id\",method=\"GET\"}"
        ),
        20.0,
        "{text}"
    );
    let dest = format!("destination=\"127.0.0.1:{echo_port}\"");
    let rt_count: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("profiler_downstream_round_trip_seconds_count{") && l.contains(&dest)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(rt_count, 240.0, "{text}");
    // The server's one connection to the echo server: one handshake.
    let handshakes: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("profiler_downstream_connect_seconds_count{") && l.contains(&dest)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(handshakes, 1.0, "{text}");
    d.stop();
}
