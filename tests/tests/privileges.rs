//! Least privilege: `record` as an ordinary user holding only the
//! capabilities it needs; the daemon dropping the rest once attached;
//! outputs never world-writable.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use tests::*;

/// The capabilities `record` needs (README, "Privileges").
const CAPS: &str = "bpf,+perfmon,+sys_ptrace,+dac_read_search,+syslog";

/// A system-wide capture as user nobody with CAP_BPF, CAP_PERFMON,
/// CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH and CAP_SYSLOG only: a root-owned
/// workload's functions and the kernel's are named.
#[test]
fn record_works_with_only_its_capabilities() {
    if !require_root("record_works_with_only_its_capabilities (it switches to nobody)") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("profiler-caps-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let exe = dir.join("profiler");
    std::fs::copy(profiler_bin(), &exe).unwrap();
    // The workload is root's, its binary readable by root only.
    let work = build_c(
        "known.c",
        &scratch("caps").join("known"),
        &["-O2", "-g", "-fno-omit-frame-pointer"],
    );
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut w = Command::new(&work)
        .arg("6")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // A process that lives in system calls, so that kernel frames are
    // sampled whatever else the machine does (a busy user loop takes
    // none; the run failed once on a quiet CI host for lack of them).
    let _syscalls = KillOnDrop(vec![
        Command::new("timeout")
            .args(["5", "dd", "if=/dev/zero", "of=/dev/null", "bs=64"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ]);
    thread::sleep(Duration::from_millis(300));
    let out_dir = dir.join("out");
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &format!("--inh-caps=-all,+{CAPS}"),
            &format!("--ambient-caps=-all,+{CAPS}"),
        ])
        .arg(&exe)
        .args(["record", "-d", "3", "-o"])
        .arg(&out_dir)
        .output()
        .expect("setpriv (util-linux) is needed");
    let _ = w.wait();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "record as nobody failed:\n{err}");
    let folded = read_folded(&out_dir);
    let _ = std::fs::remove_dir_all(&dir);
    let named = |f: &str| {
        folded
            .iter()
            .filter(|(l, _)| l.contains(f))
            .map(|(_, c)| c)
            .sum::<u64>()
    };
    assert!(
        named(";work_alpha") > 20,
        "workload not named:\n{folded:#?}"
    );
    assert!(named("_[k]") > 0, "no kernel frames:\n{folded:#?}");
    assert_eq!(
        named("[unknown kernel"),
        0,
        "kernel addresses hidden (CAP_SYSLOG)"
    );
    assert!(
        err.contains("eBPF run time not measured (needs CAP_SYS_ADMIN)"),
        "{err}"
    );
}

fn world_writable(p: &Path) -> bool {
    std::fs::metadata(p).unwrap().mode() & 0o002 != 0
}

/// With umask 000, every file and directory written is still not
/// world-writable.
#[test]
fn outputs_are_never_world_writable() {
    if !require_root("outputs_are_never_world_writable") {
        return;
    }
    let dir = scratch("umask");
    let out = dir.join("a/b/out");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec {} record -d 1 -o {}",
            profiler_bin().display(),
            out.display()
        ))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    for p in [dir.join("a"), dir.join("a/b"), out.clone()] {
        assert!(!world_writable(&p), "{} is world-writable", p.display());
    }
    let files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() >= 5, "{files:?}");
    for f in files {
        assert!(!world_writable(&f), "{} is world-writable", f.display());
    }
}

/// Once attached, the daemon holds only CAP_BPF, CAP_SYS_PTRACE,
/// CAP_DAC_READ_SEARCH and CAP_SYSLOG, in every set and in its only
/// thread, cannot regain the rest, and still profiles.
#[test]
fn daemon_keeps_only_the_capabilities_it_needs() {
    if !require_root("daemon_keeps_only_the_capabilities_it_needs") {
        return;
    }
    let port = free_port();
    let d = start_daemon(
        Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        &["--window", "1s", "--ecs-agent", "none"],
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    // CAP_DAC_READ_SEARCH 2, CAP_SYS_PTRACE 19, CAP_SYSLOG 34, CAP_BPF 39.
    let want = format!("{:016x}", (1u64 << 2) | (1 << 19) | (1 << 34) | (1 << 39));
    for k in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(field(k), want, "{k} in\n{status}");
    }
    assert_eq!(field("CapInh:"), "0000000000000000");
    assert_eq!(field("CapAmb:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Threads:"), "1", "a thread kept its capabilities");
    // Still sampling and naming after the drop.
    // Killed however the test ends: the loop would run forever.
    let busy = KillOnDrop(vec![
        Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap(),
    ]);
    let (code, svg) = d.get("/flamegraph.svg?seconds=2");
    drop(busy);
    assert_eq!(code, 200);
    let svg = String::from_utf8_lossy(&svg);
    assert!(
        svg.contains("dash") || svg.contains(">sh"),
        "the busy shell is not in the graph"
    );
    let (_, metrics) = d.get("/metrics");
    assert!(metric_sum(&String::from_utf8_lossy(&metrics), "profiler_windows_total") >= 1.0);
    d.stop();
}
