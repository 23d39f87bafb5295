//! Builds the eBPF object (`profiler-ebpf`, for bpfel-unknown-none with the
//! nightly toolchain and bpf-linker) so that `include_bytes_aligned!` can
//! embed it: the profiler ships as one file.
use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};

// Only the toolchain names are used here; xtask uses the rest.
#[allow(dead_code)]
mod pin {
    include!("../profiler-ebpf/toolchain.rs");
}

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .context("profiler crate has no parent dir")?;
    let ebpf_dir = root.join("profiler-ebpf");
    println!(
        "cargo:rerun-if-changed={}",
        root.join("profiler-common").display()
    );
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=PROFILER_NO_EBPF");

    // Fuzzing the parsers (`cargo xtask fuzz`) needs the library, not the
    // kernel programs: their build would inherit the sanitizer flags.
    // Embeds an empty object, which no capture can load.
    if env::var_os("PROFILER_NO_EBPF").is_some() {
        let out = PathBuf::from(env::var("OUT_DIR")?).join("profiler");
        std::fs::write(out, b"")?;
        return Ok(());
    }
    println!("cargo:rerun-if-env-changed=PROFILER_TOOLCHAIN_DIR");

    // bpf-linker is kept by `cargo xtask bootstrap` under the cache
    // directory; put it on PATH for the nested eBPF build if it is not there.
    if which_on_path("bpf-linker").is_none() {
        if let Some(dir) = cached_linker_dir() {
            let path = env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![dir];
            dirs.extend(env::split_paths(&path));
            // SAFETY: build scripts are single-threaded at this point.
            unsafe { env::set_var("PATH", env::join_paths(dirs)?) };
        } else {
            return Err(anyhow!(
                "bpf-linker not found: run `cargo xtask bootstrap` (or `cargo xtask build`), \
                 which builds it against the nightly toolchain's LLVM"
            ));
        }
    }

    // The nested cargo's progress lines would come back as build warnings.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };

    let toolchain = pinned_toolchain()?;
    let ebpf_dir_str = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "profiler-ebpf",
            root_dir: ebpf_dir_str,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

/// The pinned nightly as rustup knows it: under its dated name, or linked
/// by `cargo xtask bootstrap` from an identical installed nightly.
fn pinned_toolchain() -> anyhow::Result<String> {
    for name in [pin::EBPF_NIGHTLY, pin::EBPF_LINKED] {
        let works = std::process::Command::new("rustup")
            .args(["run", name, "rustc", "-V"])
            .output()
            .is_ok_and(|o| o.status.success());
        if works {
            return Ok(name.to_string());
        }
    }
    Err(anyhow!(
        "the eBPF build's pinned toolchain {} is not installed: run `cargo xtask bootstrap` \
         (or `cargo xtask build`), which installs it",
        pin::EBPF_NIGHTLY
    ))
}

fn which_on_path(bin: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// `$PROFILER_TOOLCHAIN_DIR` or `~/.cache/profiler`: the newest
/// `bpf-linker-<pinned version>-*/bin` directory holding a bpf-linker.
fn cached_linker_dir() -> Option<PathBuf> {
    let base = env::var_os("PROFILER_TOOLCHAIN_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|c| c.join("profiler"))
        })?;
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&base)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("bpf-linker-{}-", pin::BPF_LINKER_VERSION))
        })
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("bpf-linker").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}
