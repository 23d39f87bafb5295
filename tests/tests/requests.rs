//! End-to-end: requests a real Node.js `http` server answers
//! (tests/node/red.js), driven by a load generator that measures itself
//! (tests/node/load.js), against what the kernel saw.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use tests::*;

/// A node script of tests/node that prints its port first, and the port.
fn start_node(script: &str, env: &[(&str, String)]) -> (KillOnDrop, u16) {
    let mut child = Command::new("node")
        .arg(workspace().join("tests/node").join(script))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .spawn()
        .expect("node is needed (.ci/run installs it)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().expect("the server's port");
    (KillOnDrop(vec![child]), port)
}

/// A load generator with blocking sockets, one thread per connection:
/// `count` GETs of `path` at `rate` per second in all over `conns` kept
/// connections, each timed from its write to the first bytes of its
/// answer read (a thread blocked in read(2) wakes as they arrive; a Node
/// client's event loop, sharing 2 CPUs with the server and the profiler,
/// adds its own delays to the tail). Gives what load.js prints:
/// `statuses`, `p50_ms`, `p99_ms`.
fn blocking_load(port: u16, path: &str, count: u32, rate: u32, conns: u32) -> serde_json::Value {
    use std::{
        io::{Read, Write as _},
        time::{Duration, Instant},
    };
    let start = Instant::now() + Duration::from_millis(50);
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_nodelay(true).unwrap();
                let mut out = Vec::new();
                for i in (c..count).step_by(conns as usize) {
                    let at = start + interval * i;
                    if let Some(wait) = at.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let t0 = Instant::now();
                    // One write: a request line split over segments is not
                    // what clients send.
                    s.write_all(request.as_bytes()).unwrap();
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let mut first = None;
                    // The head, then Content-Length bytes of body.
                    let (status, body_at, len) = loop {
                        let n = s.read(&mut chunk).unwrap();
                        assert!(n > 0, "the server closed the connection");
                        first.get_or_insert_with(|| t0.elapsed());
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                            let status: u16 = head[9..12].parse().unwrap();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map_or(0, |v| v.trim().parse().unwrap());
                            break (status, end + 4, len);
                        }
                    };
                    while buf.len() < body_at + len {
                        let n = s.read(&mut chunk).unwrap();
                        assert!(n > 0, "the server closed the connection");
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    out.push((status, first.unwrap().as_secs_f64() * 1e3));
                }
                out
            })
        })
        .collect();
    let all: Vec<(u16, f64)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let mut statuses = serde_json::Map::new();
    for (code, _) in &all {
        let n = statuses.entry(code.to_string()).or_insert(0.into());
        *n = (n.as_u64().unwrap() + 1).into();
    }
    let mut ms: Vec<f64> = all.iter().map(|(_, t)| *t).collect();
    ms.sort_by(f64::total_cmp);
    let pct = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).max(1) - 1];
    serde_json::json!({ "statuses": statuses, "p50_ms": pct(0.5), "p99_ms": pct(0.99) })
}

/// Per route: requests within 2% of what the client sent (the same count
/// here), 5xx and 4xx exact, p50 and p99 within 3 ms of the client's own
/// (a blocking load generator: [`blocking_load`]); `/slow/7` is the route
/// `/slow/:id`.
#[test]
fn red_per_route_matches_the_clients_own_figures() {
    if !require_root("red_per_route_matches_the_clients_own_figures") {
        return;
    }
    let dir = scratch("red-routes");
    let out_dir = dir.join("out");
    let (server, port) = start_node("red.js", &[]);
    let pid = server.0[0].id().to_string();
    // At nice 10 the profiler's own work does not delay the server (on 2
    // vCPUs at 0 it adds 3 to 5 ms to its p99, the client sees it).
    let rec = start_record(&["-p", &pid, "--nice", "10", "-o", out_dir.to_str().unwrap()]);
    let cases = [
        ("/slow/7", "/slow/:id", 300, 100),
        ("/flaky/3", "/flaky/:id", 300, 100),
        ("/nope", "/nope", 300, 100),
    ];
    // A warm-up the figures leave out (route /fast): the profiler reads
    // the server's binary for unwinding at its first samples.
    blocking_load(port, "/fast", 100, 100, 4);
    let clients: Vec<serde_json::Value> = cases
        .iter()
        .map(|(path, _, n, rate)| blocking_load(port, path, *n, *rate, 4))
        .collect();
    let err = rec.stop();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("requests.json")).unwrap())
            .unwrap();
    let p = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64().map(|v| v.to_string()) == Some(pid.clone()))
        .unwrap_or_else(|| panic!("the server is not in {r:#}\n{err}"));
    for ((_, route, n, _), c) in cases.iter().zip(&clients) {
        let x = p["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["route"] == *route && x["method"] == "GET")
            .unwrap_or_else(|| panic!("{route} not in {p:#}"));
        let ours = x["requests"].as_u64().unwrap();
        assert!(
            (ours as f64 - *n as f64).abs() <= 0.02 * *n as f64,
            "{route}: {ours} requests, the client sent {n}"
        );
        let status = |code: &str| c["statuses"][code].as_u64().unwrap_or(0);
        assert_eq!(
            x["errors_5xx"].as_u64(),
            Some(status("500")),
            "{route}: {x:#}"
        );
        assert_eq!(
            x["errors_4xx"].as_u64(),
            Some(status("404")),
            "{route}: {x:#}"
        );
        for (q, theirs, within) in [("p50", "p50_ms", 3.0), ("p99", "p99_ms", 3.0)] {
            let o = x["duration_ms"][q].as_f64().unwrap();
            let t = c[theirs].as_f64().unwrap();
            eprintln!("{route} {q}: ours {o:.2} ms, the client's {t:.2} ms");
            assert!(
                (o - t).abs() <= within,
                "{route} {q}: ours {o:.2} ms, the client's {t:.2} ms\n{x:#}\n{c}"
            );
        }
    }
    assert!(err.contains("RED (HTTP/1.x requests served"), "{err}");
    assert!(err.contains("GET /slow/:id"), "{err}");
}

/// --no-requests: no requests.json, no RED block.
#[test]
fn no_requests_writes_none_of_it() {
    if !require_root("no_requests_writes_none_of_it") {
        return;
    }
    let dir = scratch("red-off");
    let out_dir = dir.join("out");
    let out = record_ok(
        &dir,
        &["--no-requests", "-d", "1", "-o", out_dir.to_str().unwrap()],
    );
    assert!(!out_dir.join("requests.json").exists());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("RED ("));
}

/// Downstream round trips and the doctor: a route that makes 12 round
/// trips to a TCP server per request is an N+1 of exactly 12; a client
/// that opens a connection per request is told to keep them, the same
/// client with keep-alive is not.
#[test]
fn round_trips_per_request_and_keepalive_findings() {
    if !require_root("round_trips_per_request_and_keepalive_findings") {
        return;
    }
    let dir = scratch("red-downstream");
    let out_dir = dir.join("out");
    let (_echo, echo_port) = start_node("echo.js", &[]);
    let rec = start_record(&["-o", out_dir.to_str().unwrap()]);
    let (server, port) = start_node("red.js", &[("DOWNSTREAM_PORT", echo_port.to_string())]);
    let server_pid = u64::from(server.0[0].id());
    // One connection: the requests one after another.
    tests::node::load_js(port, "/fanout/1", 50, 50, 1, "keepalive");
    let closing = tests::node::load_js(port, "/fast", 60, 100, 2, "close");
    let keeping = tests::node::load_js(port, "/fast", 60, 100, 2, "keepalive");
    let err = rec.stop();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("requests.json")).unwrap())
            .unwrap();
    let process = |pid: u64| -> serde_json::Value {
        r["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"].as_u64() == Some(pid))
            .cloned()
            .unwrap_or_else(|| panic!("pid {pid} not in {r:#}\n{err}"))
    };
    let p = process(server_pid);
    let d = p["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["port"].as_u64() == Some(u64::from(echo_port)))
        .cloned()
        .unwrap_or_else(|| panic!("the echo server is not a destination of {p:#}"));
    assert_eq!(d["round_trips"].as_u64(), Some(600), "{d:#}");
    assert_eq!(d["connections_opened"].as_u64(), Some(1), "{d:#}");
    let findings = r["findings"].as_array().unwrap();
    let n1 = findings
        .iter()
        .find(|f| f["kind"] == "n_plus_one" && f["pid"].as_u64() == Some(server_pid))
        .unwrap_or_else(|| panic!("no n_plus_one in {findings:#?}"));
    assert_eq!(n1["route"], "GET /fanout/:id");
    assert_eq!(
        n1["figures"]["round_trips_per_request"].as_f64(),
        Some(12.0),
        "{n1:#}"
    );
    let flagged = |pid: u64| {
        findings
            .iter()
            .any(|f| f["kind"] == "no_keepalive" && f["pid"].as_u64() == Some(pid))
    };
    let (closing_pid, keeping_pid) = (
        closing["pid"].as_u64().unwrap(),
        keeping["pid"].as_u64().unwrap(),
    );
    assert!(
        flagged(closing_pid),
        "the closing client is not flagged: {findings:#?}"
    );
    assert!(
        !flagged(keeping_pid),
        "the keep-alive client is flagged: {findings:#?}"
    );
    let c = process(closing_pid);
    assert_eq!(
        c["destinations"][0]["connections_opened"].as_u64(),
        Some(60),
        "{c:#}"
    );
    assert!(err.contains("finding (n_plus_one"), "{err}");
    // Its clients closed their connections: no keep-alive timeout seen.
    assert!(
        !findings
            .iter()
            .any(|f| f["kind"] == "keepalive_shorter_than_lb"
                && f["pid"].as_u64() == Some(server_pid)),
        "{findings:#?}"
    );
}

/// A server that closes idle keep-alive connections after 5 s (Node's
/// default) is told it closes them before a load balancer would.
#[test]
fn a_five_second_keepalive_is_shorter_than_the_balancers() {
    if !require_root("a_five_second_keepalive_is_shorter_than_the_balancers") {
        return;
    }
    let dir = scratch("red-keepalive");
    let out_dir = dir.join("out");
    let rec = start_record(&["-o", out_dir.to_str().unwrap()]);
    let (server, port) = start_node("red.js", &[("KEEPALIVE_MS", "5000".into())]);
    let server_pid = u64::from(server.0[0].id());
    // Kept connections (one or more), left idle for 7 s.
    tests::node::load_js(port, "/fast", 30, 50, 3, "linger");
    let err = rec.stop();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("requests.json")).unwrap())
            .unwrap();
    let f = r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "keepalive_shorter_than_lb" && f["pid"].as_u64() == Some(server_pid))
        .cloned()
        .unwrap_or_else(|| panic!("not flagged: {r:#}\n{err}"));
    let idle = f["figures"]["idle_s_median"].as_f64().unwrap();
    assert!((4.5..=6.5).contains(&idle), "{f:#}");
    assert!(f["figures"]["closes"].as_u64().unwrap() >= 1, "{f:#}");
}

/// TcpExtListenOverflows from /proc/net/netstat.
fn listen_overflows() -> i64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap()
}

/// A listener with a backlog of 1 that never accepts, and 12 clients:
/// the overflows reported equal the kernel's TcpExtListenOverflows delta,
/// and the finding names the listener and its process.
#[test]
fn listen_overflows_equal_the_kernels_counter() {
    if !require_root("listen_overflows_equal_the_kernels_counter") {
        return;
    }
    let dir = scratch("red-listen");
    let out_dir = dir.join("out");
    let mut listener = Command::new("python3")
        .args([
            "-c",
            "import socket, sys, time\n\
             s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1)\n\
             print(s.getsockname()[1], flush=True); time.sleep(60)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(listener.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let listener = KillOnDrop(vec![listener]);
    let before = listen_overflows();
    let rec = start_record(&["-o", out_dir.to_str().unwrap()]);
    let clients = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import socket, time\n\
                 held = []\n\
                 for _ in range(12):\n\
                 \x20   c = socket.socket(); c.setblocking(False)\n\
                 \x20   try: c.connect(('127.0.0.1', {port}))\n\
                 \x20   except BlockingIOError: pass\n\
                 \x20   held.append(c); time.sleep(0.05)\n\
                 time.sleep(1.5)"
            ),
        ])
        .status()
        .unwrap();
    assert!(clients.success());
    let err = rec.stop();
    let theirs = listen_overflows() - before;
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("requests.json")).unwrap())
            .unwrap();
    assert!(
        theirs > 0,
        "the kernel counted no overflow: the test made none"
    );
    assert_eq!(r["listen_overflows"].as_i64(), Some(theirs), "{r:#}\n{err}");
    let f = r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "listen_overflow")
        .cloned()
        .unwrap_or_else(|| panic!("no listen_overflow finding: {r:#}"));
    assert_eq!(f["destination"], format!("127.0.0.1:{port}"), "{f:#}");
    assert_eq!(
        f["pid"].as_u64(),
        Some(u64::from(listener.0[0].id())),
        "{f:#}"
    );
}

/// A listener of tests/workloads/full_listener.py (its accept queue
/// full), its port, and its standard input (a line frees the queue after
/// `free_after` seconds).
fn full_listener(free_after: Option<&str>) -> (KillOnDrop, u16, Option<std::process::ChildStdin>) {
    let mut child = Command::new("python3")
        .arg(workspace().join("tests/workloads/full_listener.py"))
        .args(free_after)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let stdin = child.stdin.take();
    (
        KillOnDrop(vec![child]),
        line.trim().parse().expect("the listener's port"),
        stdin,
    )
}

/// Outbound handshakes timed from the kernel (SYN sent to established)
/// and failures told apart, against what the clients saw:
/// - a SYN dropped by a full accept queue and retransmitted a second
///   later: the handshake at least the kernel's initial RTO (1 s), and
///   inside the Node client's own timing of it;
/// - 20 connects to a TCP server: 20 handshakes, none failed, none
///   longer than the client saw;
/// - 5 connects to a closed port: 5 `refused`, no connection opened;
/// - 5 connections reset by their server: 5 `reset`;
/// - a client that gives up after one SYN retransmit (TCP_SYNCNT 1):
///   1 `timed_out`, the errno its connect(2) returned.
#[test]
fn connects_are_timed_and_their_failures_told_apart() {
    if !require_root("connects_are_timed_and_their_failures_told_apart") {
        return;
    }
    let dir = scratch("red-connects");
    let out_dir = dir.join("out");
    let (_echo, echo_port) = start_node("echo.js", &[]);
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let rec = start_record(&["-o", out_dir.to_str().unwrap()]);
    let (_slow, slow_port, go) = full_listener(Some("0.3"));
    let (_stuck, stuck_port, _) = full_listener(None);
    use std::io::Write;
    go.unwrap().write_all(b"go\n").unwrap();
    let node = Command::new("node")
        .arg(workspace().join("tests/node/connects.js"))
        .env("SLOW_PORT", slow_port.to_string())
        .env("ECHO_PORT", echo_port.to_string())
        .env("CLOSED_PORT", closed_port.to_string())
        .output()
        .unwrap();
    assert!(
        node.status.success(),
        "{}",
        String::from_utf8_lossy(&node.stderr)
    );
    let client: serde_json::Value = serde_json::from_slice(&node.stdout).unwrap();
    let timed_out = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import os, socket\n\
                 s = socket.socket(); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)\n\
                 try:\n\
                 \x20   s.connect(('127.0.0.1', {stuck_port})); print('connected')\n\
                 except OSError as e:\n\
                 \x20   print(os.getpid(), e.errno)"
            ),
        ])
        .output()
        .unwrap();
    let err = rec.stop();
    let timed_out = String::from_utf8_lossy(&timed_out.stdout).to_string();
    let (py_pid, errno) = timed_out
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("the client connected: {timed_out}"));
    assert_eq!(errno, "110", "the client's connect did not time out");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("requests.json")).unwrap())
            .unwrap();
    let dest = |pid: u64, port: u16| -> serde_json::Value {
        r["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["pid"].as_u64() == Some(pid))
            .flat_map(|p| p["destinations"].as_array().unwrap())
            .find(|d| d["port"].as_u64() == Some(u64::from(port)))
            .cloned()
            .unwrap_or_else(|| panic!("pid {pid} -> port {port} not in {r:#}\n{err}"))
    };
    let pid = client["pid"].as_u64().unwrap();
    assert_eq!(client["refused"], 5, "{client}");
    assert_eq!(client["reset"], 5, "{client}");

    let slow = dest(pid, slow_port);
    let (ours, theirs) = (
        slow["connect_ms"]["max"].as_f64().unwrap(),
        client["slow_ms"].as_f64().unwrap(),
    );
    assert!(theirs > 900.0, "the first SYN was not dropped: {client}");
    // The kernel retransmits an unanswered SYN after its initial RTO, one
    // second: the handshake lasts that, and fits inside the client's own
    // span (net.connect() to 'connect', which adds its event loop's delays:
    // 7 to 20 ms seen on a loaded 2-CPU host at the process's start).
    assert!(
        (995.0..=theirs + 0.5).contains(&ours) && theirs - ours <= 50.0,
        "handshake: ours {ours:.1} ms, the client's {theirs:.1} ms\n{slow:#}"
    );

    let echo = dest(pid, echo_port);
    assert_eq!(echo["connections_opened"], 20, "{echo:#}");
    assert_eq!(echo["failures"], 0, "{echo:#}");
    let longest = client["connect_ms"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_f64())
        .fold(0.0, f64::max);
    let ours = echo["connect_ms"]["max"].as_f64().unwrap();
    assert!(
        ours > 0.0 && ours <= longest + 0.1,
        "a handshake of ours ({ours} ms) is longer than any the client saw ({longest} ms)\n{echo:#}"
    );

    let refused = dest(pid, closed_port);
    assert_eq!(refused["failures_by_reason"]["refused"], 5, "{refused:#}");
    assert_eq!(refused["failures"], 5, "{refused:#}");
    assert_eq!(refused["connections_opened"], 0, "{refused:#}");

    let reset: Vec<serde_json::Value> = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["pid"].as_u64() == Some(pid))
        .flat_map(|p| p["destinations"].as_array().unwrap().clone())
        .filter(|d| d["failures_by_reason"]["reset"].as_u64().is_some())
        .collect();
    assert_eq!(reset.len(), 1, "{reset:#?}");
    assert_eq!(reset[0]["failures_by_reason"]["reset"], 5, "{reset:#?}");

    let stuck = dest(py_pid.parse().unwrap(), stuck_port);
    assert_eq!(stuck["failures_by_reason"]["timed_out"], 1, "{stuck:#}");
    assert_eq!(stuck["connections_opened"], 0, "{stuck:#}");
    assert!(
        err.contains("1 failed (1 timed_out)") && err.contains("5 failed (5 refused)"),
        "{err}"
    );
}

/// The pool doctor: a server whose pool of 2 connections to a downstream
/// that answers in 10 ms serves 8 requests at once (6 wait for a
/// connection) is told its pool is at its limit; the same server with a
/// pool of 8 serving 2 at once is not.
#[test]
fn a_pool_at_its_limit_is_told_from_one_with_room() {
    if !require_root("a_pool_at_its_limit_is_told_from_one_with_room") {
        return;
    }
    let dir = scratch("red-pool");
    let out_dir = dir.join("out");
    let (_db, db_port) = start_node("echo.js", &[("DELAY_MS", "10".into())]);
    let rec = start_record(&["-o", out_dir.to_str().unwrap()]);
    let pooled = |size: &str| {
        start_node(
            "red.js",
            &[
                ("POOL_PORT", db_port.to_string()),
                ("POOL_SIZE", size.to_string()),
            ],
        )
    };
    let (small, small_port) = pooled("2");
    let (roomy, roomy_port) = pooled("8");
    let busy = tests::node::load_js(small_port, "/pooled/1", 300, 400, 8, "keepalive");
    let calm = tests::node::load_js(roomy_port, "/pooled/2", 150, 100, 2, "keepalive");
    let err = rec.stop();
    assert_eq!(busy["statuses"]["200"], 300, "{busy}");
    assert_eq!(calm["statuses"]["200"], 150, "{calm}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("requests.json")).unwrap())
            .unwrap();
    let findings = r["findings"].as_array().unwrap();
    let pool_finding = |pid: u32| {
        findings
            .iter()
            .find(|f| f["kind"] == "pool_saturated" && f["pid"].as_u64() == Some(u64::from(pid)))
            .cloned()
    };
    let f = pool_finding(small.0[0].id())
        .unwrap_or_else(|| panic!("the pool of 2 is not flagged: {r:#}\n{err}"));
    assert_eq!(f["destination"], format!("127.0.0.1:{db_port}"), "{f:#}");
    assert_eq!(f["figures"]["connections_max"], 2, "{f:#}");
    let share = f["figures"]["all_busy_share"].as_f64().unwrap();
    let waiting = f["figures"]["waiting_requests_mean"].as_f64().unwrap();
    eprintln!("pool of 2: {}", f["figures"]);
    assert!(share >= 0.8, "{f:#}");
    assert!((4.0..=7.0).contains(&waiting), "{f:#}");
    // Its destination: two connections open throughout, 200 round trips
    // a second at most (2 connections, 10 ms each).
    let d = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64() == Some(u64::from(small.0[0].id())))
        .and_then(|p| p["destinations"].as_array().unwrap().first().cloned())
        .unwrap();
    let mean = d["pool"]["connections_mean"].as_f64().unwrap();
    assert!((1.9..=2.0).contains(&mean), "{d:#}");
    assert!(d["round_trips_per_s"].as_f64().unwrap() > 0.0, "{d:#}");
    assert!(
        pool_finding(roomy.0[0].id()).is_none(),
        "the pool of 8 is flagged: {findings:#?}"
    );
    assert!(err.contains("finding (pool_saturated"), "{err}");
}

/// An HTTPS server (its own TLS): 40 requests over one kept connection
/// are timed as exchanges (the handshake's flights with them), no route
/// is made up from encrypted bytes, and the report says why.
#[test]
fn tls_is_timed_without_routes_and_said_so() {
    if !require_root("tls_is_timed_without_routes_and_said_so") {
        return;
    }
    let dir = scratch("red-tls");
    let out_dir = dir.join("out");
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (.ci/run installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let mut child = Command::new("node")
        .arg(workspace().join("tests/node/tls.js"))
        .arg("serve")
        .args([&key, &cert])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let server = KillOnDrop(vec![child]);
    let pid = server.0[0].id();
    let rec = start_record(&["-p", &pid.to_string(), "-o", out_dir.to_str().unwrap()]);
    let out = Command::new("node")
        .arg(workspace().join("tests/node/tls.js"))
        .args(["get", &port.to_string(), "40"])
        .output()
        .unwrap();
    let err = rec.stop();
    let client: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(client["ok"], 40, "{client}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("requests.json")).unwrap())
            .unwrap();
    let p = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64() == Some(u64::from(pid)))
        .cloned()
        .unwrap_or_else(|| panic!("the server is not in {r:#}\n{err}"));
    assert_eq!(p["routes"].as_array().unwrap().len(), 0, "{p:#}");
    let exchanges = p["tls"]["exchanges"].as_u64().unwrap();
    assert!((40..=46).contains(&exchanges), "{p:#}");
    assert!(
        p["tls"]["note"].as_str().unwrap().contains("encrypted"),
        "{p:#}"
    );
    assert_eq!(r["unparsed"], 0, "{r:#}");
    assert!(err.contains("TLS:"), "{err}");
}
