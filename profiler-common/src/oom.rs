//! OOM kills: each kill as the kernel reported it (oom:mark_victim), with
//! the victim's cgroups read from its task (raw tracepoint, 6.8+) or from
//! the task that ran out of memory.

use crate::{COMM_LEN, MapDef, ProgDef};

/// oom:mark_victim program.
pub const PROG_OOM: ProgDef = ProgDef { name: "oom_victim" };
/// Raw tracepoint on mark_victim (kernels whose tracepoint passes the
/// victim's `task_struct`): records the victim's cgroups.
pub const PROG_OOM_TASK: ProgDef = ProgDef {
    name: "oom_victim_task",
};
/// Ring buffer of [`OomEvent`].
pub const OOM_EVENTS: MapDef = MapDef {
    name: "OOM_EVENTS",
    entries: 256 * 1024,
};
/// LRU hash map victim pid -> [`TaskCgroups`].
pub const OOM_CGROUPS: MapDef = MapDef {
    name: "OOM_CGROUPS",
    entries: 1024,
};

/// Indexes into [`crate::config::Config::oom`].
pub mod field {
    /// Field names in the tracepoint record, in index order.
    pub const NAMES: [&str; 8] = [
        "pid",
        "comm",
        "total_vm",
        "anon_rss",
        "file_rss",
        "shmem_rss",
        "uid",
        "oom_score_adj",
    ];
    /// pid
    pub const PID: usize = 0;
    /// comm (`__data_loc char[]`)
    pub const COMM: usize = 1;
    /// total_vm (pages)
    pub const TOTAL_VM: usize = 2;
    /// anon_rss (pages)
    pub const ANON_RSS: usize = 3;
    /// file_rss (pages)
    pub const FILE_RSS: usize = 4;
    /// shmem_rss (pages)
    pub const SHMEM_RSS: usize = 5;
    /// uid
    pub const UID: usize = 6;
    /// oom_score_adj (short)
    pub const SCORE_ADJ: usize = 7;
}

/// Indexes into [`crate::config::Config::cgroup`]: the chain
/// `task_struct.cgroups` -> `css_set.subsys[memory_cgrp_id]` (or
/// `css_set.dfl_cgrp`) -> `cgroup_subsys_state.cgroup` -> `cgroup.kn` ->
/// `kernfs_node.id` (the inode number of the cgroup's directory).
pub mod cgroup_field {
    /// `task_struct.pid`.
    pub const TASK_PID: usize = 0;
    /// `task_struct.cgroups` (a `css_set *`).
    pub const TASK_CGROUPS: usize = 1;
    /// `css_set.subsys[memory_cgrp_id]` (a `cgroup_subsys_state *`);
    /// `NO_FIELD` when the kernel has no memory controller.
    pub const CSS_SET_MEMCG: usize = 2;
    /// `css_set.dfl_cgrp` (a `cgroup *`, the cgroup v2 group).
    pub const CSS_SET_DFL_CGRP: usize = 3;
    /// `cgroup_subsys_state.cgroup` (a `cgroup *`).
    pub const CSS_CGROUP: usize = 4;
    /// `cgroup.kn` (a `kernfs_node *`).
    pub const CGROUP_KN: usize = 5;
    /// `kernfs_node.id` (a u64).
    pub const KN_ID: usize = 6;
}

/// A victim's cgroups as read from its `task_struct` (0: unknown).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskCgroups {
    /// Directory inode of its memory cgroup, in the hierarchy that holds
    /// the memory controller (v1 `memory`, or v2).
    pub memcg: u64,
    /// Directory inode of its cgroup v2 group.
    pub dfl: u64,
}

/// An OOM kill, as the kernel reported it (oom:mark_victim).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OomEvent {
    /// When (ns, CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Victim pid.
    pub pid: u32,
    /// Victim uid (`u32::MAX` if unknown).
    pub uid: u32,
    /// Pages of virtual memory.
    pub total_vm: u64,
    /// Pages of anonymous RSS.
    pub anon_rss: u64,
    /// Pages of file RSS.
    pub file_rss: u64,
    /// Pages of shared-memory RSS.
    pub shmem_rss: u64,
    /// cgroup v2 id of the task that triggered the kill.
    pub trigger_cgroup: u64,
    /// The victim's cgroups, when the task that triggered the kill is the
    /// victim (the usual case in a memory cgroup); zero otherwise.
    pub victim: TaskCgroups,
    /// oom_score_adj.
    pub oom_score_adj: i16,
    /// Padding, zero.
    pub _pad: [u8; 6],
    /// Victim's comm, NUL-padded.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<OomEvent>() == 96);

crate::pod!(OomEvent, TaskCgroups);
