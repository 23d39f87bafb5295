//! Helpers for the end-to-end tests: find the profiler binary, build the
//! workloads from source, run `profiler record`, and read its folded stacks.
//!
//! The tests run the real binary as root against real processes; without
//! root they say they are skipped and why.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The profiler binary: `$PROFILER_BIN` (set by `cargo xtask test`), or
/// `target/release/profiler`.
pub fn profiler_bin() -> PathBuf {
    let p = std::env::var_os("PROFILER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/release/profiler"));
    assert!(
        p.is_file(),
        "profiler binary {} not found: run the tests with `cargo xtask test` (it builds it first)",
        p.display()
    );
    p
}

/// True when running as root; otherwise prints why the test is skipped.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED {test}: needs root to load eBPF programs (CI runs as root)");
    }
    root
}

/// A fresh scratch directory under the target dir, removed first if it exists.
pub fn scratch(name: &str) -> PathBuf {
    let d = workspace().join("target/e2e").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compiles `tests/workloads/<src>` with gcc and the given flags into `dir`.
pub fn build_c(src: &str, out: &Path, flags: &[&str]) -> PathBuf {
    let status = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(workspace().join("tests/workloads").join(src))
        .status()
        .expect("gcc is needed to build the test workloads");
    assert!(status.success(), "gcc failed on {src}");
    out.to_path_buf()
}

/// Runs `profiler record ARGS` in the scratch directory `cwd` and returns
/// its output (asserting nothing).
pub fn record_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(profiler_bin())
        .current_dir(cwd)
        .arg("record")
        .args(args)
        .output()
        .expect("run profiler")
}

/// Like [`record_in`], panicking with the profiler's stderr unless it succeeded.
pub fn record_ok(cwd: &Path, args: &[&str]) -> Output {
    let out = record_in(cwd, args);
    assert!(
        out.status.success(),
        "profiler record {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Folded stacks read back: line (frames) to count.
pub fn read_folded(dir: &Path) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(dir.join("stacks.folded")).expect("stacks.folded written");
    text.lines()
        .map(|l| {
            let (stack, count) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad folded line {l:?}"));
            (
                stack.to_string(),
                count
                    .parse()
                    .unwrap_or_else(|_| panic!("bad count in {l:?}")),
            )
        })
        .collect()
}

/// Frames of a folded line with their `_[k]`/`_[i]`/`_[j]` annotation removed.
pub fn frames(line: &str) -> Vec<&str> {
    line.split(';')
        .map(|f| {
            f.strip_suffix("_[k]")
                .or_else(|| f.strip_suffix("_[i]"))
                .or_else(|| f.strip_suffix("_[j]"))
                .unwrap_or(f)
        })
        .collect()
}

/// Samples of the stacks rooted at `process` whose frames satisfy `pred`.
pub fn samples_where(
    folded: &BTreeMap<String, u64>,
    process: &str,
    pred: impl Fn(&[&str]) -> bool,
) -> u64 {
    folded
        .iter()
        .filter(|(l, _)| {
            let f = frames(l);
            f.first() == Some(&process) && pred(&f)
        })
        .map(|(_, c)| c)
        .sum()
}

/// Percentage helper.
pub fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}
