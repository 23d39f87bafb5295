//! End-to-end: requests a real Node.js `http` server answers
//! (tests/node/red.js), driven by a load generator that measures itself
//! (tests/node/load.js), against what the kernel saw.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use tests::*;

/// The server, and the port it printed.
fn start_server() -> (KillOnDrop, u16) {
    let mut child = Command::new("node")
        .arg(workspace().join("tests/node/red.js"))
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

/// `COUNT` requests at `RATE`/s over keep-alive connections: the client's
/// own figures.
fn load(port: u16, path: &str, count: u32, rate: u32) -> serde_json::Value {
    let out = Command::new("node")
        .arg(workspace().join("tests/node/load.js"))
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .args([&count.to_string(), &rate.to_string(), "4", "keepalive"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Per route: requests within 2% of what the client sent (the same count
/// here), 5xx and 4xx exact, p50 and p99 within 3 ms of the client's own;
/// `/slow/7` is the route `/slow/:id`.
#[test]
fn red_per_route_matches_the_clients_own_figures() {
    if !require_root("red_per_route_matches_the_clients_own_figures") {
        return;
    }
    let dir = scratch("red-routes");
    let out_dir = dir.join("out");
    let (server, port) = start_server();
    let pid = server.0[0].id().to_string();
    let rec = start_record(&["-p", &pid, "-o", out_dir.to_str().unwrap()]);
    let cases = [
        ("/slow/7", "/slow/:id", 300, 100),
        ("/flaky/3", "/flaky/:id", 300, 100),
        ("/nope", "/nope", 100, 100),
    ];
    let clients: Vec<serde_json::Value> = cases
        .iter()
        .map(|(path, _, n, rate)| load(port, path, *n, *rate))
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
        for (q, theirs) in [("p50", "p50_ms"), ("p99", "p99_ms")] {
            let o = x["duration_ms"][q].as_f64().unwrap();
            let t = c[theirs].as_f64().unwrap();
            assert!(
                (o - t).abs() <= 3.0,
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
