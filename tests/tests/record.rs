//! End-to-end: `profiler record` against workloads whose profile is known.

use std::{process::Command, thread, time::Duration};

use tests::*;

const FP_FLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-fno-omit-frame-pointer",
    "-mno-omit-leaf-frame-pointer",
];

/// The known workload, profiled as a command: each function's share of
/// the process's samples within 3 points of what it was built to take.
#[test]
fn known_workload_shares_are_right() {
    if !require_root("known_workload_shares_are_right") {
        return;
    }
    let dir = scratch("known");
    let exe = build_c("known.c", &dir.join("known"), FP_FLAGS);
    let out_dir = dir.join("out");
    let out = record_ok(
        &dir,
        &[
            "-F",
            "999",
            "-o",
            out_dir.to_str().unwrap(),
            "--",
            exe.to_str().unwrap(),
            "4",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("samples in"), "no summary: {stderr}");
    assert!(out_dir.join("flamegraph.svg").is_file());

    // Only the workload was profiled: every stack is rooted at it.
    let folded = read_folded(&out_dir);
    assert!(
        folded.keys().all(|l| l.starts_with("known;")),
        "{folded:#?}"
    );
    assert_known_shares(
        "framed leaves, default unwinding",
        &known_shares(&out_dir, "known"),
        2500,
    );
}

/// A process that exits two seconds before the capture ends is still
/// named: its maps were read while it lived.
#[test]
fn exited_process_is_still_symbolized() {
    if !require_root("exited_process_is_still_symbolized") {
        return;
    }
    let dir = scratch("exits");
    let exe = build_c("known.c", &dir.join("shortlived"), FP_FLAGS);
    let out_dir = dir.join("out");
    let profiler = start_record(&["-F", "499", "-d", "3", "-o", out_dir.to_str().unwrap()]);
    let status = Command::new(&exe)
        .arg("1.2")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    profiler.finish();

    let folded = read_folded(&out_dir);
    let total = samples_where(&folded, "shortlived", |_| true);
    let named = samples_where(&folded, "shortlived", |f| {
        f.contains(&"work_alpha") || f.contains(&"work_beta") || f.contains(&"work_delta")
    });
    assert!(
        total > 300,
        "too few samples of the exited workload: {total}"
    );
    assert!(
        pct(named, total) > 90.0,
        "only {named} of {total} samples named after exit:\n{folded:#?}"
    );
}

/// Node.js with --perf-basic-prof: the JS functions are named from the
/// perf map, with the shares they were written to take (70/30).
#[test]
fn nodejs_functions_are_named_with_their_shares() {
    if !require_root("nodejs_functions_are_named_with_their_shares") {
        return;
    }
    let node = ["node", "nodejs"].into_iter().find(|n| {
        Command::new(n)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(node) = node else {
        panic!("Node.js is needed for this test (apt-get install nodejs); .ci/run installs it");
    };
    let dir = scratch("node");
    let out_dir = dir.join("out");
    let script = workspace().join("tests/workloads/busy.js");
    record_ok(
        &dir,
        &[
            "-F",
            "999",
            "-o",
            out_dir.to_str().unwrap(),
            "--",
            node,
            "--perf-basic-prof",
            "--interpreted-frames-native-stack",
            "--allow-natives-syntax",
            script.to_str().unwrap(),
            "4",
        ],
    );
    let folded = read_folded(&out_dir);
    let has = |name: &'static str| {
        move |f: &[&str]| {
            f.iter()
                .any(|fr| fr.contains(name) && fr.contains("busy.js"))
        }
    };
    let a = samples_where(&folded, "node", has("hotA"));
    let b = samples_where(&folded, "node", has("hotB"));
    let total = samples_where(&folded, "node", |_| true);
    eprintln!("node: hotA {a}, hotB {b}, of {total} samples");
    assert!(
        a + b > 1500,
        "JS functions named in too few samples ({a} + {b} of {total}):\n{folded:#?}"
    );
    // The command's own process, read while it lived and read again as a
    // zombie (no maps) or while V8 tore itself down (its code unmapped):
    // its stacks stay named.
    let unnamed = samples_where(&folded, "node", |f| {
        f.iter()
            .any(|fr| fr.starts_with("[unknown") || fr.contains("+0x"))
    });
    assert!(
        pct(unnamed, total) < 5.0,
        "{unnamed} of {total} node samples have an unknown frame:\n{folded:#?}"
    );
    let share_a = pct(a, a + b);
    assert!(
        (share_a - 70.0).abs() <= 5.0,
        "hotA took {share_a:.1}% of the JS samples, expected 70 ± 5"
    );
    // Unwinding crosses from JIT code (frame pointers) into native code
    // (CFI) down to the process's start.
    let crossed = samples_where(&folded, "node", |f| {
        f.iter().any(|fr| fr.contains("hotA")) && f.iter().any(|fr| fr.starts_with("node::Start"))
    });
    assert!(
        crossed * 10 >= a * 8,
        "only {crossed} of {a} hotA samples reach node::Start below them"
    );
    // JS frames are annotated as JIT code.
    assert!(
        folded
            .keys()
            .any(|l| l.contains("hotA") && l.contains("_[j]"))
    );
}

/// SIGTERM and Ctrl-C (SIGINT) end an open-ended capture early and still
/// write everything.
#[test]
fn signals_end_the_capture_and_outputs_are_written() {
    if !require_root("signals_end_the_capture_and_outputs_are_written") {
        return;
    }
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "Ctrl-C")] {
        let dir = scratch(&format!("signal-{sig}"));
        let out_dir = dir.join("out");
        let rec = start_record(&["-F", "199", "-o", out_dir.to_str().unwrap()]);
        thread::sleep(Duration::from_millis(1000));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(rec.pid() as i32, sig) };
        let err = rec.finish();
        assert!(err.contains(name), "{name} not reported: {err}");
        let folded = read_folded(&out_dir);
        assert!(
            folded.values().sum::<u64>() > 0,
            "{name}: no samples written"
        );
        assert!(
            std::fs::read_to_string(out_dir.join("flamegraph.svg"))
                .unwrap()
                .contains("</svg>")
        );
        assert!(!out_dir.join("stacks.tmp").exists() && !out_dir.join("flamegraph.tmp").exists());
    }
}

/// `-p PID` profiles that process only, all its threads, and the capture
/// ends when it exits.
#[test]
fn pid_filter_keeps_only_that_process() {
    if !require_root("pid_filter_keeps_only_that_process") {
        return;
    }
    let dir = scratch("pid");
    let exe = build_c("known.c", &dir.join("target_proc"), FP_FLAGS);
    let mut target = Command::new(&exe)
        .arg("2")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Noise that must not show up.
    let mut noise = Command::new(&exe)
        .arg("2")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out_dir = dir.join("out");
    let pid = target.id().to_string();
    let out = record_ok(
        &dir,
        &["-F", "499", "-p", &pid, "-o", out_dir.to_str().unwrap()],
    );
    target.wait().unwrap();
    noise.wait().unwrap();
    let folded = read_folded(&out_dir);
    assert!(folded.values().sum::<u64>() > 300, "{folded:#?}");
    assert!(
        folded.keys().all(|l| l.starts_with("target_proc;")),
        "other processes sampled: {folded:#?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("samples in"), "{err}");
}

/// A process in a mount namespace of its own (as in a container), running
/// a binary that exists only there, and in a pid namespace of its own: its
/// frames are named through /proc/PID/root.
#[test]
fn process_in_another_mount_namespace_is_symbolized() {
    if !require_root("process_in_another_mount_namespace_is_symbolized") {
        return;
    }
    let dir = scratch("container");
    let exe = build_c("known.c", &dir.join("known-src"), FP_FLAGS);
    let mnt = dir.join("ctr");
    std::fs::create_dir_all(&mnt).unwrap();
    let script = format!(
        "mount -t tmpfs tmpfs {m} && cp {e} {m}/incontainer && exec {m}/incontainer 4",
        m = mnt.display(),
        e = exe.display()
    );
    let mut ctr = Command::new("unshare")
        .args([
            "-m",
            "-p",
            "-f",
            "--mount-proc",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("unshare (util-linux) is needed");
    thread::sleep(Duration::from_millis(500));
    // The binary is not visible from the host's mount namespace.
    assert!(!mnt.join("incontainer").exists());
    let out_dir = dir.join("out");
    record_ok(
        &dir,
        &["-F", "499", "-d", "2.5", "-o", out_dir.to_str().unwrap()],
    );
    ctr.wait().unwrap();

    let folded = read_folded(&out_dir);
    let total = samples_where(&folded, "incontainer", |_| true);
    let named = samples_where(&folded, "incontainer", |f| {
        f.contains(&"main")
            && (f.contains(&"work_alpha") || f.contains(&"work_beta") || f.contains(&"work_delta"))
    });
    assert!(
        total > 500,
        "too few samples of the contained process: {total}\n{folded:#?}"
    );
    assert!(
        pct(named, total) > 90.0,
        "only {named} of {total} samples named:\n{folded:#?}"
    );
}

/// A binary replaced on disk while its process runs (a package upgrade
/// renames a new file over the old one): the running code is still named
/// from the file as mapped, not from the new file at that path.
#[test]
fn binary_replaced_on_disk_is_still_symbolized() {
    if !require_root("binary_replaced_on_disk_is_still_symbolized") {
        return;
    }
    let dir = scratch("replaced");
    let exe = build_c(
        "known.c",
        &dir.join("known"),
        &["-O2", "-g", "-fno-omit-frame-pointer"],
    );
    let mut work = std::process::Command::new(&exe)
        .arg("6")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    // The "upgrade": another program, renamed over the running one.
    let src = dir.join("other.c");
    std::fs::write(
        &src,
        "int upgraded_function(int x) { return x * 3; }\nint main(void) { return upgraded_function(1) - 3; }\n",
    )
    .unwrap();
    let new = dir.join("known.new");
    assert!(
        std::process::Command::new("gcc")
            .args(["-O0", "-g", "-o"])
            .arg(&new)
            .arg(&src)
            .status()
            .unwrap()
            .success()
    );
    std::fs::rename(&new, &exe).unwrap();
    let out = dir.join("out");
    let pid = work.id().to_string();
    record_ok(&dir, &["-p", &pid, "-d", "2", "-o", out.to_str().unwrap()]);
    let _ = work.kill();
    let _ = work.wait();
    let folded = read_folded(&out);
    let total: u64 = folded.values().sum();
    let named: u64 = folded
        .iter()
        .filter(|(l, _)| {
            l.contains(";work_alpha") || l.contains(";work_beta") || l.contains(";work_delta")
        })
        .map(|(_, c)| c)
        .sum();
    assert!(total > 50, "{folded:#?}");
    assert!(
        named * 10 >= total * 9,
        "{named} of {total} samples named from the mapped file:\n{folded:#?}"
    );
    assert!(!folded.keys().any(|l| l.contains("upgraded_function")));
}

/// The tracepoints' detaching (a grace period each, serialized in the
/// kernel) is left to a helper process so that `record` returns at once:
/// the helper, in a session of its own, must end on its own soon after,
/// taking the programs with it.
#[test]
fn the_detaching_helper_ends_after_record() {
    if !require_root("the_detaching_helper_ends_after_record") {
        return;
    }
    let dir = scratch("detach-helper");
    // Helpers of earlier captures, still detaching, are not this one's.
    let helpers = detaching_helpers;
    let before = helpers();
    let out = dir.join("out");
    record_ok(
        &dir,
        &["-d", "1", "-p", "1", "-q", "-o", out.to_str().unwrap()],
    );
    assert!(out.join("use.json").exists());
    // It ends once the kernel has let the tracepoints go (about a second
    // here); a helper that waits forever would stay.
    let t = std::time::Instant::now();
    let deadline = t + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left: Vec<u32> = helpers()
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        if left.is_empty() {
            eprintln!(
                "helpers seen after record: {seen:?}, gone {} ms after it",
                t.elapsed().as_millis()
            );
            break;
        }
        seen = left.clone();
        assert!(
            std::time::Instant::now() < deadline,
            "the detaching helper {left:?} still runs 30 s after record ended"
        );
        thread::sleep(Duration::from_millis(100));
    }
}
