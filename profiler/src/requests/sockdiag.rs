//! Listening TCP sockets from the kernel's sock_diag netlink interface
//! (what `ss -lt` asks): only the listening hash is walked. Reading
//! /proc/net/tcp instead walks every bucket of the established hash too
//! (sized from the host's memory, hundreds of thousands of buckets), and
//! prints every connection: 5-10 ms of a capture's end on an idle VM,
//! more with tens of thousands of connections.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::requests::downstream::WaitingListener;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, and a
/// 48-byte `inet_diag_sockid`.
const REQ_BYTES: usize = 56;
/// `struct inet_diag_msg`: family, state, timer, retrans, the sockid,
/// then expires, rqueue, wqueue, uid, inode (u32 each).
const MSG_BYTES: usize = 72;

/// Listening TCP sockets (IPv4 and IPv6) of this network namespace with
/// connections waiting to be accepted, longest queue first. An error
/// when the kernel has no sock_diag for TCP (then /proc/net/tcp says
/// the same, slower).
pub fn waiting_listeners() -> io::Result<Vec<WaitingListener>> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by socket(2), owned once.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump(&sock, family, &mut out)?;
    }
    out.sort_by_key(|l| std::cmp::Reverse(l.queue));
    Ok(out)
}

/// One dump request for `family`'s listening TCP sockets, its answers
/// read to the end.
fn dump(sock: &OwnedFd, family: u8, out: &mut Vec<WaitingListener>) -> io::Result<()> {
    let mut req = [0u8; NLMSG_HDR + REQ_BYTES];
    req[0..4].copy_from_slice(&((NLMSG_HDR + REQ_BYTES) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[NLMSG_HDR] = family;
    req[NLMSG_HDR + 1] = libc::IPPROTO_TCP as u8;
    req[NLMSG_HDR + 4..NLMSG_HDR + 8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    // SAFETY: send(2) of a buffer we own, its length given.
    let n = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: recv(2) into a buffer we own, its length given.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(());
        }
        if parse(&buf[..n as usize], out)? {
            return Ok(());
        }
    }
}

/// Parses one datagram of netlink messages into `out`; true at the
/// dump's end.
fn parse(mut b: &[u8], out: &mut Vec<WaitingListener>) -> io::Result<bool> {
    let u32_at = |b: &[u8], o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
    while b.len() >= NLMSG_HDR {
        let len = u32_at(b, 0) as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        if len < NLMSG_HDR || len > b.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a truncated sock_diag message",
            ));
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                // The error's negative errno follows the header.
                let errno = b
                    .get(NLMSG_HDR..NLMSG_HDR + 4)
                    .map_or(0, |e| i32::from_ne_bytes(e.try_into().unwrap()));
                return Err(if errno < 0 {
                    io::Error::from_raw_os_error(-errno)
                } else {
                    io::Error::other("sock_diag answered an error")
                });
            }
            SOCK_DIAG_BY_FAMILY if len >= NLMSG_HDR + MSG_BYTES => {
                out.extend(listener(&b[NLMSG_HDR..NLMSG_HDR + MSG_BYTES]));
            }
            _ => {}
        }
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    Ok(false)
}

/// A listener from an `inet_diag_msg`, if connections wait on it (a
/// listener's rqueue is its accept queue, as /proc/net/tcp's rx_queue).
fn listener(m: &[u8]) -> Option<WaitingListener> {
    let u32_at = |o: usize| u32::from_ne_bytes(m[o..o + 4].try_into().unwrap());
    let queue = u64::from(u32_at(56));
    if queue == 0 || u32::from(m[1]) != TCP_LISTEN {
        return None;
    }
    // inet_diag_sockid at 4: sport, dport (big-endian), src[16], dst[16].
    let port = u16::from_be_bytes([m[4], m[5]]);
    let ip = match i32::from(m[0]) {
        libc::AF_INET => IpAddr::from(<[u8; 4]>::try_from(&m[8..12]).ok()?),
        libc::AF_INET6 => IpAddr::from(<[u8; 16]>::try_from(&m[8..24]).ok()?),
        _ => return None,
    };
    Some(WaitingListener {
        addr: (ip, port),
        queue,
        inode: u64::from(u32_at(68)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::requests::downstream;

    /// A real listener with connections not accepted: sock_diag sees
    /// what /proc/net/tcp shows, queue and inode alike.
    #[test]
    fn sock_diag_sees_the_waiting_connections_proc_shows() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _c: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        // The handshakes complete in the kernel; give the queue a moment.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let ours = waiting_listeners().expect("sock_diag for TCP");
        let mine = ours
            .iter()
            .find(|w| w.addr.1 == port)
            .expect("our listener among the waiting ones");
        assert_eq!(mine.queue, 3);
        assert_eq!(mine.addr.0, IpAddr::from([127, 0, 0, 1]));
        let proc =
            downstream::waiting_listeners(&std::fs::read_to_string("/proc/net/tcp").unwrap());
        let theirs = proc.iter().find(|w| w.addr.1 == port).unwrap();
        assert_eq!(mine, theirs);
    }

    /// IPv6 listeners too (skipped where the host has no IPv6).
    #[test]
    fn sock_diag_sees_ipv6_listeners() {
        let Ok(l) = std::net::TcpListener::bind("[::1]:0") else {
            eprintln!("no IPv6 loopback here: skipped");
            return;
        };
        let port = l.local_addr().unwrap().port();
        let _c = std::net::TcpStream::connect(("::1", port)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let ours = waiting_listeners().expect("sock_diag for TCP");
        let mine = ours.iter().find(|w| w.addr.1 == port).unwrap();
        assert_eq!(mine.addr.0, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(mine.queue, 1);
    }

    #[test]
    fn truncated_and_error_messages_are_errors() {
        let mut out = Vec::new();
        let mut m = vec![0u8; 20];
        m[0..4].copy_from_slice(&100u32.to_ne_bytes());
        assert!(parse(&m, &mut out).is_err());
        m[0..4].copy_from_slice(&20u32.to_ne_bytes());
        m[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        let e = parse(&m, &mut out).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        m[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        assert!(parse(&m, &mut out).unwrap());
        assert!(out.is_empty());
    }
}
