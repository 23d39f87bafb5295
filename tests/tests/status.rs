//! End-to-end: `record`'s live status. In a pseudo-terminal it keeps one
//! line rewritten each second (elapsed, left, samples, lost, busiest
//! processes) and puts events on lines of their own (here an event-loop
//! stall of a real Node.js loop); with `--quiet` nothing; with stderr a
//! pipe, plain lines.

use std::{
    fs::File,
    io::Read,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::{Command, Stdio},
};

use tests::*;

/// Runs `profiler record ARGS` with stderr on a new pseudo-terminal;
/// everything written to the terminal.
fn record_in_pty(args: &[&str]) -> String {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors; no name, termios or size.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptors we own.
    let (mut master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = Command::new(profiler_bin());
    cmd.arg("record")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave));
    // As a terminal's program runs: in a session of its own whose
    // controlling terminal is the pty (its hangup reaches no one else).
    // SAFETY: setsid and ioctl only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(2, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("run profiler");
    // Our copy of the slave goes with the command.
    drop(cmd);
    // The child holds the only slave: reading ends (EIO) when it exits.
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let status = child.wait().unwrap();
    let out = reader.join().unwrap();
    assert!(
        status.success(),
        "profiler record {args:?}: {status}\n{out}"
    );
    out
}

#[test]
fn status_line_in_a_terminal() {
    if !require_root("status_line_in_a_terminal") {
        return;
    }
    let dir = scratch("status");
    // A Node.js loop that blocks for 300 ms each second: stalls.
    let script = "setInterval(() => { const end = Date.now() + 300; while (Date.now() < end); }, 1000); setTimeout(() => process.exit(0), 20000);";
    let mut node = KillOnDrop(vec![
        Command::new("node")
            .args(["-e", script])
            .spawn()
            .expect("node"),
    ]);
    let pid = node.0[0].id().to_string();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = record_in_pty(&[
        "-d",
        "4",
        "-o",
        dir.join("tty").to_str().unwrap(),
        "-p",
        &pid,
    ]);
    // One line, rewritten: erased with \r ESC[K before each update.
    let updates = out.matches("\r\x1b[K").count();
    assert!(updates >= 3, "{updates} rewrites:\n{out:?}");
    for s in 1..=3 {
        let line = format!("profiler: {s} s, {} s left: ", 4 - s);
        assert!(out.contains(&line), "no {line:?} in:\n{out:?}");
    }
    assert!(out.contains(" samples, 0 lost"), "{out:?}");
    assert!(out.contains(&format!("busiest node[{pid}] ")), "{out:?}");
    // The stalls as they happen, each on a line of its own.
    assert!(
        out.contains("event-loop stall (3") || out.contains("event-loop stall (2"),
        "no stall event in:\n{out:?}"
    );

    // --quiet: no status at all (the summary at the end stays).
    let quiet = record_in_pty(&[
        "-d",
        "2",
        "-q",
        "-o",
        dir.join("quiet").to_str().unwrap(),
        "-p",
        &pid,
    ]);
    assert!(!quiet.contains("s left"), "{quiet:?}");
    assert!(!quiet.contains("\x1b[K"), "{quiet:?}");
    assert!(quiet.contains("profiler: wrote"), "{quiet:?}");

    // Not a terminal: plain lines, no escapes.
    let out = record_in(
        &dir,
        &[
            "-d",
            "6",
            "-o",
            dir.join("plain").to_str().unwrap(),
            "-p",
            &pid,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains('\x1b') && !err.contains('\r'), "{err:?}");
    assert!(err.contains("profiler: 5 s, 1 s left: "), "{err}");
    assert!(err.contains("event-loop stall"), "{err}");
    let _ = node.0[0].kill();
}
