//! Checks made before anything is loaded, each failing with a message that
//! says what to do: privileges, tracefs, sampling frequency, target
//! processes, output directory.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// Where tracefs is expected.
pub const TRACEFS: &str = "/sys/kernel/tracing";

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// A check that failed.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// Missing capabilities.
    #[error(
        "missing capabilities: {missing}. Loading the eBPF sampler needs CAP_BPF and CAP_PERFMON \
         (or CAP_SYS_ADMIN): run as root (sudo), or grant them with \
         `sudo setcap cap_bpf,cap_perfmon,cap_sys_ptrace+ep $(which profiler)`"
    )]
    Capabilities {
        /// Names of the missing capabilities.
        missing: String,
    },
    /// tracefs absent and not mountable.
    #[error(
        "tracefs is not mounted at {TRACEFS} and mounting it failed ({source}). \
         Mount it as root: `mount -t tracefs tracefs {TRACEFS}`"
    )]
    Tracefs {
        /// Why mounting failed.
        source: io::Error,
    },
    /// Frequency 0.
    #[error("the sampling frequency must be at least 1 Hz (got -F 0); the default is 99")]
    ZeroFrequency,
    /// Frequency over the kernel's limit.
    #[error(
        "sampling frequency {requested} Hz is above the kernel's limit of {max} Hz \
         (kernel.perf_event_max_sample_rate): use -F {max} or lower, or raise the limit with \
         `sysctl -w kernel.perf_event_max_sample_rate={requested}`"
    )]
    FrequencyTooHigh {
        /// What was asked.
        requested: u64,
        /// The kernel's limit.
        max: u64,
    },
    /// A pid that does not exist.
    #[error("no process with PID {0}: check it with `ps -p {0}` (it may have exited)")]
    NoSuchPid(u32),
    /// The output directory cannot be written.
    #[error("cannot write to the output directory {path}: {source}. Choose another with -o DIR")]
    Output {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Effective capability bits of this process (`CapEff` of /proc/self/status).
pub fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Checks that the capabilities for loading the sampler are held.
pub fn check_capabilities(caps: u64) -> Result<(), PreflightError> {
    let has = |c: u32| caps & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    let mut missing = Vec::new();
    if !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    Err(PreflightError::Capabilities {
        missing: missing.join(" and "),
    })
}

/// Makes sure tracefs is mounted, mounting it when it is not.
/// Returns true when it had to mount it.
pub fn ensure_tracefs() -> Result<bool, PreflightError> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(false);
    }
    let src = c"tracefs";
    let target = c"/sys/kernel/tracing";
    // SAFETY: mount(2) with NUL-terminated strings and no data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(PreflightError::Tracefs {
            source: io::Error::last_os_error(),
        });
    }
    Ok(true)
}

/// Checks a sampling frequency against `max` (perf_event_max_sample_rate).
pub fn check_frequency(requested: u64, max: Option<u64>) -> Result<(), PreflightError> {
    if requested == 0 {
        return Err(PreflightError::ZeroFrequency);
    }
    if let Some(max) = max
        && requested > max
    {
        return Err(PreflightError::FrequencyTooHigh { requested, max });
    }
    Ok(())
}

/// The kernel's `perf_event_max_sample_rate`.
pub fn max_sample_rate() -> Option<u64> {
    fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Resolves a pid (a process or any of its threads) to its thread-group id.
pub fn resolve_pid(pid: u32) -> Result<u32, PreflightError> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| PreflightError::NoSuchPid(pid))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(pid))
}

/// Creates a directory and its parents with mode 0755 whatever the umask
/// (outputs are never world-writable).
pub fn create_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    // The mode given is still masked by the umask; set it exactly.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
}

/// Creates the output directory (mode 0755) and proves it writable.
pub fn prepare_output(dir: &Path) -> Result<(), PreflightError> {
    let err = |source| PreflightError::Output {
        path: dir.to_path_buf(),
        source,
    };
    create_dir(dir).map_err(err)?;
    let probe = dir.join(".profiler-write-test");
    fs::write(&probe, b"").map_err(err)?;
    fs::remove_file(&probe).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_sets() {
        assert!(check_capabilities(1 << CAP_SYS_ADMIN).is_ok());
        assert!(check_capabilities((1 << CAP_BPF) | (1 << CAP_PERFMON)).is_ok());
        let e = check_capabilities(1 << CAP_BPF).unwrap_err().to_string();
        assert!(
            e.contains("CAP_PERFMON") && !e.contains("missing capabilities: CAP_BPF"),
            "{e}"
        );
        let e = check_capabilities(0).unwrap_err().to_string();
        assert!(e.contains("CAP_BPF and CAP_PERFMON"), "{e}");
    }

    #[test]
    fn frequencies() {
        assert!(matches!(
            check_frequency(0, Some(1000)),
            Err(PreflightError::ZeroFrequency)
        ));
        assert!(check_frequency(1000, Some(1000)).is_ok());
        let e = check_frequency(1001, Some(1000)).unwrap_err().to_string();
        assert!(e.contains("1000 Hz"), "{e}");
        assert!(check_frequency(99, None).is_ok());
    }

    #[test]
    fn pids() {
        assert_eq!(resolve_pid(std::process::id()).unwrap(), std::process::id());
        assert!(matches!(
            resolve_pid(u32::MAX - 1),
            Err(PreflightError::NoSuchPid(_))
        ));
    }

    #[test]
    fn output_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(prepare_output(&tmp.path().join("a/b")).is_ok());
        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            prepare_output(&file.join("sub")),
            Err(PreflightError::Output { .. })
        ));
    }
}
