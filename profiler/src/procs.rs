//! What the profiler keeps of each sampled process while it lives, so that
//! its stacks can be symbolized after it exits: its name, its memory maps,
//! its pid inside its own pid namespace (perf maps are named by it), and a
//! handle on its root directory when it runs in another mount namespace
//! (a container), through which its files stay reachable.

use std::{
    collections::HashMap,
    fs,
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
};

use crate::procmaps::{Backing, MapEntry, parse_maps};

/// Most processes kept at once; past it new processes are counted, not kept.
pub const MAX_PROCESSES: usize = 32 * 1024;
/// Most distinct mount namespaces whose root we hold open.
pub const MAX_ROOTS: usize = 512;
/// Most descriptors held on deleted or replaced binaries.
pub const MAX_REPLACED_FILES: usize = 256;

/// An open handle on a process's root directory (`/proc/PID/root`), shared
/// by every process of the same mount namespace. Paths resolved through it
/// keep working after the process exits.
#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
}

impl RootDir {
    /// The host path of `path`, a path inside that mount namespace.
    pub fn resolve(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}{}", self.fd.as_raw_fd(), path))
    }
}

/// What is known of one process.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    /// Thread-group id, in the profiler's pid namespace.
    pub pid: u32,
    /// Its id in its own (innermost) pid namespace.
    pub ns_pid: u32,
    /// Name of the process (its main thread's comm).
    pub name: String,
    /// Start time in clock ticks since boot, telling a reused pid apart.
    pub start_time: u64,
    /// Memory maps, sorted by address.
    pub maps: Vec<MapEntry>,
    /// Root directory when the process runs in another mount namespace.
    pub root: Option<Arc<RootDir>>,
    /// The process had exited when last looked at.
    pub exited: bool,
    /// Its cgroup path (see [`crate::cgroups::parse_proc_cgroup`]).
    pub cgroup: Option<String>,
    /// Mapped executable files that were deleted or replaced on disk since
    /// they were mapped: path -> a descriptor on the file as mapped (held
    /// open, so that it stays readable after the process exits).
    pub replaced: HashMap<String, Arc<OwnedFd>>,
}

impl ProcessInfo {
    /// The mapping holding `addr` (the maps are sorted and disjoint).
    pub fn mapping(&self, addr: u64) -> Option<&MapEntry> {
        let i = self.maps.partition_point(|m| m.start <= addr);
        self.maps[..i].last().filter(|m| addr < m.end)
    }

    /// The host path of a file as the process sees it: the file as mapped
    /// when the one on disk was replaced.
    pub fn host_path(&self, path: &str) -> PathBuf {
        if let Some(fd) = self.replaced.get(path) {
            return PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        }
        match &self.root {
            Some(root) => root.resolve(path),
            None => PathBuf::from(path),
        }
    }
}

/// The fields of `/proc/PID/stat` the profiler uses (parsed here only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// State: `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    /// User CPU time, in clock ticks.
    pub utime: u64,
    /// System CPU time, in clock ticks.
    pub stime: u64,
    /// Start time after boot, in clock ticks: with the pid, identifies a
    /// process (pids are reused).
    pub start_time: u64,
    /// Resident pages.
    pub rss_pages: u64,
}

impl Stat {
    /// Parses the text of a stat file (the name in parentheses may hold
    /// spaces and parentheses: fields are counted after its last `)`).
    pub fn parse(text: &str) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        // `rest` starts at field 3 (state).
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |field: usize| -> Option<u64> { f.get(field - 3)?.parse().ok() };
        Some(Stat {
            state: f.first()?.chars().next()?,
            utime: num(14)?,
            stime: num(15)?,
            start_time: num(22)?,
            rss_pages: num(24)?,
        })
    }

    /// Reads `/proc/PID/stat` (`pid`: a number, or `self`).
    pub fn read(pid: impl std::fmt::Display) -> Option<Stat> {
        Stat::parse(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// Whether the process has exited (a zombie: only its parent has not
    /// reaped it yet).
    pub fn exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// What a live process's owner of a socket is: its name and cgroup.
pub fn owner_info(pid: u32) -> crate::model::OwnerInfo {
    crate::model::OwnerInfo {
        comm: comm_of(pid),
        cgroup: crate::cgroups::cgroup_of(pid),
    }
}

/// A live process's name (`/proc/PID/comm`).
pub fn comm_of(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// The innermost pid of the `NSpid:` line of `/proc/PID/status`.
pub fn parse_ns_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// Processes seen during a capture.
#[derive(Debug)]
pub struct ProcessTable {
    procs: HashMap<u32, ProcessInfo>,
    roots: HashMap<String, Arc<RootDir>>,
    own_mnt_ns: Option<String>,
    /// Processes not kept because the table was full.
    pub dropped: u64,
    /// Processes that were gone before they could be read.
    pub missed: u64,
}

impl Default for ProcessTable {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessTable {
    /// An empty table.
    pub fn new() -> Self {
        ProcessTable {
            procs: HashMap::new(),
            roots: HashMap::new(),
            own_mnt_ns: fs::read_link("/proc/self/ns/mnt")
                .ok()
                .map(|p| p.to_string_lossy().into_owned()),
            dropped: 0,
            missed: 0,
        }
    }

    /// Reads (or re-reads) a process from /proc. A process already known
    /// that has exited keeps what was read while it lived.
    pub fn observe(&mut self, pid: u32) {
        if !self.procs.contains_key(&pid) && self.procs.len() >= MAX_PROCESSES {
            self.dropped += 1;
            return;
        }
        match self.read(pid) {
            Some(info) => {
                // A pid reused by a new process replaces the old one's
                // record: the new one is what samples from now on belong to.
                let info = match self.procs.remove(&pid) {
                    Some(old) => keep_unmapped_code(&old, info),
                    None => info,
                };
                self.procs.insert(pid, info);
            }
            None => match self.procs.get_mut(&pid) {
                Some(known) => known.exited = true,
                None => self.missed += 1,
            },
        }
    }

    /// Re-reads every known process that still lives (for code loaded
    /// since it was first seen) and marks the others exited.
    pub fn refresh_all(&mut self) {
        let pids: Vec<u32> = self.procs.keys().copied().collect();
        for pid in pids {
            let start = self.procs[&pid].start_time;
            match self.read(pid) {
                Some(info) if info.start_time == start => {
                    let info = keep_unmapped_code(&self.procs[&pid], info);
                    self.procs.insert(pid, info);
                }
                _ => self.procs.get_mut(&pid).expect("known pid").exited = true,
            }
        }
    }

    /// Marks exited the known processes that are gone (or whose pid now
    /// belongs to another process), reading only their start time: what a
    /// long-running capture needs before [`ProcessTable::evict_exited`],
    /// without re-reading every live process's maps.
    pub fn mark_exited(&mut self) {
        for (pid, p) in self.procs.iter_mut().filter(|(_, p)| !p.exited) {
            let start = Stat::read(pid).map(|s| s.start_time);
            if start != Some(p.start_time) {
                p.exited = true;
            }
        }
    }

    /// Forgets the processes that had exited when last looked at, except
    /// those `keep` still needs, and the root handles nobody uses any
    /// more; returns the pids forgotten. A long-running capture calls it
    /// after each window so that the table follows the live processes.
    pub fn evict_exited(&mut self, keep: impl Fn(u32) -> bool) -> Vec<u32> {
        let gone: Vec<u32> = self
            .procs
            .iter()
            .filter(|(pid, p)| p.exited && !keep(**pid))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in &gone {
            self.procs.remove(pid);
        }
        self.roots.retain(|_, r| Arc::strong_count(r) > 1);
        gone
    }

    /// Mount namespaces whose root is held open.
    pub fn roots_held(&self) -> usize {
        self.roots.len()
    }

    /// What is known of `pid`.
    pub fn get(&self, pid: u32) -> Option<&ProcessInfo> {
        self.procs.get(&pid)
    }

    /// Number of processes known.
    pub fn len(&self) -> usize {
        self.procs.len()
    }

    /// True when no process is known.
    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    fn read(&mut self, pid: u32) -> Option<ProcessInfo> {
        let dir = format!("/proc/{pid}");
        let start_time = Stat::read(pid)?.start_time;
        let maps_text = fs::read_to_string(format!("{dir}/maps")).ok()?;
        let (maps, _bad) = parse_maps(&maps_text);
        // No mappings: a zombie (exited, not yet reaped: its memory is
        // gone) or a kernel thread. A read of a zombie replaced what was
        // read while it lived, and every sample of a command that had
        // just exited lost its native frames.
        if maps.is_empty() {
            return None;
        }
        let name = comm_of(pid).unwrap_or_default();
        let ns_pid = fs::read_to_string(format!("{dir}/status"))
            .ok()
            .and_then(|s| parse_ns_pid(&s))
            .unwrap_or(pid);
        let root = self.root_of(pid);
        let cgroup = crate::cgroups::cgroup_of(pid);
        let replaced = self.replaced_files(pid, &maps, root.as_deref());
        Some(ProcessInfo {
            pid,
            ns_pid,
            name,
            start_time,
            maps,
            root,
            exited: false,
            cgroup,
            replaced,
        })
    }

    /// Opens the executable mappings whose file on disk is not the one
    /// mapped any more (deleted, or another inode at that path: a binary
    /// upgraded under a running process), through /proc/PID/map_files
    /// (or /proc/PID/exe for the main binary).
    fn replaced_files(
        &mut self,
        pid: u32,
        maps: &[MapEntry],
        root: Option<&RootDir>,
    ) -> HashMap<String, Arc<OwnedFd>> {
        use std::os::unix::fs::MetadataExt;
        let mut out = HashMap::new();
        for m in maps.iter().filter(|m| m.exec) {
            let crate::procmaps::Backing::File { path, deleted } = &m.backing else {
                continue;
            };
            if out.contains_key(path) {
                continue;
            }
            let on_disk = match root {
                Some(r) => fs::metadata(r.resolve(path)),
                None => fs::metadata(path),
            };
            let same = !deleted && on_disk.is_ok_and(|md| md.ino() == m.inode);
            if same {
                continue;
            }
            // Rare (an upgrade under a running process): count what the
            // table holds only then.
            let held: usize = self.procs.values().map(|p| p.replaced.len()).sum();
            if held + out.len() >= MAX_REPLACED_FILES {
                continue;
            }
            // Already held for this process: the same file, shared.
            if let Some(fd) = self
                .procs
                .get(&pid)
                .and_then(|p| p.replaced.get(path))
                .filter(|fd| {
                    fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                        .is_ok_and(|md| md.ino() == m.inode)
                })
            {
                out.insert(path.clone(), fd.clone());
                continue;
            }
            let candidates = [
                format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end),
                format!("/proc/{pid}/exe"),
            ];
            for c in candidates {
                let Ok(f) = fs::File::open(&c) else { continue };
                if f.metadata().is_ok_and(|md| md.ino() == m.inode) {
                    out.insert(path.clone(), Arc::new(OwnedFd::from(f)));
                    break;
                }
            }
        }
        out
    }

    fn root_of(&mut self, pid: u32) -> Option<Arc<RootDir>> {
        let ns = fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .ok()?
            .to_string_lossy()
            .into_owned();
        if Some(&ns) == self.own_mnt_ns.as_ref() {
            return None;
        }
        if let Some(root) = self.roots.get(&ns) {
            return Some(root.clone());
        }
        if self.roots.len() >= MAX_ROOTS {
            // Fall back to the path through /proc: good while it lives.
            return None;
        }
        let path = std::ffi::CString::new(format!("/proc/{pid}/root")).ok()?;
        // SAFETY: plain open(2) of a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let root = Arc::new(RootDir { fd });
        self.roots.insert(ns, root.clone());
        Some(root)
    }
}

/// A new read of a process that was read before: its maps, plus the
/// executable mappings of the earlier read that nothing in the new one
/// overlaps. Samples taken before a mapping went away still name their
/// code: a runtime unmaps its code while it exits (V8 unmaps its remapped
/// builtins and decommits its code space before the process's last
/// read), and a library can be unloaded before the capture ends. Nothing
/// is kept across an exec (another executable) or a reused pid.
fn keep_unmapped_code(old: &ProcessInfo, mut new: ProcessInfo) -> ProcessInfo {
    let exe = |i: &ProcessInfo| {
        i.maps.iter().find_map(|m| match &m.backing {
            Backing::File { path, .. } => Some(path.clone()),
            _ => None,
        })
    };
    if old.start_time != new.start_time || exe(old) != exe(&new) {
        return new;
    }
    let overlaps = |a: &MapEntry, b: &MapEntry| a.start < b.end && b.start < a.end;
    // Anonymous memory that is not executable now, over code that was:
    // the code was decommitted or unmapped back into a reservation
    // (V8's code range); the code is what earlier samples ran.
    new.maps.retain(|n| {
        n.exec
            || n.backing != Backing::Anonymous
            || !old.maps.iter().any(|m| m.exec && overlaps(m, n))
    });
    let kept: Vec<MapEntry> = old
        .maps
        .iter()
        .filter(|m| m.exec)
        .filter(|m| !new.maps.iter().any(|n| overlaps(m, n)))
        .cloned()
        .collect();
    if !kept.is_empty() {
        new.maps.extend(kept);
        new.maps.sort_by_key(|m| m.start);
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(start_time: u64, maps: &str) -> ProcessInfo {
        ProcessInfo {
            pid: 7,
            ns_pid: 7,
            name: "node".into(),
            start_time,
            maps: parse_maps(maps).0,
            root: None,
            exited: false,
            cgroup: None,
            replaced: HashMap::new(),
        }
    }

    /// A read taken while the runtime tears itself down (its remapped
    /// builtins unmapped, its code space decommitted) keeps the code the
    /// earlier read saw where nothing overlaps it; across an exec or a
    /// reused pid nothing is kept.
    #[test]
    fn code_unmapped_since_the_last_read_is_kept() {
        let before = info(
            5,
            "1000-2000 r-xp 00001000 fd:01 9 /usr/bin/node\n\
             7000-8000 r-xp 014c4000 fd:01 9 /usr/bin/node\n\
             9000-a000 rwxp 00000000 00:00 0\n",
        );
        let after = info(
            5,
            "1000-2000 r-xp 00001000 fd:01 9 /usr/bin/node\n\
             6000-c000 ---p 00000000 00:00 0\n",
        );
        let merged = keep_unmapped_code(&before, after.clone());
        let kept: Vec<(u64, bool)> = merged.maps.iter().map(|m| (m.start, m.exec)).collect();
        assert_eq!(kept, vec![(0x1000, true), (0x7000, true), (0x9000, true)]);
        assert!(merged.mapping(0x7abc).is_some());
        let reused = info(6, "1000-2000 r-xp 00001000 fd:01 9 /usr/bin/node\n");
        assert_eq!(keep_unmapped_code(&before, reused).maps.len(), 1);
        let execed = info(5, "1000-2000 r-xp 00001000 fd:01 3 /usr/bin/other\n");
        assert_eq!(keep_unmapped_code(&before, execed).maps.len(), 1);
    }

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 987654 1000 200 18446744073709551615";
        let s = Stat::parse(stat).unwrap();
        assert_eq!(s.start_time, 987654);
        assert_eq!((s.state, s.utime, s.stime, s.rss_pages), ('S', 5, 3, 200));
        assert_eq!(Stat::parse("garbage"), None);
    }

    #[test]
    fn ns_pid_is_the_innermost() {
        let status = "Name:\tnode\nTgid:\t4242\nNSpid:\t4242\t17\n";
        assert_eq!(parse_ns_pid(status), Some(17));
        assert_eq!(parse_ns_pid("NSpid:\t99\n"), Some(99));
        assert_eq!(parse_ns_pid("Name: x\n"), None);
    }

    #[test]
    fn reads_this_very_process() {
        let mut table = ProcessTable::new();
        let me = std::process::id();
        table.observe(me);
        let info = table.get(me).expect("own process readable");
        assert!(!info.exited);
        assert!(info.root.is_none(), "same mount namespace");
        assert!(info.maps.iter().any(|m| m.exec));
        assert!(info.start_time > 0);
    }

    #[test]
    fn an_exited_process_keeps_its_maps() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let mut table = ProcessTable::new();
        table.observe(pid);
        assert!(!table.get(pid).unwrap().maps.is_empty());
        child.kill().unwrap();
        child.wait().unwrap();
        table.mark_exited();
        let info = table.get(pid).unwrap();
        assert!(info.exited);
        assert!(!info.maps.is_empty());
        assert_eq!(info.name, "sleep");
        // Kept while needed, forgotten after.
        assert!(table.evict_exited(|p| p == pid).is_empty());
        assert_eq!(table.evict_exited(|_| false), vec![pid]);
        assert!(table.get(pid).is_none());
        let me = std::process::id();
        table.observe(me);
        assert!(table.evict_exited(|_| false).is_empty(), "live ones stay");
    }
}
