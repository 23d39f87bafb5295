//! End-to-end: `report.html` in a real browser (headless Chromium over
//! the DevTools protocol). A program with phases in time (phase_alpha
//! for 2 s, a 1 s sleep, phase_beta for 2 s) is recorded; the page's heat
//! map must hold the capture's samples cell by cell, a range dragged with
//! the mouse must fold the flame graph to that range's functions, search
//! must highlight the frames it names, the plots must have their bars and
//! lines, and the page must report no error. A screenshot is kept beside
//! the capture for a person to look at.

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde_json::Value;
use tests::{browser::Browser, *};

/// Slices (of `slice_ms`) holding samples of stacks with a frame named
/// `name`, from timeline.json.
fn slices_of(t: &Value, name: &str) -> Vec<u64> {
    let frames: Vec<&str> = t["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    let stacks = t["stacks"].as_array().unwrap();
    let has = |i: u64| {
        stacks[i as usize]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| frames[f.as_u64().unwrap() as usize] == name)
    };
    let s: Vec<u64> = t["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    s.chunks(3).filter(|c| has(c[1])).map(|c| c[0]).collect()
}

/// The time away (us) of the sleep's stacks in timeline.json's off-CPU
/// intervals, and the first and last slice they cover.
fn sleep_spans(t: &Value) -> (u64, u64, u64) {
    let off = &t["offcpu"];
    let frames: Vec<&str> = off["frames"]
        .as_array()
        .expect("timeline.json offcpu")
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    let stacks = off["stacks"].as_array().unwrap();
    let sleep = |i: u64| {
        stacks[i as usize]
            .as_array()
            .unwrap()
            .last()
            .is_some_and(|f| frames[f.as_u64().unwrap() as usize] == "[off-cpu: sleep]")
    };
    let spans: Vec<u64> = off["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let (mut us, mut first, mut last) = (0, u64::MAX, 0);
    for c in spans.chunks(4).filter(|c| sleep(c[2])) {
        us += c[3];
        first = first.min(c[0]);
        last = last.max(c[1]);
    }
    (us, first, last)
}

fn names_in(b: &mut Browser, flame: &str) -> Vec<String> {
    let v = b.eval(&format!(
        "[...document.querySelectorAll('#{flame} .f')].map(f => f.dataset.name)"
    ));
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

/// Drags across the heat map from the top of column `c0` to the bottom
/// of column `c1`.
fn drag_columns(b: &mut Browser, c0: u64, c1: u64) {
    let (left, top, _, _) = b.rect("#heatmap");
    let h = b.eval("[report.heat.cw, report.heat.ch, report.heat.rows]");
    let (cw, ch, rows) = (
        h[0].as_f64().unwrap(),
        h[1].as_f64().unwrap(),
        h[2].as_f64().unwrap(),
    );
    b.drag(
        (left + (c0 as f64 + 0.5) * cw, top + 0.5 * ch),
        (left + (c1 as f64 + 0.5) * cw, top + (rows - 0.5) * ch),
    );
}

#[test]
fn report_heat_map_selection_and_search_in_chromium() {
    if !require_root("report_heat_map_selection_and_search_in_chromium") {
        return;
    }
    let dir = scratch("report");
    let exe = build_c(
        "phases.c",
        &dir.join("phases"),
        &["-O1", "-g", "-fno-omit-frame-pointer"],
    );
    let out = dir.join("out");
    record_ok(
        &dir,
        &[
            "-F",
            "199",
            "-q",
            "-o",
            out.to_str().unwrap(),
            "--",
            exe.to_str().unwrap(),
            "2000",
            "1000",
            "2000",
        ],
    );

    // The capture keeps each sample's time: the phases do not overlap.
    let t: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("timeline.json")).unwrap()).unwrap();
    let slice_ms = t["slice_ms"].as_f64().unwrap();
    assert_eq!(slice_ms, 10.0);
    let (alpha, beta) = (slices_of(&t, "phase_alpha"), slices_of(&t, "phase_beta"));
    assert!(
        alpha.len() > 100 && beta.len() > 100,
        "{} {}",
        alpha.len(),
        beta.len()
    );
    let alpha_end = *alpha.iter().max().unwrap() as f64 * slice_ms;
    let beta_start = *beta.iter().min().unwrap() as f64 * slice_ms;
    assert!(
        beta_start - alpha_end > 900.0,
        "the 1 s sleep between the phases: alpha ends at {alpha_end} ms, beta starts at {beta_start} ms"
    );
    let folded_total: u64 = read_folded(&out).values().sum();
    let samples: Vec<u64> = t["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        samples.chunks(3).map(|c| c[2]).sum::<u64>(),
        folded_total,
        "every sample of stacks.folded has its time"
    );
    // The per-second series in use.json.
    let u = read_use(&out);
    let seconds = u["seconds"].as_array().expect("use.json seconds");
    assert!(seconds.len() >= 5, "{} seconds", seconds.len());
    let busy: f64 = seconds[0]["cpu_busy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!(
        busy > 0.9,
        "phase_alpha keeps a CPU busy in second 1: {busy}"
    );
    // The 1 s sleep, off the CPU, in the second it ended.
    let slept: f64 = seconds
        .iter()
        .map(|s| s["offcpu_ms"]["sleep"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    assert!(
        (900.0..1200.0).contains(&slept),
        "the 1 s sleep in one second's off-CPU time: {slept} ms"
    );
    // Off-CPU time keeps its time too: the sleep's interval lies between
    // the phases, to a slice or two.
    let (sleep_us, sleep_first, sleep_last) = sleep_spans(&t);
    assert!(
        (900_000..1_200_000).contains(&sleep_us),
        "the 1 s sleep's time away in timeline.json: {sleep_us} us"
    );
    assert!(
        sleep_first as f64 * slice_ms >= alpha_end - 20.0
            && sleep_last as f64 * slice_ms <= beta_start + 20.0,
        "the sleep in slices {sleep_first}..={sleep_last}, between {alpha_end} and {beta_start} ms"
    );

    let mut b = Browser::launch(1400, 1000);
    let ready = b.open(&out.join("report.html"), Duration::from_secs(30));
    eprintln!(
        "report.html ready {} ms after navigation",
        ready.as_millis()
    );
    assert!(b.errors.is_empty(), "page errors: {:?}", b.errors);

    // The heat map: 50 cells of 20 ms a second, each holding the samples
    // of its two 10 ms slices.
    let heat =
        b.eval("({cols: report.heat.cols, rows: report.heat.rows, counts: report.heat.counts})");
    let rows = heat["rows"].as_u64().unwrap();
    let cols = heat["cols"].as_u64().unwrap();
    assert_eq!(rows, 50);
    assert!(cols >= 5, "{cols} columns");
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    for c in samples.chunks(3) {
        *expected.entry(c[0] / 2).or_default() += c[2];
    }
    let counts: Vec<u64> = heat["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(counts.len() as u64, cols * rows);
    for (i, &n) in counts.iter().enumerate() {
        assert_eq!(
            n,
            expected.get(&(i as u64)).copied().unwrap_or(0),
            "cell {i} (second {}, row {})",
            i as u64 / rows,
            i as u64 % rows
        );
    }
    // The cells of the sleep are empty (only the program is profiled).
    let (quiet0, quiet1) = (
        (alpha_end / 20.0) as usize + 2,
        (beta_start / 20.0) as usize - 1,
    );
    assert!(quiet1 > quiet0 + 40, "{quiet0}..{quiet1}");
    assert!(
        counts[quiet0..quiet1].iter().all(|&n| n == 0),
        "samples while asleep: {:?}",
        &counts[quiet0..quiet1]
    );

    // The whole capture: both phases in the flame graph.
    let all = names_in(&mut b, "flame-cpu");
    assert!(all.iter().any(|n| n == "phase_alpha") && all.iter().any(|n| n == "phase_beta"));

    // Drag over the first two seconds: phase_alpha alone.
    drag_columns(&mut b, 0, 1);
    let first = names_in(&mut b, "flame-cpu");
    assert!(
        first.iter().any(|n| n == "phase_alpha") && !first.iter().any(|n| n == "phase_beta"),
        "seconds 0-2: {first:?}"
    );
    let range = b.eval("document.getElementById('range').textContent");
    assert!(
        range
            .as_str()
            .unwrap()
            .starts_with("Selected 0.00 s to 2.00 s"),
        "{range}"
    );
    // Off the CPU in those seconds: not the sleep, which came after.
    let off = names_in(&mut b, "flame-offcpu");
    assert!(
        !off.iter().any(|n| n == "[off-cpu: sleep]"),
        "off-CPU in seconds 0-2: {off:?}"
    );
    // Over the sleep's seconds: the sleep, with its time.
    let (s0, s1) = (
        (sleep_first as f64 * slice_ms / 1000.0) as u64,
        (sleep_last as f64 * slice_ms / 1000.0) as u64,
    );
    drag_columns(&mut b, s0, s1);
    let off = names_in(&mut b, "flame-offcpu");
    assert!(
        off.iter().any(|n| n == "[off-cpu: sleep]"),
        "off-CPU in seconds {s0}-{}: {off:?}",
        s1 + 1
    );
    let in_range = b.eval("report.flames.offcpu.root.value");
    assert!(
        in_range.as_f64().unwrap() >= 0.9 * sleep_us as f64,
        "the sleep's {sleep_us} us in the selected range: {in_range}"
    );
    // Then over the beta phase's seconds: phase_beta alone.
    let b0 = (beta_start / 1000.0).ceil() as u64;
    drag_columns(&mut b, b0, b0 + 1);
    let later = names_in(&mut b, "flame-cpu");
    assert!(
        later.iter().any(|n| n == "phase_beta") && !later.iter().any(|n| n == "phase_alpha"),
        "seconds {b0}-{}: {later:?}",
        b0 + 2
    );

    // Search highlights the frames it names, and says their share.
    b.type_into("#search", "phase_b");
    let matched =
        b.eval("[...document.querySelectorAll('#flame-cpu .f.match')].map(f => f.dataset.name)");
    let matched: Vec<&str> = matched
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        !matched.is_empty() && matched.iter().all(|n| n.contains("phase_b")),
        "{matched:?}"
    );
    let share = b.eval("document.getElementById('matched').textContent");
    assert!(share.as_str().unwrap().starts_with("matched "), "{share}");

    // Plots: the run-queue histogram has bars, the series have lines.
    let bars = b.eval("document.querySelectorAll('.hist rect.bar').length");
    assert!(bars.as_u64().unwrap() > 0, "histogram bars: {bars}");
    let lines = b.eval("document.querySelectorAll('.line polyline').length");
    assert!(lines.as_u64().unwrap() >= 6, "series lines: {lines}");
    // The off-CPU band: the sleep's time in the seconds it was spent.
    let band = b.eval(
        "[...document.querySelectorAll('#offcpu-band rect[data-cause=sleep]')].map(r => +r.dataset.ms)",
    );
    let band: Vec<f64> = band
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let band_ms: f64 = band.iter().sum();
    assert!(
        (band_ms - sleep_us as f64 / 1000.0).abs() < 5.0
            && band.iter().all(|&ms| ms <= 1000.5)
            && band.len() <= 3,
        "the sleep in the off-CPU band, per second: {band:?}"
    );
    let use_rows = b.eval("document.querySelectorAll('#use-table tr').length");
    assert_eq!(use_rows.as_u64(), Some(4), "header and three resources");

    let shot = out.join("report.png");
    b.screenshot(&shot);
    eprintln!("screenshot: {}", shot.display());
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    assert!(b.errors.is_empty(), "page errors: {:?}", b.errors);
    check_offline(&out.join("report.html"));
}

/// The page fetches nothing: no external script, style, image or font.
pub fn check_offline(page: &Path) {
    let html = std::fs::read_to_string(page).unwrap();
    for fetch in [
        "src=",
        "href=",
        "@import",
        "url(",
        "fetch(",
        "XMLHttpRequest",
    ] {
        assert!(!html.contains(fetch), "{fetch} in {}", page.display());
    }
}

/// The daemon serves its last window's report at `/`: the page works
/// in the browser and its heat map holds the window's samples of a busy
/// loop, in the window's own seconds.
#[test]
fn daemon_serves_the_window_report() {
    if !require_root("daemon_serves_the_window_report") {
        return;
    }
    let dir = scratch("report-daemon");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _spin = KillOnDrop(busy_loops(1, 20));
    let d = start_daemon(
        Some(addr),
        &[
            "--window",
            "3s",
            "--ecs-agent",
            "none",
            "-F",
            "199",
            "--off-cpu",
        ],
    );
    let (status, body) = d.get("/");
    assert_eq!(status, 200);
    if !String::from_utf8_lossy(&body).starts_with("<!doctype html>") {
        // No window has finished yet: the endpoints' list, then the page.
        assert!(String::from_utf8_lossy(&body).contains("/help"));
        std::thread::sleep(Duration::from_secs(4));
    }
    // A later window: its times count from its own start.
    std::thread::sleep(Duration::from_secs(3));
    let (status, body) = d.get("/");
    assert_eq!(status, 200);
    let page = dir.join("report.html");
    std::fs::write(&page, &body).unwrap();
    check_offline(&page);
    drop(d);

    let mut b = Browser::launch(1400, 1000);
    b.open(&page, Duration::from_secs(30));
    assert!(b.errors.is_empty(), "page errors: {:?}", b.errors);
    let heat = b.eval(
        "({cols: report.heat.cols, total: report.heat.counts.reduce((a, b) => a + b, 0), flame: report.flames.cpu.root.value})",
    );
    let (cols, total, flame) = (
        heat["cols"].as_u64().unwrap(),
        heat["total"].as_u64().unwrap(),
        heat["flame"].as_u64().unwrap(),
    );
    assert!((3..=4).contains(&cols), "a 3 s window: {cols} columns");
    // A busy loop on one CPU at 199 Hz for 3 s: about 600 samples.
    assert!(total > 400, "{total} samples in the heat map");
    assert_eq!(
        total, flame,
        "the heat map and the flame graph count the same samples"
    );
    let names = names_in(&mut b, "flame-cpu");
    assert!(
        names.iter().any(|n| n == "sh"),
        "the busy loop (sh): {names:?}"
    );
    // Off-CPU time (the host's threads) is timed in the window's seconds.
    let off = b.eval(
        "(() => { const s = D.cpu.offcpu.spans; let last = 0; for (let i = 0; i < s.length; i += 4) last = Math.max(last, s[i + 1]); return [s.length / 4, last, D.cpu.slice_ms]; })()",
    );
    let (n, last, slice_ms) = (
        off[0].as_f64().unwrap(),
        off[1].as_f64().unwrap(),
        off[2].as_f64().unwrap(),
    );
    assert!(n > 0.0, "off-CPU intervals in the window");
    assert!(
        last * slice_ms < (cols as f64 + 0.5) * 1000.0,
        "the last off-CPU interval ends at {} ms of a {cols} s window",
        last * slice_ms
    );
    b.screenshot(&dir.join("report.png"));
}

/// How fast a given report opens: `REPORT=DIR/report.html cargo test
/// --release -p tests --test report -- --ignored --nocapture page_speed`
/// prints its size, the first contentful paint and the time until its
/// script is done, in headless Chromium.
#[test]
#[ignore = "a measurement of a given page (REPORT=path)"]
fn page_speed() {
    let page = std::path::PathBuf::from(std::env::var("REPORT").expect("REPORT=path/report.html"));
    let size = std::fs::metadata(&page).unwrap().len();
    let mut b = Browser::launch(1400, 1000);
    let ready = b.open(&page, Duration::from_secs(120));
    let fcp = b.eval(
        "(performance.getEntriesByName('first-contentful-paint')[0] || {startTime: -1}).startTime",
    );
    let heat = b.eval("report.heat ? report.heat.cols * report.heat.rows : 0");
    let t0 = std::time::Instant::now();
    b.eval("report.select(0, 100); report.select(null); 1");
    let reselect = t0.elapsed();
    println!(
        "{}: {:.1} MB; first contentful paint {} ms; script done {} ms after navigation; {} heat-map cells; two range selections {} ms",
        page.display(),
        size as f64 / 1e6,
        fcp.as_f64().unwrap_or(-1.0).round(),
        ready.as_millis(),
        heat,
        reselect.as_millis()
    );
    assert!(b.errors.is_empty(), "{:?}", b.errors);
}

/// HTTP requests keep their time: a real Node.js service under
/// autocannon for 2 s of a 5 s capture; timeline.json holds each request
/// answered (as many as requests.json counts), all in the load's
/// seconds; in the browser, the range table of a dragged range counts
/// exactly the requests answered in it.
#[test]
fn requests_keep_their_time() {
    if !require_root("requests_keep_their_time") {
        return;
    }
    let dir = scratch("report-requests");
    let out = dir.join("out");
    let (service, port) = tests::node::start_service(&dir, &[]);
    let service = KillOnDrop(vec![service]);
    let pid = service.0[0].id().to_string();
    let rec = start_record(&["-d", "5", "-q", "-p", &pid, "-o", out.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(300));
    let mut load = tests::node::load(port, 2);
    load.wait().unwrap();
    rec.finish();
    drop(service);

    let t: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("timeline.json")).unwrap()).unwrap();
    let q: Vec<u64> = t["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let routes = t["routes"].as_array().unwrap();
    let times: Vec<u64> = q.chunks(4).map(|c| c[0]).collect();
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("requests.json")).unwrap()).unwrap();
    let counted = r["processes"][0]["requests"].as_u64().unwrap();
    assert!(counted > 100, "{counted} requests under autocannon");
    assert_eq!(times.len() as u64, counted, "every request with its time");
    assert!(
        routes
            .iter()
            .any(|r| r.as_str().unwrap().starts_with("GET /docs/:id")),
        "{routes:?}"
    );
    let (first, last) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
    assert!(
        first >= 200 && last <= 3500 && last - first >= 1500,
        "the load's 2 s: {first}..{last} ms"
    );

    let mut b = Browser::launch(1400, 1000);
    b.open(&out.join("report.html"), Duration::from_secs(30));
    assert!(b.errors.is_empty(), "page errors: {:?}", b.errors);
    // The latency heat map holds every request.
    let in_map = b.eval("report.latency.counts.reduce((a, b) => a + b, 0)");
    assert_eq!(
        in_map.as_u64(),
        Some(counted),
        "requests in the latency map"
    );
    // Second 1 alone (1000..2000 ms).
    drag_columns(&mut b, 1, 1);
    let shown = b.eval(
        "[...document.querySelectorAll('#range-routes tr')].slice(1).reduce((n, r) => n + Number(r.dataset.count), 0)",
    );
    let expected = times.iter().filter(|&&t| (1000..2000).contains(&t)).count() as u64;
    assert!(expected > 50, "{expected} requests in second 1");
    assert_eq!(
        shown.as_u64(),
        Some(expected),
        "requests in the range table"
    );
    b.screenshot(&out.join("report.png"));
    assert!(b.errors.is_empty(), "page errors: {:?}", b.errors);
}
