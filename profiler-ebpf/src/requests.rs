//! Requests: connections a profiled process accepted are followed by
//! (process, fd) from sys_exit_accept(4); the first bytes read on one
//! after accept or after a response began (sys_enter/exit of read and
//! recvfrom) start a request, the first bytes written after it (write,
//! sendto, writev) start its response: each sent with its time and its
//! first bytes. Only followed fds of profiled processes cost more than a
//! hash lookup.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_probe_read_user_buf,
    },
    macros::tracepoint,
    maps::{HashMap, LruHashMap, RingBuf},
    programs::TracePointContext,
};
use profiler_common::{
    counters::Counter,
    requests::{
        self, Conn, ConnKey, ERRNO_UNKNOWN, EVENT_CLOSE, EVENT_CONN_ERROR, EVENT_CONNECT,
        EVENT_CONNECT_FAILED, EVENT_ESTABLISHED, EVENT_FIRST_WRITE, EVENT_REQUEST, EVENT_RESPONSE,
        EVENT_ROUND_TRIP, FLAG_PEER_CLOSED, HEAD_BYTES, OutSock, PendingConnect, PendingRead,
        ROLE_INBOUND, ROLE_OUTBOUND, ReqEvent, STATE_IDLE, STATE_REQUEST, SYN_FAILED, SYN_SENT,
        TCP_CLOSE, TCP_ESTABLISHED, TCP_SYN_SENT,
    },
};

use crate::{BPF_RB_NO_WAKEUP, bump, config, now};

map!(CONNS: HashMap<ConnKey, Conn> = with_max_entries(requests::CONNS));
map!(PENDING_READS: HashMap<u32, PendingRead> = with_max_entries(requests::PENDING_READS));
map!(REQ_EVENTS: RingBuf = with_byte_size(requests::REQ_EVENTS));
map!(PENDING_CONNECTS: HashMap<u32, PendingConnect> = with_max_entries(requests::PENDING_CONNECTS));
map!(OUT_SOCKS: LruHashMap<u64, OutSock> = with_max_entries(requests::OUT_SOCKS));

/// EINPROGRESS: a non-blocking connect under way.
const EINPROGRESS: i64 = 115;
/// Bit of [`Conn::state`] (outbound): the first write was sent up.
const FIRST_WRITE_SEEN: u32 = 2;
/// Bit of [`Conn::state`] (outbound): a write waits for its answer.
const AWAITING: u32 = 1;

/// Offset of syscall argument `i` in a sys_enter record (checked against
/// the format files by the loader), and of `ret` in a sys_exit one.
const fn arg(i: usize) -> usize {
    16 + 8 * i
}
const RET: usize = 16;

#[inline(always)]
fn arg_u64(ctx: &TracePointContext, offset: usize) -> Option<u64> {
    // SAFETY: bounds-checked probe read of the tracepoint record.
    unsafe { ctx.read_at::<u64>(offset) }.ok()
}

/// The current process and whether it is profiled.
#[inline(always)]
fn current() -> Option<(u32, u32)> {
    let cfg = config();
    if cfg.requests == 0 {
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if cfg.filter_pids != 0 && !crate::procs::profiled(tgid) {
        return None;
    }
    Some((tgid, pid_tgid as u32))
}

/// Sends an event with the first bytes at user address `buf` (up to
/// `avail`).
#[inline(always)]
fn send(kind: u32, key: &ConnKey, conn: &Conn, buf: u64, avail: u64, t: u64) {
    let Some(mut entry) = REQ_EVENTS.reserve::<ReqEvent>(0) else {
        bump(Counter::RequestEventsLost);
        return;
    };
    let e = entry.as_mut_ptr();
    let len = if avail > HEAD_BYTES as u64 {
        HEAD_BYTES as u64
    } else {
        avail
    };
    // SAFETY: `e` points at the reserved record; the user read is bounded
    // by the head's size and fails rather than faults.
    unsafe {
        (*e).kind = kind;
        (*e).tgid = key.tgid;
        (*e).fd = key.fd;
        (*e).accepted_ns = conn.accepted_ns;
        (*e).request_ns = conn.request_ns;
        (*e).time_ns = t;
        (*e).bytes_in = conn.bytes_in;
        (*e).bytes_out = conn.bytes_out;
        (*e).role = conn.role;
        (*e).flags = conn.flags;
        (*e).head = [0; HEAD_BYTES];
        let ok = buf != 0
            && len > 0
            && bpf_probe_read_user_buf(buf as *const u8, &mut (&mut (*e).head)[..len as usize])
                .is_ok();
        (*e).len = if ok { len as u32 } else { 0 };
    }
    entry.submit(BPF_RB_NO_WAKEUP);
}

prog_named!(req_accept, requests::PROG_ACCEPT);
/// sys_exit_accept(4): follow the new connection.
#[tracepoint]
pub fn req_accept(ctx: TracePointContext) -> u32 {
    let Some((tgid, _)) = current() else {
        return 0;
    };
    let Some(fd) = arg_u64(&ctx, RET) else {
        return 0;
    };
    let fd = fd as i64;
    if fd < 0 || fd > u32::MAX as i64 {
        return 0;
    }
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    let conn = Conn {
        accepted_ns: now(),
        request_ns: 0,
        state: STATE_IDLE,
        role: ROLE_INBOUND,
        bytes_in: 0,
        bytes_out: 0,
        response_ns: 0,
        flags: 0,
        _pad: 0,
    };
    if CONNS.insert(&key, &conn, 0).is_err() {
        bump(Counter::ConnsFull);
    }
    0
}

prog_named!(req_read_enter, requests::PROG_READ_ENTER);
/// sys_enter_read / sys_enter_recvfrom: a read on a followed fd; its
/// buffer is read at the exit.
#[tracepoint]
pub fn req_read_enter(ctx: TracePointContext) -> u32 {
    let Some((tgid, tid)) = current() else {
        return 0;
    };
    let (Some(fd), Some(buf)) = (arg_u64(&ctx, arg(0)), arg_u64(&ctx, arg(1))) else {
        return 0;
    };
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    // SAFETY: a lookup of plain integers.
    if unsafe { CONNS.get(&key) }.is_none() {
        return 0;
    }
    let _ = PENDING_READS.insert(
        &tid,
        &PendingRead {
            buf,
            fd: fd as u32,
            _pad: 0,
        },
        0,
    );
    0
}

prog_named!(req_read_exit, requests::PROG_READ_EXIT);
/// sys_exit_read / sys_exit_recvfrom: bytes arrived; after accept or a
/// response they start a request.
#[tracepoint]
pub fn req_read_exit(ctx: TracePointContext) -> u32 {
    let Some((tgid, tid)) = current() else {
        return 0;
    };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(p) = (unsafe { PENDING_READS.get(&tid) }).copied() else {
        return 0;
    };
    let _ = PENDING_READS.remove(&tid);
    let Some(ret) = arg_u64(&ctx, RET) else {
        return 0;
    };
    let n = ret as i64;
    let key = ConnKey { tgid, fd: p.fd };
    if n == 0 {
        // End of file: the peer closed first.
        if let Some(conn) = CONNS.get_ptr_mut(&key) {
            // SAFETY: a flag store into this process's entry.
            unsafe { (*conn).flags |= FLAG_PEER_CLOSED };
        }
        return 0;
    }
    if n < 0 {
        return 0;
    }
    let Some(conn) = CONNS.get_ptr_mut(&key) else {
        return 0;
    };
    let t = now();
    // SAFETY: an entry of this process's connection; a race with its
    // close only loses this request.
    unsafe {
        (*conn).bytes_in += n as u64;
        if (*conn).role == ROLE_OUTBOUND {
            // The answer to a write: one round trip.
            if (*conn).state & AWAITING != 0 {
                (*conn).state &= !AWAITING;
                let c = *conn;
                send(EVENT_ROUND_TRIP, &key, &c, 0, 0, t);
            }
            return 0;
        }
        if (*conn).state != STATE_IDLE {
            return 0;
        }
        (*conn).state = STATE_REQUEST;
        (*conn).request_ns = t;
        let c = *conn;
        send(EVENT_REQUEST, &key, &c, p.buf, n as u64, t);
    }
    0
}

/// Bytes written to `fd`: the first after a request start its response.
#[inline(always)]
fn written(tgid: u32, fd: u64, buf: u64, len: u64) {
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    let Some(conn) = CONNS.get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: as in req_read_exit.
    unsafe {
        (*conn).bytes_out += len;
        if (*conn).role == ROLE_OUTBOUND {
            let first = (*conn).state & FIRST_WRITE_SEEN == 0;
            if (*conn).state & AWAITING == 0 {
                (*conn).state |= AWAITING | FIRST_WRITE_SEEN;
                (*conn).request_ns = now();
            }
            if first {
                let c = *conn;
                send(EVENT_FIRST_WRITE, &key, &c, buf, len, c.request_ns);
            }
            return;
        }
        if (*conn).state != STATE_REQUEST {
            return;
        }
        (*conn).state = STATE_IDLE;
        let t = now();
        (*conn).response_ns = t;
        let c = *conn;
        send(EVENT_RESPONSE, &key, &c, buf, len, t);
    }
}

prog_named!(req_write, requests::PROG_WRITE);
/// sys_enter_write / sys_enter_sendto: (fd, buf, len).
#[tracepoint]
pub fn req_write(ctx: TracePointContext) -> u32 {
    let Some((tgid, _)) = current() else {
        return 0;
    };
    if let (Some(fd), Some(buf), Some(len)) = (
        arg_u64(&ctx, arg(0)),
        arg_u64(&ctx, arg(1)),
        arg_u64(&ctx, arg(2)),
    ) {
        written(tgid, fd, buf, len);
    }
    0
}

prog_named!(req_writev, requests::PROG_WRITEV);
/// sys_enter_writev: (fd, iovec array, count): the first iovec's bytes.
#[tracepoint]
pub fn req_writev(ctx: TracePointContext) -> u32 {
    let Some((tgid, _)) = current() else {
        return 0;
    };
    let (Some(fd), Some(vec), Some(vlen)) = (
        arg_u64(&ctx, arg(0)),
        arg_u64(&ctx, arg(1)),
        arg_u64(&ctx, arg(2)),
    ) else {
        return 0;
    };
    if vlen == 0 || vec == 0 {
        return 0;
    }
    // SAFETY: a probe read of the caller's first iovec (base, len).
    let Ok(iov) = (unsafe { bpf_probe_read_user(vec as *const [u64; 2]) }) else {
        return 0;
    };
    written(tgid, fd, iov[0], iov[1]);
    0
}

prog_named!(req_connect_enter, requests::PROG_CONNECT_ENTER);
/// sys_enter_connect: (fd, sockaddr, len): keep the address.
#[tracepoint]
pub fn req_connect_enter(ctx: TracePointContext) -> u32 {
    let Some((_, tid)) = current() else {
        return 0;
    };
    let (Some(fd), Some(addr)) = (arg_u64(&ctx, arg(0)), arg_u64(&ctx, arg(1))) else {
        return 0;
    };
    let mut p = PendingConnect {
        fd: fd as u32,
        syn_sent: 0,
        start_ns: now(),
        addr: [0; 32],
    };
    // SAFETY: a bounded probe read of the caller's sockaddr.
    unsafe {
        if bpf_probe_read_user_buf(addr as *const u8, &mut p.addr[..28]).is_err() {
            return 0;
        }
    }
    // AF_INET and AF_INET6 only.
    let family = u16::from_ne_bytes([p.addr[0], p.addr[1]]);
    if family != 2 && family != 10 {
        return 0;
    }
    let _ = PENDING_CONNECTS.insert(&tid, &p, 0);
    0
}

prog_named!(req_connect_exit, requests::PROG_CONNECT_EXIT);
/// sys_exit_connect: follow the connection (under way or made), or send
/// its failure.
#[tracepoint]
pub fn req_connect_exit(ctx: TracePointContext) -> u32 {
    let Some((tgid, tid)) = current() else {
        return 0;
    };
    // SAFETY: copied out before removal.
    let Some(p) = (unsafe { PENDING_CONNECTS.get(&tid) }).copied() else {
        return 0;
    };
    let _ = PENDING_CONNECTS.remove(&tid);
    let Some(ret) = arg_u64(&ctx, RET) else {
        return 0;
    };
    let ret = ret as i64;
    let key = ConnKey { tgid, fd: p.fd };
    let conn = Conn {
        accepted_ns: p.start_ns,
        request_ns: 0,
        state: 0,
        role: ROLE_OUTBOUND,
        bytes_in: 0,
        bytes_out: 0,
        response_ns: 0,
        flags: 0,
        _pad: 0,
    };
    let kind = if p.syn_sent == SYN_FAILED {
        // It failed as connect(2) released the socket: already sent.
        return 0;
    } else if ret == 0 || ret == -EINPROGRESS {
        if CONNS.insert(&key, &conn, 0).is_err() {
            bump(Counter::ConnsFull);
            return 0;
        }
        EVENT_CONNECT
    } else if p.syn_sent == SYN_SENT {
        // Its SYN went out: req_sock_state sent the outcome.
        return 0;
    } else {
        EVENT_CONNECT_FAILED
    };
    send_addr(kind, &key, &conn, &p.addr, (-ret) as u32);
    0
}

/// Sends a connect event with the sockaddr in `head` (and the errno in
/// `len` for a failure).
#[inline(always)]
fn send_addr(kind: u32, key: &ConnKey, conn: &Conn, addr: &[u8; 32], errno: u32) {
    let Some(mut entry) = REQ_EVENTS.reserve::<ReqEvent>(0) else {
        bump(Counter::RequestEventsLost);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved record.
    unsafe {
        (*e).kind = kind;
        (*e).tgid = key.tgid;
        (*e).fd = key.fd;
        (*e).len = if kind == EVENT_CONNECT_FAILED {
            errno
        } else {
            28
        };
        (*e).accepted_ns = conn.accepted_ns;
        (*e).request_ns = 0;
        (*e).time_ns = now();
        (*e).bytes_in = 0;
        (*e).bytes_out = 0;
        (*e).role = ROLE_OUTBOUND;
        (*e).flags = 0;
        (*e).head = [0; HEAD_BYTES];
        (&mut (*e).head)[..32].copy_from_slice(addr);
    }
    entry.submit(BPF_RB_NO_WAKEUP);
}

prog_named!(req_close, requests::PROG_CLOSE);
/// sys_enter_close: stop following the fd.
#[tracepoint]
pub fn req_close(ctx: TracePointContext) -> u32 {
    let Some((tgid, _)) = current() else {
        return 0;
    };
    let Some(fd) = arg_u64(&ctx, arg(0)) else {
        return 0;
    };
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    // SAFETY: copied out before removal.
    if let Some(mut c) = (unsafe { CONNS.get(&key) }).copied() {
        let _ = CONNS.remove(&key);
        c.request_ns = c.response_ns;
        send(EVENT_CLOSE, &key, &c, 0, 0, now());
    }
    0
}

/// Fields of `sock:inet_sock_set_state` (offsets checked by the loader).
mod state {
    pub const SKADDR: usize = 8;
    pub const OLDSTATE: usize = 16;
    pub const NEWSTATE: usize = 20;
    pub const DPORT: usize = 26;
    pub const FAMILY: usize = 28;
    pub const PROTOCOL: usize = 30;
    pub const DADDR: usize = 36;
    pub const DADDR_V6: usize = 56;
}

/// IPPROTO_TCP.
const IPPROTO_TCP: u16 = 6;

prog_named!(req_sock_state, requests::PROG_SOCK_STATE);
/// sock:inet_sock_set_state: an outbound socket's SYN (in its process's
/// connect(2)), its handshake's end, and its close with an error.
#[tracepoint]
pub fn req_sock_state(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if cfg.sock_states == 0 {
        return 0;
    }
    // SAFETY: bounded reads of the tracepoint record, at offsets the
    // loader checked against its format.
    let read = unsafe {
        (
            ctx.read_at::<u16>(state::PROTOCOL),
            ctx.read_at::<i32>(state::OLDSTATE),
            ctx.read_at::<i32>(state::NEWSTATE),
            ctx.read_at::<u64>(state::SKADDR),
        )
    };
    let (Ok(protocol), Ok(old), Ok(new), Ok(sk)) = read else {
        return 0;
    };
    if protocol != IPPROTO_TCP {
        return 0;
    }
    if old == TCP_CLOSE && new == TCP_SYN_SENT {
        // In connect(2) of the thread that called it: only a profiled
        // process has a pending connect.
        let pid_tgid = bpf_get_current_pid_tgid();
        let tid = pid_tgid as u32;
        let Some(p) = PENDING_CONNECTS.get_ptr_mut(&tid) else {
            return 0;
        };
        // SAFETY: this thread's own entry.
        let (fd, opened_ns) = unsafe {
            (*p).syn_sent = SYN_SENT;
            ((*p).fd, (*p).start_ns)
        };
        let s = OutSock {
            tgid: (pid_tgid >> 32) as u32,
            fd,
            opened_ns,
            syn_ns: now(),
            tid,
            _pad: 0,
        };
        let _ = OUT_SOCKS.insert(&sk, &s, 0);
        return 0;
    }
    // SAFETY: copied out at once.
    let Some(s) = (unsafe { OUT_SOCKS.get(&sk) }).copied() else {
        return 0;
    };
    if old == TCP_SYN_SENT && new == TCP_ESTABLISHED {
        send_state(&ctx, EVENT_ESTABLISHED, &s, 0);
    } else if new == TCP_CLOSE {
        let _ = OUT_SOCKS.remove(&sk);
        let errno = if cfg.sk_err == 0 {
            ERRNO_UNKNOWN
        } else {
            // SAFETY: a probe read of the socket's sk_err (set before
            // tcp_done moves it to CLOSE); a bad address fails the helper.
            unsafe { bpf_probe_read_kernel((sk + cfg.sk_err as u64) as *const i32) }
                .map(|e| e as u32)
                .unwrap_or(ERRNO_UNKNOWN)
        };
        if old == TCP_SYN_SENT {
            // Still inside its connect(2) (loopback: the RST is processed
            // as the call releases the socket): connect's exit must not
            // follow it.
            if let Some(p) = PENDING_CONNECTS.get_ptr_mut(&s.tid) {
                // SAFETY: a store into that thread's pending entry,
                // checked to be this connect.
                unsafe {
                    if (*p).fd == s.fd && (*p).start_ns == s.opened_ns {
                        (*p).syn_sent = SYN_FAILED;
                    }
                }
            }
            send_state(&ctx, EVENT_CONNECT_FAILED, &s, errno);
        } else if errno != 0 && errno != ERRNO_UNKNOWN {
            send_state(&ctx, EVENT_CONN_ERROR, &s, errno);
        }
    }
    0
}

/// Sends an outbound socket's state event, its destination as a sockaddr
/// in `head` (as connect(2) was given it).
#[inline(always)]
fn send_state(ctx: &TracePointContext, kind: u32, s: &OutSock, errno: u32) {
    let Some(mut entry) = REQ_EVENTS.reserve::<ReqEvent>(0) else {
        bump(Counter::RequestEventsLost);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved record; the reads are bounded
    // reads of the tracepoint record.
    unsafe {
        (*e).kind = kind;
        (*e).tgid = s.tgid;
        (*e).fd = s.fd;
        (*e).len = errno;
        (*e).accepted_ns = s.opened_ns;
        (*e).request_ns = s.syn_ns;
        (*e).time_ns = now();
        (*e).bytes_in = 0;
        (*e).bytes_out = 0;
        (*e).role = ROLE_OUTBOUND;
        (*e).flags = 0;
        (*e).head = [0; HEAD_BYTES];
        let family = ctx.read_at::<u16>(state::FAMILY).unwrap_or(0);
        let port = ctx.read_at::<u16>(state::DPORT).unwrap_or(0);
        let head = &mut (*e).head;
        head[..2].copy_from_slice(&family.to_ne_bytes());
        head[2..4].copy_from_slice(&port.to_be_bytes());
        if family == 2 {
            let a = ctx.read_at::<[u8; 4]>(state::DADDR).unwrap_or([0; 4]);
            head[4..8].copy_from_slice(&a);
        } else {
            let a = ctx.read_at::<[u8; 16]>(state::DADDR_V6).unwrap_or([0; 16]);
            head[8..24].copy_from_slice(&a);
        }
    }
    entry.submit(BPF_RB_NO_WAKEUP);
}
