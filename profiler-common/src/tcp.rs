//! TCP retransmits: counted per connection and state (tcp_retransmit_skb,
//! tcp_retransmit_synack), each connection with the process that last
//! used its socket in process context (inet_sock_set_state,
//! sock_send_length), since retransmits fire from timers.

use crate::{COMM_LEN, MapDef, ProgDef};

/// tcp_retransmit_skb program.
pub const PROG_RETRANSMIT: ProgDef = ProgDef {
    name: "tcp_retransmit",
};
/// tcp_retransmit_synack program.
pub const PROG_RETRANSMIT_SYNACK: ProgDef = ProgDef {
    name: "tcp_retransmit_synack",
};
/// Program recording which process uses a socket.
pub const PROG_SOCK_OWNER: ProgDef = ProgDef { name: "sock_owner" };
/// Hash map [`RetransKey`] -> [`RetransValue`]: one value per connection,
/// not per CPU (a connection's retransmits are made under its socket's
/// lock, one CPU at a time), so its kernel memory does not grow with the
/// CPUs (per CPU, 4096 entries took 44 MiB on 192 CPUs).
pub const RETRANS: MapDef = MapDef {
    name: "RETRANS",
    entries: 4096,
};
/// Per-CPU array of [`SliceCount`]: retransmits per time slice
/// ([`crate::stacks::TIME_SLICE_NS`]), slot `slice % entries`; a slot
/// is taken over by a later slice after `entries` slices (10 s), long
/// after userspace has read it (a few times a second).
pub const RETRANS_TIMES: MapDef = MapDef {
    name: "RETRANS_TIMES",
    entries: 1024,
};

/// Value of [`RETRANS_TIMES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SliceCount {
    /// The slice (monotonic clock / [`crate::stacks::TIME_SLICE_NS`],
    /// wrapping).
    pub slice: u32,
    /// Retransmits on this CPU in it.
    pub count: u32,
}
const _: () = assert!(core::mem::size_of::<SliceCount>() == 8);

/// LRU hash map socket address -> [`SockOwner`].
pub const SOCK_OWNERS: MapDef = MapDef {
    name: "SOCK_OWNERS",
    entries: 65536,
};
/// Ring buffer of owner thread-group ids (u32): the owner of a connection
/// that just retransmitted for the first time, for userspace to read its
/// name and cgroup while it lives.
pub const OWNER_EVENTS: MapDef = MapDef {
    name: "OWNER_EVENTS",
    entries: 16 * 1024,
};

/// Indexes into [`crate::config::Config::retrans`] and
/// [`crate::config::Config::synack`].
pub mod field {
    /// Field names in the tracepoint records, in index order.
    pub const NAMES: [&str; 9] = [
        "skaddr", "state", "sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6",
    ];
    /// skaddr
    pub const SKADDR: usize = 0;
    /// state
    pub const STATE: usize = 1;
    /// sport (host order)
    pub const SPORT: usize = 2;
    /// dport (host order)
    pub const DPORT: usize = 3;
    /// family
    pub const FAMILY: usize = 4;
    /// saddr (4 bytes)
    pub const SADDR: usize = 5;
    /// daddr (4 bytes)
    pub const DADDR: usize = 6;
    /// saddr_v6 (16 bytes)
    pub const SADDR6: usize = 7;
    /// daddr_v6 (16 bytes)
    pub const DADDR6: usize = 8;
}

/// Key of the per-connection retransmit counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RetransKey {
    /// Source address (IPv4 in the first 4 bytes).
    pub saddr: [u8; 16],
    /// Destination address.
    pub daddr: [u8; 16],
    /// Source port, host order.
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// TCP state at the retransmit (TCP_ESTABLISHED = 1, ...).
    pub state: u16,
}
const _: () = assert!(core::mem::size_of::<RetransKey>() == 40);

/// Per-connection retransmit record: count, first/last time, and the
/// owner of the socket where known (recorded in process context).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetransValue {
    /// Retransmits.
    pub count: u64,
    /// First one (ns, CLOCK_MONOTONIC).
    pub first_ns: u64,
    /// Last one.
    pub last_ns: u64,
    /// Owning thread group, 0 if unknown.
    pub owner_tgid: u32,
    /// Padding, zero.
    pub _pad: u32,
    /// Owner's cgroup (v2 id), 0 if unknown.
    pub owner_cgroup: u64,
    /// Owner's thread name when it used the socket, NUL-padded.
    pub owner_comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<RetransValue>() == 56);

/// The process that last used a socket in process context.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOwner {
    /// Thread-group id.
    pub tgid: u32,
    /// Padding, zero.
    pub _pad: u32,
    /// cgroup v2 id of the task.
    pub cgroup: u64,
    /// Name of the thread that used the socket.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<SockOwner>() == 32);

crate::pod!(RetransKey, RetransValue, SliceCount, SockOwner);
