//! TCP retransmits, per connection and state ([`RETRANS`]), each with the
//! process that last used its socket in process context
//! ([`SOCK_OWNERS`]); the owner of a new retransmitting connection is sent
//! to userspace ([`OWNER_EVENTS`]) to be named while it lives.

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::tracepoint,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use profiler_common::{
    COMM_LEN,
    counters::Counter,
    stacks::TIME_SLICE_NS,
    tcp::{self, RetransKey, RetransValue, SliceCount, SockOwner, field},
};

use aya_log_ebpf::warn;

use crate::{bump, config, now, read};

map!(RETRANS: HashMap<RetransKey, RetransValue> = with_max_entries(tcp::RETRANS));
map!(SOCK_OWNERS: LruHashMap<u64, SockOwner> = with_max_entries(tcp::SOCK_OWNERS));
map!(OWNER_EVENTS: RingBuf = with_byte_size(tcp::OWNER_EVENTS));
map!(RETRANS_TIMES: PerCpuArray<SliceCount> = with_max_entries(tcp::RETRANS_TIMES));

prog_named!(sock_owner, tcp::PROG_SOCK_OWNER);
/// inet_sock_set_state and sock_send_length, in process context: remember
/// which process uses the socket, for the retransmits that fire later from
/// a timer.
#[tracepoint]
pub fn sock_owner(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == 0 {
        return 0; // softirq on an idle CPU: not the owner
    }
    let Some(sk) = read::<u64>(&ctx, config().sock_owner_sk) else {
        return 0;
    };
    let owner = SockOwner {
        tgid,
        _pad: 0,
        // SAFETY: no preconditions.
        cgroup: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]),
    };
    // Most events are sends on a socket whose owner is noted already:
    // then the lookup (which marks the entry used) is enough, and the
    // insert, which takes the LRU's locks and a node each time, is left
    // out (bench kcost: 950-1010 ns an event before, 730-800 after).
    // SAFETY: a read of plain integers.
    if let Some(known) = unsafe { SOCK_OWNERS.get(&sk) }
        && known.tgid == owner.tgid
        && known.cgroup == owner.cgroup
        && known.comm == owner.comm
    {
        return 0;
    }
    // An LRU map evicts the oldest socket: the insert does not fail for
    // room, and an owner lost is shown as unknown.
    let _ = SOCK_OWNERS.insert(&sk, &owner, 0);
    0
}

prog_named!(tcp_retransmit, tcp::PROG_RETRANSMIT);
/// tcp_retransmit_skb.
#[tracepoint]
pub fn tcp_retransmit(ctx: TracePointContext) -> u32 {
    count_retransmit(&ctx, &config().retrans, 0)
}

prog_named!(tcp_retransmit_synack, tcp::PROG_RETRANSMIT_SYNACK);
/// A SYN-ACK retransmitted by a listener (its own tracepoint; the kernel's
/// RetransSegs counts it too).
#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    const TCP_SYN_RECV: i32 = 3;
    count_retransmit(&ctx, &config().synack, TCP_SYN_RECV)
}

/// Counts one retransmit per connection and state; `state` when the record
/// has no state field.
#[inline(always)]
fn count_retransmit(ctx: &TracePointContext, f: &[u32; 9], state: i32) -> u32 {
    bump(Counter::Retransmits);
    let mut key = RetransKey {
        saddr: [0; 16],
        daddr: [0; 16],
        sport: read::<u16>(ctx, f[field::SPORT]).unwrap_or(0),
        dport: read::<u16>(ctx, f[field::DPORT]).unwrap_or(0),
        family: read::<u16>(ctx, f[field::FAMILY]).unwrap_or(0),
        state: read::<i32>(ctx, f[field::STATE]).unwrap_or(state) as u16,
    };
    if key.family == 10 {
        key.saddr = read::<[u8; 16]>(ctx, f[field::SADDR6]).unwrap_or([0; 16]);
        key.daddr = read::<[u8; 16]>(ctx, f[field::DADDR6]).unwrap_or([0; 16]);
    } else {
        let s = read::<[u8; 4]>(ctx, f[field::SADDR]).unwrap_or([0; 4]);
        let d = read::<[u8; 4]>(ctx, f[field::DADDR]).unwrap_or([0; 4]);
        key.saddr[..4].copy_from_slice(&s);
        key.daddr[..4].copy_from_slice(&d);
    }
    let now = now();
    // When, to the slice.
    let slice = (now / TIME_SLICE_NS) as u32;
    if let Some(c) = RETRANS_TIMES.get_ptr_mut(slice % tcp::RETRANS_TIMES.entries) {
        // SAFETY: this CPU's slot: no concurrent writer.
        unsafe {
            if (*c).slice != slice {
                *c = SliceCount { slice, count: 0 };
            }
            (*c).count += 1;
        }
    }
    if add_retransmit(&key, now) {
        return 0;
    }
    let mut value = RetransValue {
        count: 1,
        first_ns: now,
        last_ns: now,
        ..RetransValue::default()
    };
    if let Some(sk) = read::<u64>(ctx, f[field::SKADDR])
        // SAFETY: lookup of a plain struct.
        && let Some(owner) = unsafe { SOCK_OWNERS.get(&sk) }
    {
        value.owner_tgid = owner.tgid;
        value.owner_cgroup = owner.cgroup;
        value.owner_comm = owner.comm;
    }
    // BPF_NOEXIST: a SYN-ACK resent for a duplicate SYN in softirq while
    // its timer resends it on another CPU (the one case without the
    // socket's lock) is added to, not overwritten.
    if RETRANS.insert(&key, &value, 1).is_err() {
        if add_retransmit(&key, now) {
            return 0;
        }
        bump(Counter::RetransMapFull);
        warn!(
            ctx,
            "retransmit map full: port {} -> {} counted, not kept", key.sport, key.dport
        );
    } else if value.owner_tgid != 0 && OWNER_EVENTS.output::<u32>(&value.owner_tgid, 0).is_err() {
        // A new connection: userspace notes its owner while it lives.
        bump(Counter::EventsLost);
    }
    0
}

/// Adds a retransmit to `key`'s record if it has one.
#[inline(always)]
fn add_retransmit(key: &RetransKey, now: u64) -> bool {
    let Some(v) = RETRANS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a pointer into the map's value. A connection's retransmits
    // are made under its socket's lock, so no other CPU updates this
    // record meanwhile (eBPF here has no atomic add).
    unsafe {
        (*v).count += 1;
        (*v).last_ns = now;
    }
    true
}
