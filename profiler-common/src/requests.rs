//! Requests and connections from syscall tracepoints: sockets a profiled
//! process accepted are followed by (process, fd); the first bytes read
//! after a response (or at the start) begin a request, the first bytes
//! written after it begin its response. The kernel sends the first bytes
//! of each with their times; userspace parses HTTP/1.x, pairs them and
//! aggregates per route.

use crate::{MapDef, ProgDef};

/// sys_exit_accept / sys_exit_accept4: a connection accepted.
pub const PROG_ACCEPT: ProgDef = ProgDef { name: "req_accept" };
/// sys_enter_read / sys_enter_recvfrom: remember the buffer.
pub const PROG_READ_ENTER: ProgDef = ProgDef {
    name: "req_read_enter",
};
/// sys_exit_read / sys_exit_recvfrom: bytes arrived.
pub const PROG_READ_EXIT: ProgDef = ProgDef {
    name: "req_read_exit",
};
/// sys_enter_write / sys_enter_sendto: bytes leave (buffer in arg 1).
pub const PROG_WRITE: ProgDef = ProgDef { name: "req_write" };
/// sys_enter_writev: bytes leave (an iovec array in arg 1).
pub const PROG_WRITEV: ProgDef = ProgDef { name: "req_writev" };
/// sys_enter_connect: remember the address.
pub const PROG_CONNECT_ENTER: ProgDef = ProgDef {
    name: "req_connect_enter",
};
/// sys_exit_connect: follow the outbound connection (or count its
/// failure).
pub const PROG_CONNECT_EXIT: ProgDef = ProgDef {
    name: "req_connect_exit",
};
/// sys_enter_close: the connection ends.
pub const PROG_CLOSE: ProgDef = ProgDef { name: "req_close" };
/// sock:inet_sock_set_state: an outbound connection's handshake (SYN
/// sent to established: connect latency), its failure (refused, timed
/// out, unreachable) or a reset later.
pub const PROG_SOCK_STATE: ProgDef = ProgDef {
    name: "req_sock_state",
};

/// Hash map [`ConnKey`] -> [`Conn`]: connections followed.
pub const CONNS: MapDef = MapDef {
    name: "CONNS",
    entries: 16 * 1024,
};
/// Hash map tid -> [`PendingRead`]: a read in progress on a followed fd.
pub const PENDING_READS: MapDef = MapDef {
    name: "PENDING_READS",
    entries: 8192,
};
/// Hash map tid -> [`PendingConnect`]: a connect in progress.
pub const PENDING_CONNECTS: MapDef = MapDef {
    name: "PENDING_CONNECTS",
    entries: 4096,
};
/// LRU hash map socket address -> [`OutSock`]: outbound sockets of
/// profiled processes, from their SYN to their close.
pub const OUT_SOCKS: MapDef = MapDef {
    name: "OUT_SOCKS",
    entries: 16 * 1024,
};
/// Ring buffer of [`ReqEvent`].
pub const REQ_EVENTS: MapDef = MapDef {
    name: "REQ_EVENTS",
    entries: 1024 * 1024,
};

/// Bytes of a request's or response's start sent to userspace.
pub const HEAD_BYTES: usize = 96;

/// [`Conn::state`]: accepted, or its last response started; the next
/// bytes read begin a request.
pub const STATE_IDLE: u32 = 0;
/// A request was read, its response not started.
pub const STATE_REQUEST: u32 = 1;

/// [`Conn::role`]: a connection the process accepted.
pub const ROLE_INBOUND: u32 = 0;
/// A connection the process opened with connect(2).
pub const ROLE_OUTBOUND: u32 = 1;

/// [`ReqEvent::kind`]: the first bytes of a request.
pub const EVENT_REQUEST: u32 = 1;
/// The first bytes of its response.
pub const EVENT_RESPONSE: u32 = 2;
/// The connection closed (`bytes_in`, `bytes_out`, `flags` set; for an
/// inbound one `request_ns` holds its last response's start).
pub const EVENT_CLOSE: u32 = 3;
/// An outbound connection opened: `head` holds its sockaddr.
pub const EVENT_CONNECT: u32 = 4;
/// A connect that failed: `head` holds its sockaddr, `len` the errno
/// (from connect(2), or the socket's `sk_err` when its handshake ended:
/// 0 when the process closed it first, [`ERRNO_UNKNOWN`] when the kernel's
/// layout hides it).
pub const EVENT_CONNECT_FAILED: u32 = 5;
/// The first bytes written on an outbound connection (its protocol).
pub const EVENT_FIRST_WRITE: u32 = 6;
/// A round trip on an outbound connection: written at `request_ns`, the
/// answer's first bytes read at `time_ns`.
pub const EVENT_ROUND_TRIP: u32 = 7;
/// An outbound connection's handshake ended: SYN sent at `request_ns`,
/// established at `time_ns`; `head` holds the destination as a sockaddr.
pub const EVENT_ESTABLISHED: u32 = 8;
/// An established outbound connection ended with an error (`len`: the
/// errno, ECONNRESET for a reset); `head` holds the destination.
pub const EVENT_CONN_ERROR: u32 = 9;
/// [`ReqEvent::len`] of a failure whose errno could not be read.
pub const ERRNO_UNKNOWN: u32 = u32::MAX;

/// TCP states of `sock:inet_sock_set_state` (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: i32 = 1;
/// SYN sent, no answer yet.
pub const TCP_SYN_SENT: i32 = 2;
/// Closed.
pub const TCP_CLOSE: i32 = 7;

/// A followed connection: process and file descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Thread-group id.
    pub tgid: u32,
    /// File descriptor.
    pub fd: u32,
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 8);

/// A followed connection's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn {
    /// When it was accepted (ktime ns): tells connections on a reused fd
    /// apart.
    pub accepted_ns: u64,
    /// When the request in progress started (its first byte read).
    pub request_ns: u64,
    /// [`STATE_IDLE`] or [`STATE_REQUEST`] (inbound); outbound: non-zero
    /// while a write waits for its answer.
    pub state: u32,
    /// [`ROLE_INBOUND`] or [`ROLE_OUTBOUND`].
    pub role: u32,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// When the last response started (inbound).
    pub response_ns: u64,
    /// [`FLAG_PEER_CLOSED`].
    pub flags: u32,
    /// Padding, zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Conn>() == 56);

/// [`Conn::flags`]: a read returned end of file: the peer closed first.
pub const FLAG_PEER_CLOSED: u32 = 1;

/// A connect in progress.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingConnect {
    /// The fd.
    pub fd: u32,
    /// [`SYN_SENT`] once its SYN was sent: the socket's state changes
    /// report its outcome, connect(2)'s return does not; [`SYN_FAILED`]
    /// when it failed before connect(2) returned (a RST processed as the
    /// socket was released: loopback).
    pub syn_sent: u32,
    /// When connect(2) was called.
    pub start_ns: u64,
    /// The first bytes of its sockaddr (family, port, address).
    pub addr: [u8; 32],
}
const _: () = assert!(core::mem::size_of::<PendingConnect>() == 48);

/// An outbound socket of a profiled process, from its SYN.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutSock {
    /// Thread-group id.
    pub tgid: u32,
    /// File descriptor.
    pub fd: u32,
    /// When connect(2) was called (the connection's identity, as
    /// [`Conn::accepted_ns`]).
    pub opened_ns: u64,
    /// When its SYN was sent.
    pub syn_ns: u64,
    /// The thread that called connect(2).
    pub tid: u32,
    /// Padding, zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<OutSock>() == 32);

/// [`PendingConnect::syn_sent`]: the SYN went out.
pub const SYN_SENT: u32 = 1;
/// The handshake failed, and the failure was sent, before connect(2)
/// returned.
pub const SYN_FAILED: u32 = 2;

/// A read in progress on a followed fd.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingRead {
    /// The user buffer.
    pub buf: u64,
    /// The fd.
    pub fd: u32,
    /// Padding, zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PendingRead>() == 16);

/// A request starting, its response starting, or a close.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReqEvent {
    /// [`EVENT_REQUEST`], [`EVENT_RESPONSE`], [`EVENT_CLOSE`].
    pub kind: u32,
    /// Thread-group id.
    pub tgid: u32,
    /// File descriptor.
    pub fd: u32,
    /// Bytes of `head` that hold data.
    pub len: u32,
    /// The connection's accept time (its identity with `tgid`, `fd`).
    pub accepted_ns: u64,
    /// The request's start (its first byte read).
    pub request_ns: u64,
    /// This event's time.
    pub time_ns: u64,
    /// Bytes read on the connection so far.
    pub bytes_in: u64,
    /// Bytes written so far.
    pub bytes_out: u64,
    /// [`ROLE_INBOUND`] or [`ROLE_OUTBOUND`].
    pub role: u32,
    /// The connection's [`Conn::flags`].
    pub flags: u32,
    /// The first bytes read (a request) or written (a response, an
    /// outbound connection's first write), or a sockaddr.
    pub head: [u8; HEAD_BYTES],
}
const _: () = assert!(core::mem::size_of::<ReqEvent>() == 64 + HEAD_BYTES);

crate::pod!(
    ConnKey,
    Conn,
    PendingRead,
    PendingConnect,
    OutSock,
    ReqEvent
);
