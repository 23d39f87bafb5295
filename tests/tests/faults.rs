//! Faults survived: a full disk, the output directory removed, a second
//! Ctrl-C, kernel maps full, a fork storm.

use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use tests::*;

/// Files with final names are complete; no temporary file is left.
fn assert_complete_or_absent(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.ends_with(".tmp"),
            "temporary file left: {}",
            p.display()
        );
        let text = std::fs::read_to_string(&p).unwrap();
        match name.as_str() {
            "use.json" | "symbols.json" => {
                serde_json::from_str::<serde_json::Value>(&text)
                    .unwrap_or_else(|e| panic!("{name} incomplete: {e}"));
            }
            "flamegraph.svg" => assert!(text.trim_end().ends_with("</svg>"), "{name} cut"),
            "stacks.folded" => assert!(
                text.lines().all(|l| l
                    .rsplit(' ')
                    .next()
                    .is_some_and(|c| c.parse::<u64>().is_ok())),
                "{name} cut"
            ),
            _ => {}
        }
    }
}

/// The output filesystem fills up: a clear error naming the file and what
/// to do, exit 1, and no file left with its final name half-written.
#[test]
fn full_disk_is_a_clear_error() {
    if !require_root("full_disk_is_a_clear_error") {
        return;
    }
    let dir = scratch("disk-full");
    let mnt = dir.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    // 24 KiB: room for use.json, not for a flame graph of a busy host.
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24k", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount tmpfs");
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Umount(mnt.clone());
    let loops = busy_loops(2, 4);
    let out_dir = mnt.join("out");
    let out = record_in(
        &dir,
        &["-F", "499", "-d", "2", "-o", out_dir.to_str().unwrap()],
    );
    // (`timeout` ends them; killing it would orphan the shell.)
    for mut l in loops {
        let _ = l.wait();
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("Free space"), "no advice in: {err}");
    assert_complete_or_absent(&out_dir);
}

/// The output directory is removed while recording: a clear error, exit
/// 1, nothing written elsewhere.
#[test]
fn removed_output_directory_is_a_clear_error() {
    if !require_root("removed_output_directory_is_a_clear_error") {
        return;
    }
    let dir = scratch("dir-removed");
    let out_dir = dir.join("out");
    let rec = start_record(&["-d", "2", "-o", out_dir.to_str().unwrap()]);
    std::fs::remove_dir_all(&out_dir).unwrap();
    let status = rec.wait_any();
    assert_eq!(status.0, Some(1), "{}", status.1);
    assert!(status.1.contains("was removed"), "{}", status.1);
    assert!(!out_dir.exists());
}

/// A second Ctrl-C while the files are being written aborts at once
/// (exit 130), saying so.
#[test]
fn second_ctrl_c_aborts_at_once() {
    if !require_root("second_ctrl_c_aborts_at_once") {
        return;
    }
    let dir = scratch("ctrl-c-twice");
    let out_dir = dir.join("out");
    // A Node.js workload at 999 Hz: its 90 MB binary takes a while to
    // symbolize, the window for the second Ctrl-C.
    let mut node = Command::new("node")
        .args([
            "--perf-basic-prof",
            "--interpreted-frames-native-stack",
            "--allow-natives-syntax",
        ])
        .arg(workspace().join("tests/workloads/busy.js"))
        .arg("8")
        // --perf-basic-prof also writes V8's isolate log into the cwd.
        .current_dir(&dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("node is needed");
    thread::sleep(Duration::from_millis(500));
    let rec = start_record(&["-F", "999", "-o", out_dir.to_str().unwrap()]);
    thread::sleep(Duration::from_secs(2));
    let pid = rec.pid() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    thread::sleep(Duration::from_millis(30));
    let t = Instant::now();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let (code, err) = rec.wait_any();
    let took = t.elapsed();
    let _ = node.kill();
    let _ = node.wait();
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("interrupted again, aborting"), "{err}");
    // At once: before the flame graph (written last, after symbolizing
    // Node's binary) was done. The exit itself takes the kernel's time:
    // unregistering each of the some forty tracepoints attached waits for
    // an RCU grace period (about 2 s in all here), whatever we do.
    assert!(took < Duration::from_secs(5), "took {took:?} to abort");
    assert!(
        !out_dir.join("flamegraph.svg").exists(),
        "the second Ctrl-C did not stop the writing"
    );
    assert_complete_or_absent(&out_dir);
}

/// Kernel maps too small for the stacks: the overflow is counted and
/// reported, and the capture goes on to write what fit.
#[test]
fn full_kernel_maps_are_counted_and_the_capture_goes_on() {
    if !require_root("full_kernel_maps_are_counted_and_the_capture_goes_on") {
        return;
    }
    let dir = scratch("maps-full");
    let out_dir = dir.join("out");
    // Two busy loops sampled at 499 Hz into a 4-entry count map; stderr
    // and the count of samples lost.
    let capture = |extra: &[&str]| -> (String, u64) {
        let loops = busy_loops(2, 3);
        let mut args = extra.to_vec();
        args.extend([
            "--unwind",
            "fp",
            "--max-stacks",
            "4",
            "-F",
            "499",
            "-d",
            "2",
        ]);
        args.extend(["-o", out_dir.to_str().unwrap()]);
        let out = record_ok(&dir, &args);
        for mut l in loops {
            let _ = l.wait();
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let lost: u64 = err
            .lines()
            .find_map(|l| l.strip_prefix("profiler: lost "))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no lost count in {err}"));
        (err, lost)
    };
    let (err, lost) = capture(&[]);
    assert!(lost > 0, "a 4-entry count map lost nothing:\n{err}");
    // Without --verbose the kernel programs say nothing.
    assert!(!err.contains("profiler: kernel "), "{err}");
    let folded = read_folded(&out_dir);
    assert!(!folded.is_empty() && folded.len() <= 8, "{folded:#?}");
    let u = read_use(&out_dir);
    assert!(u["cpu"]["count"].as_u64().unwrap() >= 1);
    // The books balance: every sample the kernel took is in the stacks
    // or counted lost, and the stacks are what stacks.folded holds.
    let books = &u["profiler"]["samples"];
    let n = |k: &str| {
        books[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {books}"))
    };
    assert_eq!(
        n("taken"),
        n("kept") + n("lost_count_map") + n("lost_ring") + n("lost_sent_aside"),
        "{books}"
    );
    assert_eq!(
        n("lost_count_map") + n("lost_sent_aside"),
        lost,
        "{books}\n{err}"
    );
    assert_eq!(
        folded.values().sum::<u64>(),
        n("kept"),
        "stacks.folded against {books}"
    );

    // With it, the sampler says which samples it lost, as they are lost
    // (aya-log), one line per sample lost in the kernel's count map. The
    // losses must happen there, not to stacks that collided in the stack
    // map and went to userspace (which the kernel does not tell): 32
    // copies of a static loop share one or two stacks, so their 32 keys
    // differ by process only and a 16-entry count map overflows in the
    // kernel.
    let spin = build_c(
        "spin.c",
        &dir.join("spin"),
        &["-O1", "-static", "-no-pie", "-fno-omit-frame-pointer"],
    );
    let spinners: Vec<_> = (0..32)
        .map(|_| Command::new(&spin).arg("4").spawn().expect("spawn spin"))
        .collect();
    thread::sleep(Duration::from_millis(200));
    // Only the spinners: another process's stacks filling the 16-entry
    // stack map first would send every spinner sample aside as a
    // collision, and the count map would never see them.
    let pids: Vec<String> = spinners.iter().map(|c| c.id().to_string()).collect();
    let mut args = vec![
        "--verbose",
        "--unwind",
        "fp",
        "--max-stacks",
        "16",
        "-F",
        "499",
        "-d",
        "2",
        "-o",
        out_dir.to_str().unwrap(),
    ];
    for p in &pids {
        args.extend(["-p", p.as_str()]);
    }
    let out = record_ok(&dir, &args);
    for mut s in spinners {
        let _ = s.kill();
        let _ = s.wait();
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("profiler: lost "))
        .unwrap_or_else(|| panic!("no lost count in {err}"));
    let number = |s: &str| -> u64 { s.split_whitespace().next().unwrap().parse().unwrap() };
    // "N samples (count map full) (K in the kernel's count map, ...)"
    // when some were lost in userspace too.
    let in_kernel = match line.split_once(") (") {
        Some((_, rest)) if rest.contains("in the kernel's count map") => number(rest),
        _ => number(line),
    };
    let said = err
        .lines()
        .filter(|l| l.starts_with("profiler: kernel warn: count map full: a sample of pid "))
        .count() as u64;
    assert!(
        in_kernel > 0 && said > 0,
        "{said} of {in_kernel} samples lost in the kernel told:\n{err}"
    );
    // The log ring may overflow on a slow machine; it never invents.
    assert!(said <= in_kernel, "{said} told, {in_kernel} lost:\n{err}");
}

/// Thousands of short-lived processes while the daemon runs: it keeps
/// up, forgets them once gone, and a second storm does not grow its memory
/// past the first's (caches bounded, nothing unbounded).
#[test]
fn fork_storm_is_survived() {
    if !require_root("fork_storm_is_survived") {
        return;
    }
    let port = free_port();
    let d = start_daemon(
        Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        &["--window", "1s", "--ecs-agent", "none", "-F", "199"],
    );
    thread::sleep(Duration::from_secs(2));
    let rss_start = rss_kib(d.pid());
    let forks = || -> u64 {
        std::fs::read_to_string("/proc/stat")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("processes "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    // 8 shells, each forking short-lived children as fast as it can.
    let storm = |secs: u32| -> (u64, f64, u64) {
        let started = forks();
        let t = Instant::now();
        let shells: Vec<_> = (0..8)
            .map(|_| {
                Command::new("sh")
                    .args([
                        "-c",
                        &format!("end=$(($(date +%s) + {secs})); while [ $(date +%s) -lt $end ]; do /bin/true; /bin/true; /bin/true; /bin/true; done"),
                    ])
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut peak = 0;
        for mut s in shells {
            while s.try_wait().unwrap().is_none() {
                peak = peak.max(rss_kib(d.pid()));
                thread::sleep(Duration::from_millis(200));
            }
        }
        (forks() - started, t.elapsed().as_secs_f64(), peak)
    };
    let settle = || {
        // A few windows: the exited processes are forgotten.
        thread::sleep(Duration::from_secs(4));
        let (_, body) = d.get("/metrics");
        let tracked = metric_sum(
            &String::from_utf8_lossy(&body),
            "profiler_tracked_processes",
        );
        (tracked, rss_kib(d.pid()))
    };
    let (n1, s1, peak1) = storm(6);
    let (tracked1, rss1) = settle();
    let (n2, s2, peak2) = storm(6);
    let (tracked2, rss2) = settle();
    eprintln!(
        "fork storm: {n1} processes in {s1:.1} s ({:.0}/s), then {n2} in {s2:.1} s ({:.0}/s); daemon RSS {rss_start} KiB at start, peak {peak1} KiB, {rss1} KiB after the first storm ({tracked1} processes tracked), peak {peak2} KiB, {rss2} KiB after the second ({tracked2} tracked)",
        n1 as f64 / s1,
        n2 as f64 / s2
    );
    assert!(n1 > 2000 && n2 > 2000, "{n1}, {n2} processes: not a storm");
    assert!(
        tracked1 < 200.0 && tracked2 < 200.0,
        "{tracked1}, {tracked2} processes still tracked"
    );
    assert!(
        rss2 <= rss1 + rss1 / 10 + 8 * 1024,
        "RSS grew from {rss1} KiB after one storm to {rss2} KiB after two"
    );
    let (_, svg) = d.get("/flamegraph.svg");
    assert!(String::from_utf8_lossy(&svg).contains("</svg>"));
    d.stop();
}
