//! Bad input and unmet requirements: each a clear message that says what to
//! do, and a non-zero exit, before anything is captured.

use std::{os::unix::fs::PermissionsExt, process::Command};

use tests::*;

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_usage_error(out: &std::process::Output, needles: &[&str]) {
    let err = stderr_of(out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2, got {:?}: {err}",
        out.status
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

#[test]
fn nonexistent_pid_is_named() {
    let dir = scratch("bad-pid");
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = (pid_max + 1).to_string();
    let out = record_in(&dir, &["-d", "1", "-o", "out", "-p", &pid]);
    assert_usage_error(&out, &[&format!("no process with PID {pid}")]);
}

#[test]
fn zero_frequency_is_refused() {
    let dir = scratch("bad-f0");
    let out = record_in(&dir, &["-F", "0", "-d", "1", "-o", "out"]);
    assert_usage_error(&out, &["at least 1 Hz"]);
}

#[test]
fn frequency_above_the_kernel_limit_is_refused() {
    let dir = scratch("bad-fmax");
    let max: u64 = std::fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let f = (max + 1).to_string();
    let out = record_in(&dir, &["-F", &f, "-d", "1", "-o", "out"]);
    assert_usage_error(
        &out,
        &[&format!("limit of {max} Hz"), "perf_event_max_sample_rate"],
    );
}

#[test]
fn bad_duration_is_refused() {
    let dir = scratch("bad-duration");
    let out = record_in(&dir, &["-d", "ten", "-o", "out"]);
    assert_usage_error(&out, &["invalid duration"]);
}

#[test]
fn unwritable_output_directory_is_refused() {
    let dir = scratch("bad-output");
    std::fs::write(dir.join("a-file"), b"x").unwrap();
    let out = record_in(&dir, &["-d", "1", "-o", "a-file/sub"]);
    assert_usage_error(
        &out,
        &[
            "cannot write to the output directory",
            "a-file/sub",
            "-o DIR",
        ],
    );
}

#[test]
fn command_that_cannot_start_is_named() {
    if !require_root("command_that_cannot_start_is_named") {
        return;
    }
    let dir = scratch("bad-cmd");
    let out = record_in(
        &dir,
        &["-d", "1", "-o", "out", "--", "/nonexistent/program"],
    );
    assert_usage_error(&out, &["cannot start", "/nonexistent/program"]);
}

/// As an unprivileged user: the message names the missing capabilities.
#[test]
fn missing_privileges_are_named() {
    if !require_root("missing_privileges_are_named (it switches to nobody)") {
        return;
    }
    // Where nobody can read the binary and write the output.
    let dir = std::env::temp_dir().join(format!("profiler-noprivs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let exe = dir.join("profiler");
    std::fs::copy(profiler_bin(), &exe).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&exe)
        .args(["record", "-d", "1", "-o"])
        .arg(dir.join("out"))
        .output()
        .expect("setpriv (util-linux) is needed");
    let _ = std::fs::remove_dir_all(&dir);
    assert_usage_error(&out, &["CAP_BPF and CAP_PERFMON", "root"]);
}

fn tracefs_test(drop_sys_admin: bool) -> std::process::Output {
    let dir = scratch(if drop_sys_admin {
        "tracefs-unmountable"
    } else {
        "tracefs-mountable"
    });
    let exe = profiler_bin();
    let record = format!("{} record -d 1 -o {}/out", exe.display(), dir.display());
    let inner = if drop_sys_admin {
        format!("exec capsh --drop=cap_sys_admin -- -c '{record}'")
    } else {
        format!("exec {record}")
    };
    // A private mount namespace of the test's own, without tracefs.
    Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; \
             if [ -d /sys/kernel/tracing/events ]; then echo 'tracefs still mounted' >&2; exit 99; fi; {inner}"
        ))
        .output()
        .expect("unshare (util-linux) is needed")
}

/// tracefs not mounted: record mounts it and goes on.
#[test]
fn tracefs_not_mounted_is_mounted() {
    if !require_root("tracefs_not_mounted_is_mounted") {
        return;
    }
    let out = tracefs_test(false);
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("mounted tracefs"), "{err}");
}

/// tracefs not mounted and not mountable: the message says how to mount it.
#[test]
fn tracefs_not_mountable_says_how() {
    if !require_root("tracefs_not_mountable_says_how") {
        return;
    }
    let out = tracefs_test(true);
    assert_usage_error(
        &out,
        &[
            "tracefs is not mounted",
            "mount -t tracefs tracefs /sys/kernel/tracing",
        ],
    );
}

#[test]
fn bad_unwind_options_are_refused() {
    let dir = scratch("bad-unwind");
    let out = record_in(&dir, &["--unwind", "magic", "-d", "1", "-o", "out"]);
    assert_usage_error(&out, &["magic", "fp", "dwarf", "auto"]);
    for bytes in ["0", "100", "69632", "lots"] {
        let out = record_in(&dir, &["--stack-bytes", bytes, "-d", "1", "-o", "out"]);
        assert_usage_error(&out, &["multiple of 4096 from 4096 to 65536"]);
    }
}

/// The remaining record options: each invalid value named, with what is
/// accepted, exit 2, before anything is loaded.
#[test]
fn other_record_options_are_refused() {
    let dir = scratch("bad-others");
    for arg in [
        "--max-stacks=0",
        "--max-stacks=-3",
        "--max-stacks=2000000",
        "--max-stacks=many",
    ] {
        let out = record_in(&dir, &[arg, "-d", "1", "-o", "out"]);
        assert_usage_error(&out, &["--max-stacks"]);
    }
    let out = record_in(&dir, &["--group-by", "pod", "-d", "1", "-o", "out"]);
    assert_usage_error(&out, &["pod", "process", "container"]);
    let out = record_in(&dir, &["-p", "not-a-pid", "-d", "1", "-o", "out"]);
    assert_usage_error(&out, &["--pid", "not-a-pid"]);
    let out = record_in(&dir, &["-F", "fast", "-d", "1", "-o", "out"]);
    assert_usage_error(&out, &["--frequency", "fast"]);
    let out = record_in(&dir, &["--nice", "20", "-d", "1", "-o", "out"]);
    assert_usage_error(&out, &["--nice", "20"]);
    let out = record_in(&dir, &["--no-such-option"]);
    assert_usage_error(&out, &["--no-such-option"]);
    assert!(
        !dir.join("out").exists(),
        "an output was made for bad input"
    );
}

fn daemon_in(args: &[&str]) -> std::process::Output {
    Command::new(profiler_bin())
        .arg("daemon")
        .args(args)
        .output()
        .expect("run profiler daemon")
}

#[test]
fn daemon_port_in_use_is_named() {
    if !require_root("daemon_port_in_use_is_named") {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = daemon_in(&["--listen", &addr, "--ecs-agent", "none"]);
    assert_usage_error(&out, &[&format!("cannot listen on {addr}"), "--listen"]);
}

#[test]
fn daemon_bad_options_are_refused() {
    let out = daemon_in(&["--listen", "localhost"]);
    assert_usage_error(&out, &["--listen", "invalid socket address"]);
    let out = daemon_in(&["--window", "0"]);
    assert_usage_error(&out, &["duration must be positive"]);
    let out = daemon_in(&["--retain", "0"]);
    assert_usage_error(&out, &["--retain"]);
    let out = daemon_in(&["--ecs-agent", "somewhere"]);
    assert_usage_error(&out, &["ADDR:PORT", "none"]);
    let out = daemon_in(&["--max-profile-seconds", "100000"]);
    assert_usage_error(&out, &["--max-profile-seconds"]);
}
