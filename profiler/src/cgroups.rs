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

/// The path of a cgroup v2 id (the inode number of its directory), looked
/// up under the v2 mount (`/sys/fs/cgroup/unified` on hybrid hosts,
/// `/sys/fs/cgroup` on v2 hosts). Bounded: gives up after 20,000 groups.
pub fn path_of_id(id: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if id == 0 {
        return None;
    }
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let is_v2 = std::path::Path::new(root)
            .join("cgroup.controllers")
            .exists();
        if !is_v2 {
            continue;
        }
        let mut stack = vec![std::path::PathBuf::from(root)];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > 20_000 {
                return None;
            }
            if fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
                let rel = dir.strip_prefix(root).ok()?.to_string_lossy().into_owned();
                return Some(format!("/{rel}"));
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
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn garbage_gives_nothing() {
        assert_eq!(parse_proc_cgroup("nonsense"), None);
    }
}
