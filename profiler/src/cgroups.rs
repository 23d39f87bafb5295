//! Cgroup paths of processes, for cgroup v1 and v2 hosts alike.

use std::fs;

/// Parses `/proc/PID/cgroup`: the v2 path (`0::/path`) when there is one
/// with a non-root path, else the memory controller's v1 path, else the
/// first non-empty path.
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    let mut v2 = None;
    let mut memory = None;
    let mut first = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && ctrls.is_empty() {
            v2 = Some(path.to_string());
        } else if ctrls.split(',').any(|c| c == "memory") {
            memory = Some(path.to_string());
        } else if first.is_none() && !path.is_empty() {
            first = Some(path.to_string());
        }
    }
    match (v2, memory) {
        (Some(p), _) if p != "/" => Some(p),
        (_, Some(m)) => Some(m),
        (Some(p), None) => Some(p),
        (None, None) => first,
    }
}

/// The cgroup path of a live process.
pub fn cgroup_of(pid: u32) -> Option<String> {
    parse_proc_cgroup(&fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

/// The memory cgroup in `/proc/PID/cgroup` text: v1's `memory` controller
/// line, else (v2 hosts) the v2 path.
pub fn parse_memory_cgroup(text: &str) -> Option<String> {
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if ctrls.split(',').any(|c| c == "memory") {
            return Some(path.to_string());
        }
        if id == "0" && ctrls.is_empty() {
            v2 = Some(path.to_string());
        }
    }
    v2
}

/// The memory cgroup path of a live process.
pub fn memory_cgroup_of(pid: u32) -> Option<String> {
    parse_memory_cgroup(&fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

/// Where the v1 `memory` hierarchy is mounted, from mountinfo text; None
/// when no v1 hierarchy holds it (v2 hosts).
pub fn parse_v1_memory_mount(mountinfo: &str) -> Option<String> {
    parse_v1_mount(mountinfo, "memory")
}

/// Where the v1 hierarchy holding `controller` is mounted.
pub fn parse_v1_mount(mountinfo: &str, controller: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        let mut r = right.split(' ');
        let (fstype, _source, opts) = (r.next()?, r.next()?, r.next()?);
        (fstype == "cgroup" && opts.split(',').any(|o| o == controller))
            .then(|| mount_point.to_string())
    })
}

/// CPU bandwidth control of one cgroup (its `cpu.stat`), cumulative:
/// enforcement periods, those in which it was throttled, and the time it
/// spent throttled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuThrottle {
    /// Periods in which the group ran with a quota (`nr_periods`).
    pub periods: u64,
    /// Of those, periods in which it hit its quota (`nr_throttled`).
    pub throttled_periods: u64,
    /// Time its tasks waited for the next period, microseconds
    /// (v2 `throttled_usec`, v1 `throttled_time` in ns).
    pub throttled_us: u64,
}

/// Parses a `cpu.stat` of cgroup v2 or v1; None without `nr_periods`
/// (no CPU bandwidth control there).
pub fn parse_cpu_stat(text: &str) -> Option<CpuThrottle> {
    let field = |key: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(key)?
                .strip_prefix(' ')?
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    Some(CpuThrottle {
        periods: field("nr_periods")?,
        throttled_periods: field("nr_throttled").unwrap_or(0),
        throttled_us: field("throttled_usec")
            .or_else(|| field("throttled_time").map(|ns| ns / 1000))
            .unwrap_or(0),
    })
}

/// Where the CPU controller's hierarchy is: the v2 mount when it has the
/// `cpu` controller, else the v1 mount of `cpu`.
fn cpu_hierarchy() -> Option<std::path::PathBuf> {
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let controllers =
            fs::read_to_string(format!("{root}/cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "cpu") {
            return Some(root.into());
        }
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_v1_mount(&mountinfo, "cpu").map(Into::into)
}

/// The CPU bandwidth figures of every cgroup that has run under a quota,
/// by path in the CPU hierarchy (`/` first). Bounded: at most 20,000
/// groups are looked at.
pub fn cpu_throttling() -> std::collections::HashMap<String, CpuThrottle> {
    let mut out = std::collections::HashMap::new();
    let Some(root) = cpu_hierarchy() else {
        return out;
    };
    walk(&root, |dir, rel| {
        if let Some(stat) = fs::read_to_string(dir.join("cpu.stat"))
            .ok()
            .and_then(|t| parse_cpu_stat(&t))
            .filter(|s| s.periods > 0)
        {
            out.insert(rel.to_string(), stat);
        }
        true
    });
    out
}

/// The path of a memory cgroup by its directory inode, as the kernel
/// recorded it: under the v1 `memory` mount where there is one, else under
/// the v2 mount.
pub fn memory_path_of_id(id: u64) -> Option<String> {
    if id == 0 {
        return None;
    }
    let v1 = fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| parse_v1_memory_mount(&m));
    match v1 {
        Some(root) => find_inode(std::path::Path::new(&root), id),
        None => path_of_id(id),
    }
}

/// The path, relative to `root` and starting with `/`, of the directory
/// under `root` whose inode is `id` (the low 32 bits are enough on kernels
/// before 5.5, whose ids were {ino, generation}). Bounded: gives up after
/// 20,000 groups.
fn find_inode(root: &std::path::Path, id: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mut found = None;
    walk(root, |dir, rel| {
        if fs::metadata(dir).is_ok_and(|m| m.ino() == id || m.ino() == id & 0xffff_ffff) {
            found = Some(rel.to_string());
            return false;
        }
        true
    });
    found
}

/// Most groups one walk of a hierarchy looks at.
const MAX_WALKED: usize = 20_000;

/// Visits the directories of a cgroup hierarchy from `root`, each with its
/// path relative to `root` (`/` first), until `visit` returns false or
/// [`MAX_WALKED`] groups were seen.
fn walk(root: &std::path::Path, mut visit: impl FnMut(&std::path::Path, &str) -> bool) {
    let mut stack = vec![root.to_path_buf()];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        seen += 1;
        if seen > MAX_WALKED {
            return;
        }
        let rel = dir
            .strip_prefix(root)
            .map_or_else(|_| String::new(), |r| r.to_string_lossy().into_owned());
        if !visit(&dir, &format!("/{rel}")) {
            return;
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            stack.extend(
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
}

/// The path of a cgroup v2 id (the inode number of its directory), looked
/// up under the v2 mount (`/sys/fs/cgroup/unified` on hybrid hosts,
/// `/sys/fs/cgroup` on v2 hosts). Bounded: gives up after 20,000 groups.
pub fn path_of_id(id: u64) -> Option<String> {
    if id == 0 {
        return None;
    }
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let root = std::path::Path::new(root);
        if root.join("cgroup.controllers").exists() {
            return find_inode(root, id);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_stat_of_both_versions() {
        let v2 = "usage_usec 100\nuser_usec 60\nsystem_usec 40\nnr_periods 40\nnr_throttled 30\nthrottled_usec 2250000\nnr_bursts 0\nburst_usec 0\n";
        assert_eq!(
            parse_cpu_stat(v2),
            Some(CpuThrottle {
                periods: 40,
                throttled_periods: 30,
                throttled_us: 2_250_000
            })
        );
        let v1 =
            "nr_periods 10\nnr_throttled 7\nthrottled_time 525000000\nnr_bursts 0\nburst_time 0\n";
        assert_eq!(
            parse_cpu_stat(v1),
            Some(CpuThrottle {
                periods: 10,
                throttled_periods: 7,
                throttled_us: 525_000
            })
        );
        assert_eq!(parse_cpu_stat("usage_usec 5\n"), None);
    }

    #[test]
    fn v2_host() {
        assert_eq!(
            parse_proc_cgroup("0::/system.slice/docker-abc.scope\n").as_deref(),
            Some("/system.slice/docker-abc.scope")
        );
    }

    #[test]
    fn v1_host_prefers_the_memory_controller() {
        let text = "12:pids:/ecs/task1/c1\n4:memory:/ecs/task1/c1\n1:name=systemd:/\n0::/\n";
        assert_eq!(parse_proc_cgroup(text).as_deref(), Some("/ecs/task1/c1"));
    }

    #[test]
    fn memory_cgroup_is_the_memory_controller_then_v2() {
        let hybrid = "12:pids:/x\n4:memory:/profiler-oom-1\n0::/user.slice/s\n";
        assert_eq!(
            parse_memory_cgroup(hybrid).as_deref(),
            Some("/profiler-oom-1")
        );
        assert_eq!(
            parse_memory_cgroup("0::/kubepods/pod1/c1\n").as_deref(),
            Some("/kubepods/pod1/c1")
        );
        assert_eq!(parse_memory_cgroup("junk"), None);
    }

    #[test]
    fn finds_the_v1_memory_mount() {
        let mi = "\
30 1 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
";
        assert_eq!(
            parse_v1_memory_mount(mi).as_deref(),
            Some("/sys/fs/cgroup/memory")
        );
        let v2 =
            "31 1 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        assert_eq!(parse_v1_memory_mount(v2), None);
    }

    #[test]
    fn garbage_gives_nothing() {
        assert_eq!(parse_proc_cgroup("nonsense"), None);
    }
}
