//! Workflows of the profiler project: `cargo xtask <command>`.
//!
//! - `bootstrap`: the pinned nightly of the eBPF build
//!   (`profiler-ebpf/toolchain.rs`) with rust-src, and a bpf-linker built
//!   against its own LLVM, kept under `~/.cache/profiler` (idempotent).
//! - `build`: bootstrap if needed, then `target/release/profiler`.
//! - `capture [-- RECORD ARGS]`: build, then a 10 s system-wide capture.
//! - `test`: lints, then every test, privileged ones included.
//! - `bench`: the profiler against perf, measured in the same run.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

mod pin {
    include!("../../profiler-ebpf/toolchain.rs");
}

mod bench;
mod bench_daemon;
mod bench_kcost;
mod bench_node;
mod bench_offcpu;
mod bench_overhead;
mod bench_requests;
mod bench_startstop;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the pinned nightly with rust-src, and build bpf-linker (once).
    Bootstrap,
    /// Bootstrap, then build target/release/profiler.
    Build,
    /// Build, then run a 10-second system-wide `profiler record` as root.
    Capture {
        /// Arguments passed on to `profiler record` (after `--`).
        #[arg(last = true)]
        record_args: Vec<String>,
    },
    /// Benchmarks against perf and bpftrace, measured in the same run
    /// (root, perf, bpftrace, node, offcputime): `unwind`, `daemon`,
    /// `overhead`, `node`, `offcpu`, `requests`, `startstop`, `kcost`, `replay`,
    /// `soak`, or all.
    Bench {
        /// Which bench: unwind, daemon, overhead, node, offcpu, requests,
        /// startstop, kcost, replay, soak (default: all).
        which: Option<String>,
        /// Rounds of the overhead bench's slowdown runs (each round runs
        /// the workload alone and under every tool, in a rotating order).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..=50))]
        rounds: u32,
    },
    /// Runs each fuzz target (fuzz/, cargo-fuzz, nightly) for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(default_value_t = 30)]
        seconds: u64,
    },
    /// Lints (fmt, clippy), then every test of the workspace.
    Test {
        /// Extra arguments for the test binaries (after `--`), e.g. a filter.
        #[arg(last = true)]
        test_args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Bootstrap => bootstrap().map(|_| ()),
        Cmd::Build => build().map(|_| ()),
        Cmd::Capture { record_args } => capture(&record_args),
        Cmd::Test { test_args } => test(&test_args),
        Cmd::Fuzz { seconds } => fuzz(seconds),
        Cmd::Bench { which, rounds } => {
            let exe = build()?;
            match which.as_deref() {
                None => {
                    bench::bench(&exe, &root())?;
                    bench_daemon::bench(&exe, &root())?;
                    bench_overhead::bench(&exe, &root(), rounds as usize)?;
                    bench_node::bench(&exe, &root())?;
                    bench_offcpu::bench(&exe, &root(), rounds as usize)?;
                    bench_requests::bench(&exe, &root(), rounds as usize)?;
                    bench_startstop::bench(&exe, &root(), rounds as usize)?;
                    bench_kcost::bench(&exe, &root(), rounds as usize)?;
                    bench_kcost::replay(&exe, &root(), rounds as usize)?;
                    bench_daemon::soak(&exe, &root())
                }
                Some("unwind") => bench::bench(&exe, &root()),
                Some("daemon") => bench_daemon::bench(&exe, &root()),
                Some("overhead") => bench_overhead::bench(&exe, &root(), rounds as usize),
                Some("node") => bench_node::bench(&exe, &root()),
                Some("offcpu") => bench_offcpu::bench(&exe, &root(), rounds as usize),
                Some("requests") => bench_requests::bench(&exe, &root(), rounds as usize),
                Some("startstop") => bench_startstop::bench(&exe, &root(), rounds as usize),
                Some("kcost") => bench_kcost::bench(&exe, &root(), rounds as usize),
                Some("replay") => bench_kcost::replay(&exe, &root(), rounds as usize),
                Some("soak") => bench_daemon::soak(&exe, &root()),
                Some(other) => {
                    bail!(
                        "unknown bench {other:?}: use unwind, daemon, overhead, node, offcpu, requests, startstop, kcost, replay or soak"
                    )
                }
            }
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask in workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command to its end, failing with its stderr unless it succeeded.
fn checked(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn output(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&checked(cmd)?.stdout)
        .trim()
        .to_string())
}

/// Where the toolchain pieces are kept: `$PROFILER_TOOLCHAIN_DIR`, or
/// `$XDG_CACHE_HOME/profiler`, or `~/.cache/profiler` (profiler/build.rs
/// looks in the same place).
fn toolchain_dir() -> Result<PathBuf> {
    if let Some(d) = env::var_os("PROFILER_TOOLCHAIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let cache = match env::var_os("XDG_CACHE_HOME") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(cache.join("profiler"))
}

/// The pinned nightly, installed if missing; returns its rustup name and
/// sysroot.
fn pinned_toolchain(did: &mut Vec<&'static str>) -> Result<(&'static str, PathBuf)> {
    output(Command::new("rustup").arg("--version")).context(
        "rustup is needed to install the eBPF build's pinned nightly: see https://rustup.rs",
    )?;
    for name in [pin::EBPF_NIGHTLY, pin::EBPF_LINKED] {
        if let Some(sysroot) = sysroot_of(name) {
            return Ok((name, sysroot));
        }
    }
    // An installed `nightly` that is the very build pinned: linked under
    // its own name rather than downloaded again.
    let same = output(Command::new("rustc").args(["+nightly", "-vV"])).is_ok_and(|v| {
        v.lines()
            .any(|l| l == format!("commit-hash: {}", pin::EBPF_NIGHTLY_COMMIT))
    });
    if same {
        let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
        eprintln!(
            "xtask: the installed nightly is {} (rustc {}): linking it as {}",
            pin::EBPF_NIGHTLY,
            &pin::EBPF_NIGHTLY_COMMIT[..9],
            pin::EBPF_LINKED
        );
        run(Command::new("rustup").args(["toolchain", "link", pin::EBPF_LINKED, &sysroot]))?;
        did.push("the pinned nightly (linked)");
        return Ok((pin::EBPF_LINKED, PathBuf::from(sysroot)));
    }
    eprintln!(
        "xtask: installing {} (the eBPF build's pinned nightly) with rust-src",
        pin::EBPF_NIGHTLY
    );
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        pin::EBPF_NIGHTLY,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))?;
    did.push("the pinned nightly");
    let sysroot = sysroot_of(pin::EBPF_NIGHTLY)
        .with_context(|| format!("{} installed but does not run", pin::EBPF_NIGHTLY))?;
    Ok((pin::EBPF_NIGHTLY, sysroot))
}

/// A toolchain's sysroot, or None when rustup cannot run it.
fn sysroot_of(name: &str) -> Option<PathBuf> {
    output(Command::new("rustup").args(["run", name, "rustc", "--print", "sysroot"]))
        .ok()
        .map(PathBuf::from)
}

/// Makes sure the pinned nightly, its rust-src and bpf-linker are there;
/// returns bpf-linker's bin dir.
fn bootstrap() -> Result<PathBuf> {
    let t0 = Instant::now();
    let mut did = Vec::new();
    let (toolchain, sysroot) = pinned_toolchain(&mut did)?;

    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        // rustup adds no component to a linked toolchain: a linked one is
        // the installed `nightly` under another name, which takes it.
        let owner = if toolchain == pin::EBPF_LINKED
            && sysroot_of("nightly").is_some_and(|s| s == sysroot)
        {
            "nightly"
        } else {
            toolchain
        };
        eprintln!("xtask: installing rust-src for {toolchain} (as {owner})");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", owner]))
            .with_context(|| {
                format!(
                    "cannot add rust-src to {owner}: run `rustup component add rust-src --toolchain {owner}`, or `rustup toolchain uninstall {toolchain}` and run this again to install {} afresh",
                    pin::EBPF_NIGHTLY
                )
            })?;
        did.push("rust-src");
    }

    // bpf-linker must load the same LLVM that produced the bitcode: the
    // pinned nightly's own libLLVM. Name the directory after both, so a
    // moved pin gets its own linker.
    let libllvm = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .context("nightly toolchain has no libLLVM.so.*")?;
    let llvm_version = libllvm.trim_start_matches("libLLVM.so.");
    let major = llvm_version
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    let dir = toolchain_dir()?.join(format!(
        "bpf-linker-{}-llvm-{llvm_version}",
        pin::BPF_LINKER_VERSION
    ));
    let bin = dir.join("bin");
    let linker = bin.join("bpf-linker");
    let works = linker.is_file()
        && Command::new(&linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !works {
        eprintln!(
            "xtask: building bpf-linker against the pinned nightly's LLVM {llvm_version} into {} (about a minute)",
            dir.display()
        );
        let lib = dir.join("lib");
        std::fs::create_dir_all(&lib)?;
        for name in ["libLLVM.so", libllvm.as_str()] {
            let link = lib.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(sysroot.join("lib").join(&libllvm), &link)?;
        }
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                pin::BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
            ])
            .arg("--features")
            .arg(format!("llvm-{major}"))
            .arg("--root")
            .arg(&dir)
            .env("LLVM_PREFIX", &dir))?;
        run(Command::new(&linker).arg("--version"))?;
        did.push("bpf-linker");
    }
    if did.is_empty() {
        eprintln!(
            "xtask: toolchain ready (rust-src, {}), nothing to do ({} ms)",
            linker.display(),
            t0.elapsed().as_millis()
        );
    } else {
        eprintln!(
            "xtask: installed {} in {:.0} s",
            did.join(" and "),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(bin)
}

/// PATH with bpf-linker's directory first.
/// The bin directory of `target/tools`, where `cargo install --locked
/// CRATE` puts the command-line tools the benches and fuzzing use, once:
/// nothing is installed when `probe` is already there.
fn installed_tool(krate: &str, probe: &str) -> Result<PathBuf> {
    let tools = root().join("target/tools");
    let bin = tools.join("bin");
    if !bin.join(probe).is_file() {
        eprintln!("xtask: installing {krate} into target/tools");
        run(Command::new("cargo")
            .args(["install", "--locked", krate, "--root"])
            .arg(&tools))?;
    }
    Ok(bin)
}

fn path_with(bin: &Path) -> Result<std::ffi::OsString> {
    let mut dirs = vec![bin.to_path_buf()];
    dirs.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    Ok(env::join_paths(dirs)?)
}

fn build() -> Result<PathBuf> {
    let bin = bootstrap()?;
    run(Command::new("cargo")
        .current_dir(root())
        .args(["build", "--release", "-p", "profiler"])
        .env("PATH", path_with(&bin)?))?;
    let exe = root().join("target/release/profiler");
    eprintln!("xtask: built {}", exe.display());
    Ok(exe)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn capture(record_args: &[String]) -> Result<()> {
    let exe = build()?;
    let mut cmd = if is_root() {
        Command::new(&exe)
    } else {
        eprintln!("xtask: not root, running the capture with sudo");
        let mut c = Command::new("sudo");
        c.arg(&exe);
        c
    };
    cmd.arg("record");
    if !record_args
        .iter()
        .any(|a| a == "-d" || a.starts_with("--duration"))
    {
        cmd.args(["-d", "10"]);
    }
    cmd.args(record_args);
    eprintln!("xtask: capturing the whole system for 10 s (Ctrl-C ends it early)");
    run(&mut cmd)
}

/// Every fuzz target for `seconds` each; cargo-fuzz is installed under
/// target/tools the first time. A crash fails the command and leaves its
/// input under fuzz/artifacts/.
fn fuzz(seconds: u64) -> Result<()> {
    let ws = root();
    let path = path_with(&installed_tool("cargo-fuzz", "cargo-fuzz")?)?;
    let list = output(
        Command::new("cargo")
            .args(["+nightly", "fuzz", "list"])
            .current_dir(ws.join("fuzz"))
            .env("PATH", &path),
    )?;
    for target in list.lines().map(str::trim).filter(|t| !t.is_empty()) {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        run(Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .current_dir(ws.join("fuzz"))
            .env("PATH", &path)
            .env("PROFILER_NO_EBPF", "1"))
        .with_context(|| format!("fuzz target {target} failed: see fuzz/artifacts/{target}/"))?;
    }
    Ok(())
}

/// The deployment manifests, checked by the validators their platforms'
/// users run: cfn-lint (CloudFormation) and kubernetes-validate (the
/// Kubernetes API schemas, strict: unknown fields are errors). Both are
/// installed with pip when missing.
fn validate_deploy(ws: &Path) -> Result<()> {
    let deploy = ws.join("deploy");
    for tool in ["cfn-lint", "kubernetes-validate"] {
        let found = env::var_os("PATH")
            .is_some_and(|p| env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            eprintln!("xtask: installing {tool} with pip");
            run(Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                tool,
            ]))
            .with_context(|| format!("install {tool} (python3 -m pip install {tool})"))?;
        }
    }
    let files = |sub: &str| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(deploy.join(sub))
            .with_context(|| format!("read deploy/{sub}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        v.sort();
        Ok(v)
    };
    let ecs = files("ecs")?;
    let k8s = files("kubernetes")?;
    anyhow::ensure!(
        !ecs.is_empty() && !k8s.is_empty(),
        "no manifests under deploy/"
    );
    run(Command::new("cfn-lint").args(&ecs)).context("deploy/ecs: cfn-lint found problems")?;
    run(Command::new("kubernetes-validate")
        .arg("--strict")
        .args(&k8s))
    .context("deploy/kubernetes: kubernetes-validate found problems")?;
    eprintln!(
        "xtask: deploy manifests valid ({} CloudFormation, {} Kubernetes)",
        ecs.len(),
        k8s.len()
    );
    Ok(())
}

/// The npm modules of the tests' real Node.js service (tests/node), from
/// its lockfile, when they are not installed yet (.ci/run installs them).
fn node_modules(ws: &Path) -> Result<()> {
    let dir = ws.join("tests/node");
    if dir.join("node_modules/.package-lock.json").is_file() {
        return Ok(());
    }
    eprintln!("xtask: installing the Node.js test service's modules (npm ci in tests/node)");
    run(Command::new("npm").current_dir(&dir).args([
        "ci",
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
    ]))
    .context("npm ci in tests/node (Node.js and npm are needed for the Node.js tests)")
}

fn test(test_args: &[String]) -> Result<()> {
    let exe = build()?;
    let bin = bootstrap()?;
    let path = path_with(&bin)?;
    let ws = root();
    let cargo = |args: &[&str]| -> Result<()> {
        run(Command::new("cargo")
            .current_dir(&ws)
            .args(args)
            .env("PATH", &path)
            .env("PROFILER_BIN", &exe))
    };
    cargo(&["fmt", "--all", "--", "--check"]).context("formatting: run `cargo fmt --all`")?;
    cargo(&[
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    validate_deploy(&ws)?;
    node_modules(&ws)?;
    if !is_root() {
        eprintln!(
            "xtask: not root: the privileged tests will say they were skipped; run as root (CI does) for the full suite"
        );
    }
    // Unit and golden tests in parallel; the end-to-end tests one at a time,
    // since they measure CPU shares on a small machine.
    let mut unit = vec![
        "test",
        "--release",
        "-p",
        "profiler",
        "-p",
        "profiler-common",
        "-p",
        "xtask",
        "--",
    ];
    unit.extend(test_args.iter().map(String::as_str));
    cargo(&unit)?;
    let mut e2e = vec!["test", "--release", "-p", "tests", "--", "--test-threads=1"];
    e2e.extend(test_args.iter().map(String::as_str));
    cargo(&e2e)
}
