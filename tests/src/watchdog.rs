//! A hang becomes a failure that says where: every test binary arms one
//! watchdog (from [`crate::require_root`] and [`crate::scratch`]); past
//! its limit it prints each process under the test binary (state, kernel
//! wait channel, system call, kernel stacks, and threads' user stacks
//! where gdb is installed), kills them, and exits with 101, so that CI
//! fails in minutes with the evidence rather than at its own limit with
//! none.

use crate::status_field;
use std::{
    fmt::Write as _,
    path::Path,
    process::Command,
    sync::Once,
    time::{Duration, Instant},
};

/// No test binary takes more than a few minutes (the longest, diff and
/// daemon, about 90 s here); `TEST_WATCHDOG_S` overrides.
const LIMIT: Duration = Duration::from_secs(600);

/// Arms the watchdog of this test binary (once; later calls do nothing).
pub fn arm() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let limit = std::env::var("TEST_WATCHDOG_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(LIMIT, Duration::from_secs);
        let started = Instant::now();
        let _ = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                std::thread::sleep(limit);
                // Straight to the descriptor: libtest captures what the
                // print macros say, and would drop it at the exit.
                let text = format!(
                    "\nWATCHDOG: this test binary ran past {:?} (started {:?} ago): \
                     a hang. Its processes:\n{}",
                    limit,
                    started.elapsed(),
                    report()
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
                for pid in descendants(std::process::id()) {
                    // SAFETY: a signal to a process under this one.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                std::process::exit(101);
            });
    });
}

/// Every process under `root`, parents before their children.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(ppid) = status_field(pid, "PPid:").and_then(|s| s.parse().ok()) {
            parent_of.push((pid, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &parent_of {
            if pp == p && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().replace('\0', " "))
        .unwrap_or_else(|e| format!("({e})"))
}

/// What each process under this one is doing.
fn report() -> String {
    let mut out = String::new();
    let gdb = Path::new("/usr/bin/gdb").exists();
    for pid in descendants(std::process::id()) {
        let _ = writeln!(
            out,
            "--- pid {pid} ppid {} {}: {}",
            status_field(pid, "PPid:").unwrap_or_default(),
            status_field(pid, "State:").unwrap_or_default(),
            read(&format!("/proc/{pid}/cmdline"))
        );
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string));
        for tid in tasks {
            let t = format!("/proc/{pid}/task/{tid}");
            let _ = writeln!(
                out,
                "  task {tid} {} wchan {} syscall {}\n    {}",
                read(&format!("{t}/comm")),
                read(&format!("{t}/wchan")),
                read(&format!("{t}/syscall")),
                read(&format!("{t}/stack")).replace('\n', "\n    ")
            );
        }
        if gdb
            && let Ok(o) = Command::new("timeout")
                .args(["30", "gdb", "-p", &pid.to_string(), "-batch", "-nx"])
                .args(["-ex", "thread apply all bt 30"])
                .output()
        {
            let text = String::from_utf8_lossy(&o.stdout);
            for l in text
                .lines()
                .filter(|l| l.starts_with('#') || l.starts_with("Thread"))
            {
                let cut = l.char_indices().nth(200).map_or(l.len(), |(i, _)| i);
                let _ = writeln!(out, "    {}", &l[..cut]);
            }
        }
    }
    out
}
