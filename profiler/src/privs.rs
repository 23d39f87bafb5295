//! Least privilege: once its programs are loaded and attached, the daemon
//! keeps only the capabilities it still uses, and can never regain the
//! others (bounding set emptied of them, no_new_privs set).
//!
//! What each capability is for:
//! - CAP_BPF: bpf() (load programs, create maps; on kernels before 6.5
//!   every bpf() call, map reads included, when unprivileged BPF is off);
//! - CAP_PERFMON: perf_event_open on every CPU, tracepoints, programs
//!   that read kernel memory;
//! - CAP_SYS_PTRACE: read other processes' /proc/PID/maps and open files
//!   through /proc/PID/root (symbols of other users and containers);
//! - CAP_DAC_READ_SEARCH: read binaries and tracefs formats whatever their
//!   mode;
//! - CAP_SYSLOG: read kernel addresses in /proc/kallsyms (kptr_restrict);
//! - CAP_SYS_ADMIN: only to mount tracefs when the host has not, and to
//!   measure the programs' run time (BPF_ENABLE_STATS).

/// Capability numbers (linux/capability.h).
pub mod cap {
    /// CAP_DAC_READ_SEARCH.
    pub const DAC_READ_SEARCH: u32 = 2;
    /// CAP_SETPCAP.
    pub const SETPCAP: u32 = 8;
    /// CAP_SYS_PTRACE.
    pub const SYS_PTRACE: u32 = 19;
    /// CAP_SYS_ADMIN.
    pub const SYS_ADMIN: u32 = 21;
    /// CAP_SYSLOG.
    pub const SYSLOG: u32 = 34;
    /// CAP_PERFMON.
    pub const PERFMON: u32 = 38;
    /// CAP_BPF.
    pub const BPF: u32 = 39;
}

/// What a running capture still needs: map reads, /proc and files of
/// other processes, kernel symbols.
pub const KEEP_AFTER_ATTACH: [u32; 4] =
    [cap::BPF, cap::SYS_PTRACE, cap::DAC_READ_SEARCH, cap::SYSLOG];

/// Names for messages.
pub fn name(c: u32) -> String {
    match c {
        cap::DAC_READ_SEARCH => "CAP_DAC_READ_SEARCH".into(),
        cap::SETPCAP => "CAP_SETPCAP".into(),
        cap::SYS_PTRACE => "CAP_SYS_PTRACE".into(),
        cap::SYS_ADMIN => "CAP_SYS_ADMIN".into(),
        cap::SYSLOG => "CAP_SYSLOG".into(),
        cap::PERFMON => "CAP_PERFMON".into(),
        cap::BPF => "CAP_BPF".into(),
        n => format!("capability {n}"),
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// The effective, permitted and inheritable sets of this thread.
fn get() -> std::io::Result<(u64, u64, u64)> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget fills two CapData for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let join = |f: fn(&CapData) -> u32| f(&data[0]) as u64 | (f(&data[1]) as u64) << 32;
    Ok((
        join(|d| d.effective),
        join(|d| d.permitted),
        join(|d| d.inheritable),
    ))
}

/// Lowers the calling thread's scheduling priority (and that of the
/// threads it starts from now on) to nice value `nice`; 0 does nothing.
/// Threads of its own only: a command started before keeps its priority.
pub fn lower_priority(nice: i32) -> std::io::Result<()> {
    if nice == 0 {
        return Ok(());
    }
    // SAFETY: setpriority with plain integer arguments; who = 0 is the
    // calling thread on Linux.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Keeps only `keep` (those of them held now) in the calling thread's
/// effective and permitted sets (inheritable and ambient emptied), removes
/// the rest from the bounding set, and sets no_new_privs; returns what is
/// kept. capset applies to the calling thread only: call it while the
/// process has no other thread (the daemon runs on one).
pub fn drop_all_but(keep: &[u32]) -> std::io::Result<u64> {
    let mask: u64 = keep.iter().fold(0, |m, c| m | 1 << c);
    let (eff, perm, _) = get()?;
    let kept = perm & mask;
    // The bounding set first, while CAP_SETPCAP is still held.
    if eff & (1 << cap::SETPCAP) != 0 {
        for c in 0..64u32 {
            if mask & (1 << c) == 0 {
                // SAFETY: prctl with plain integer arguments.
                let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) };
                if rc != 0 {
                    let e = std::io::Error::last_os_error();
                    // EINVAL: a capability this kernel does not know; the
                    // ones above it are unknown too.
                    if e.raw_os_error() == Some(libc::EINVAL) {
                        break;
                    }
                    return Err(e);
                }
            }
        }
    }
    // SAFETY: prctl with plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // No ambient capabilities survive either.
    // SAFETY: as above.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    // EINVAL: a kernel without ambient capabilities (before 4.3): none to
    // clear.
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: kept as u32,
            permitted: kept as u32,
            inheritable: 0,
        },
        CapData {
            effective: (kept >> 32) as u32,
            permitted: (kept >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads two CapData for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(kept)
}

/// Capability names of a mask.
pub fn names(mask: u64) -> Vec<String> {
    (0..64).filter(|c| mask & (1 << c) != 0).map(name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_masks() {
        assert_eq!(
            names((1 << cap::BPF) | (1 << cap::SYS_PTRACE)),
            ["CAP_SYS_PTRACE", "CAP_BPF"]
        );
        assert!(names(0).is_empty());
    }

    /// In a child process (capabilities are per thread and the test
    /// harness is multi-threaded): drop to two, and check what remains.
    #[test]
    fn dropping_keeps_only_what_is_asked() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root to hold capabilities to drop");
            return;
        }
        // SAFETY: fork in a test; the child only makes syscalls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let ok = drop_all_but(&[cap::BPF, cap::SYS_PTRACE]).is_ok_and(|kept| {
                kept == (1 << cap::BPF) | (1 << cap::SYS_PTRACE)
                    && get().is_ok_and(|(e, p, i)| e == kept && p == kept && i == 0)
                    // Gone for good: the bounding set no longer has it.
                    && unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap::SYS_ADMIN as libc::c_ulong, 0, 0, 0) } == 0
            });
            // SAFETY: leave the child at once.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }
}
