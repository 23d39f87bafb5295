//! Downstream connections as the kernel saw them: every TCP connection a
//! profiled process opened with connect(2), its destination (from the
//! sockaddr), protocol (from its first bytes written, else its port),
//! lifetime, bytes, and round trips (a write and the first bytes of the
//! answer read); per process and destination, and the findings they
//! support (no keep-alive, N+1).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde::Serialize;

use crate::requests::http::{DurationMs, RouteAgg};

/// Most lifetimes kept per destination (for the median).
const MAX_LIFETIMES: usize = 10_000;

/// A destination: address and port.
pub type Dest = (IpAddr, u16);

/// The destination of a sockaddr (AF_INET, AF_INET6), as the kernel
/// copied it.
pub fn parse_sockaddr(b: &[u8]) -> Option<Dest> {
    let family = u16::from_ne_bytes([*b.first()?, *b.get(1)?]);
    let port = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]);
    match family {
        2 => {
            let a: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some((IpAddr::from(a), port))
        }
        10 => {
            let a: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let ip = std::net::Ipv6Addr::from(a);
            Some((ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4), port))
        }
        _ => None,
    }
}

/// The protocol the first bytes written on a connection speak, else the
/// one its port is known for.
pub fn protocol(first: &[u8], port: u16) -> &'static str {
    const METHODS: [&[u8]; 7] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"PATCH ",
        b"HEAD ",
        b"OPTIONS ",
    ];
    if METHODS.iter().any(|m| first.starts_with(m)) {
        return "http";
    }
    if first.len() >= 2 && first[0] == b'*' && first[1].is_ascii_digit() {
        return "redis";
    }
    if first.len() >= 3 && first[0] == 0x16 && first[1] == 0x03 {
        return "tls";
    }
    // PostgreSQL: length, then protocol 3.0 or the SSLRequest code.
    if first.len() >= 8 {
        let code = u32::from_be_bytes([first[4], first[5], first[6], first[7]]);
        if code == 0x0003_0000 || code == 80_877_103 {
            return "postgresql";
        }
    }
    match port {
        80 | 8080 | 8000 | 3000 => "http",
        443 => "tls",
        6379 => "redis",
        5432 => "postgresql",
        3306 => "mysql",
        11211 => "memcached",
        27017 => "mongodb",
        9092 => "kafka",
        _ => "tcp",
    }
}

/// One process's traffic to one destination.
#[derive(Clone, Debug, Default)]
pub struct DestAgg {
    /// Protocol, from the first connection's first bytes.
    pub protocol: Option<&'static str>,
    /// Round trips and their durations (as a route's).
    pub round_trips: RouteAgg,
    /// Round trips made while exactly one inbound request of the process
    /// was in progress, by its method and route.
    pub by_route: HashMap<(String, String), u64>,
    /// Connections opened.
    pub opened: u64,
    /// Connections closed.
    pub closed: u64,
    /// Open now, and the most at once.
    pub open_now: i64,
    /// Most open at once.
    pub open_max: i64,
    /// Lifetimes of the closed ones, ns (bounded).
    pub lifetimes: Vec<u64>,
    /// Bytes read and written on the closed ones.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// Connects that failed and connections that ended in an error.
    pub failures: u64,
    /// Them by reason ([`failure_reason`]).
    pub failure_reasons: BTreeMap<&'static str, u64>,
    /// Handshakes (SYN sent to established) and their durations.
    pub connects: RouteAgg,
    /// How busy its connections were, over time.
    pub pool: PoolTime,
}

/// How busy a destination's connections were: over the time from its
/// first round trip to its last (`span_ns`), the time every connection
/// open to it had a round trip in flight (`all_busy_ns`), and over that
/// time the sum of the process's inbound requests in progress beyond
/// the connections busy (`waiting_ns`, request-ns): requests that, as far
/// as the kernel can tell, waited for a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PoolTime {
    /// First round trip's start to last round trip's end, ns.
    pub span_ns: u64,
    /// Every open connection busy, ns.
    pub all_busy_ns: u64,
    /// Inbound requests in progress beyond those busy, while all were
    /// busy, request-ns.
    pub waiting_ns: u64,
    /// Connections open over the span, connection-ns (over `span_ns`:
    /// the mean open at once).
    pub open_ns: u64,
}

impl PoolTime {
    /// Adds a later slice's.
    pub fn merge(&mut self, o: &PoolTime) {
        self.span_ns += o.span_ns;
        self.all_busy_ns += o.all_busy_ns;
        self.waiting_ns += o.waiting_ns;
        self.open_ns += o.open_ns;
    }
}

/// A change on a destination's timeline: at `.0`, round trips in flight
/// change by `.1` and connections open by `.2`.
pub type PoolEvent = (u64, i32, i32);

/// Sweeps a destination's timeline (`open_at_start` connections open
/// before it) with its process's inbound requests (at `.0`, requests in
/// progress change by `.1`). Neither needs to be sorted.
pub fn pool_time(dest: &mut [PoolEvent], inbound: &[(u64, i32)], open_at_start: i64) -> PoolTime {
    dest.sort_unstable_by_key(|e| e.0);
    let rt_times = dest.iter().filter(|e| e.1 != 0).map(|e| e.0);
    let (Some(first), Some(last)) = (rt_times.clone().min(), rt_times.max()) else {
        return PoolTime::default();
    };
    let mut inbound: Vec<(u64, i32)> = inbound.iter().copied().filter(|e| e.0 <= last).collect();
    inbound.sort_unstable_by_key(|e| e.0);
    let (mut busy, mut open, mut inflight) = (0i64, open_at_start, 0i64);
    let mut out = PoolTime {
        span_ns: last - first,
        ..Default::default()
    };
    let (mut i, mut j) = (0, 0);
    let mut t = 0u64;
    while i < dest.len() || j < inbound.len() {
        let next = match (dest.get(i), inbound.get(j)) {
            (Some(d), Some(r)) => d.0.min(r.0),
            (Some(d), None) => d.0,
            (None, Some(r)) => r.0,
            (None, None) => break,
        };
        if t >= first && t < last {
            out.open_ns += open.max(0) as u64 * (next.min(last) - t);
        }
        if t >= first && open > 0 && busy >= open {
            let dt = next - t;
            out.all_busy_ns += dt;
            out.waiting_ns += (inflight - busy).max(0) as u64 * dt;
        }
        t = next;
        while let Some(d) = dest.get(i).filter(|d| d.0 == t) {
            busy += i64::from(d.1);
            open += i64::from(d.2);
            i += 1;
        }
        while let Some(r) = inbound.get(j).filter(|r| r.0 == t) {
            inflight += i64::from(r.1);
            j += 1;
        }
    }
    out
}

/// Why a connect failed or a connection ended in error, from the event's
/// kind and errno: `refused` (a RST answered the SYN), `timed_out` (no
/// answer, or no ACK of data, after the kernel's retries), `reset` (a RST
/// on an established connection), `unreachable` (ICMP, no route),
/// `abandoned` (the process closed it before its handshake ended: its own
/// connect timeout), `no_local_port`, else `failed`.
pub fn failure_reason(kind: u32, errno: u32) -> &'static str {
    use profiler_common::requests::{ERRNO_UNKNOWN, EVENT_CONNECT_FAILED};
    match errno {
        111 => "refused",
        110 => "timed_out",
        104 | 32 => "reset",
        113 | 101 => "unreachable",
        99 => "no_local_port",
        0 if kind == EVENT_CONNECT_FAILED => "abandoned",
        ERRNO_UNKNOWN => "failed",
        _ => "failed",
    }
}

impl DestAgg {
    /// Counts one round trip of `ns`.
    pub fn round_trip(&mut self, ns: u64) {
        self.round_trips.time(ns);
    }

    /// Counts a handshake of `ns`.
    pub fn connected(&mut self, ns: u64) {
        self.connects.time(ns);
    }

    /// Counts a failure.
    pub fn failed(&mut self, reason: &'static str) {
        self.failures += 1;
        *self.failure_reasons.entry(reason).or_default() += 1;
    }

    /// Counts a closed connection.
    pub fn closed(&mut self, lifetime_ns: u64, bytes_in: u64, bytes_out: u64) {
        self.closed += 1;
        self.open_now -= 1;
        if self.lifetimes.len() < MAX_LIFETIMES {
            self.lifetimes.push(lifetime_ns);
        }
        self.bytes_in += bytes_in;
        self.bytes_out += bytes_out;
    }

    /// Adds a later slice's figures.
    pub fn merge(&mut self, o: &DestAgg) {
        self.protocol = self.protocol.or(o.protocol);
        self.round_trips.merge(&o.round_trips);
        for (k, v) in &o.by_route {
            *self.by_route.entry(k.clone()).or_default() += v;
        }
        self.opened += o.opened;
        self.closed += o.closed;
        self.open_now = o.open_now;
        self.open_max = self.open_max.max(o.open_max);
        let room = MAX_LIFETIMES.saturating_sub(self.lifetimes.len());
        self.lifetimes.extend(o.lifetimes.iter().take(room));
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.failures += o.failures;
        for (k, v) in &o.failure_reasons {
            *self.failure_reasons.entry(k).or_default() += v;
        }
        self.connects.merge(&o.connects);
        self.pool.merge(&o.pool);
    }
}

/// One destination of a process, in requests.json.
#[derive(Clone, Debug, Serialize)]
pub struct Destination {
    /// Address.
    pub address: String,
    /// Port.
    pub port: u16,
    /// `http`, `redis`, `postgresql`, `mysql`, `tls`, ... or `tcp`.
    pub protocol: String,
    /// Round trips: a write and the first bytes of its answer.
    pub round_trips: u64,
    /// Per second over the capture.
    pub round_trips_per_s: f64,
    /// Per inbound request the process answered (null without requests).
    pub round_trips_per_request: Option<f64>,
    /// Their durations.
    pub round_trip_ms: DurationMs,
    /// Connections opened.
    pub connections_opened: u64,
    /// Per second.
    pub connections_opened_per_s: f64,
    /// Connections closed.
    pub connections_closed: u64,
    /// Per second.
    pub connections_closed_per_s: f64,
    /// Most open at once (the pool in use).
    pub connections_max: i64,
    /// Median lifetime of the closed ones, ms.
    pub lifetime_ms_median: Option<f64>,
    /// Bytes read and written on the closed connections.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// How busy its connections were ([`PoolTime`]): the share of the
    /// time from the first round trip to the last when every connection
    /// open had one in flight, and the mean of inbound requests in
    /// progress beyond them then (null without round trips).
    pub pool: Option<PoolShare>,
    /// Handshakes: SYN sent to established (null when none was seen).
    pub connect_ms: Option<DurationMs>,
    /// Connects that failed and connections that ended in an error.
    pub failures: u64,
    /// Them by reason: `refused`, `timed_out`, `reset`, `unreachable`,
    /// `abandoned` (closed by the process before its handshake ended),
    /// `no_local_port`, `failed`.
    pub failures_by_reason: BTreeMap<&'static str, u64>,
}

/// A destination's [`PoolTime`] as shares.
#[derive(Clone, Debug, Serialize)]
pub struct PoolShare {
    /// Connections open at once, on average while round trips were made
    /// (the pool in use; `connections_max` is the most).
    pub connections_mean: f64,
    /// Share of the time all its connections were busy.
    pub all_busy_share: f64,
    /// Inbound requests in progress beyond the connections busy, on
    /// average while they all were (waiting for one, as far as the kernel
    /// can tell).
    pub waiting_requests_mean: f64,
}

/// The destination's entry, with the process's `requests` answered.
pub fn destination(dest: &Dest, a: &DestAgg, requests: u64, duration_s: f64) -> Destination {
    let per_s = |n: u64| n as f64 / duration_s.max(1e-9);
    let mut l = a.lifetimes.clone();
    l.sort_unstable();
    Destination {
        address: dest.0.to_string(),
        port: dest.1,
        protocol: a
            .protocol
            .unwrap_or_else(|| protocol(&[], dest.1))
            .to_string(),
        round_trips: a.round_trips.requests,
        round_trips_per_s: per_s(a.round_trips.requests),
        round_trips_per_request: (requests > 0)
            .then(|| a.round_trips.requests as f64 / requests as f64),
        round_trip_ms: DurationMs::of(&a.round_trips),
        connections_opened: a.opened,
        connections_opened_per_s: per_s(a.opened),
        connections_closed: a.closed,
        connections_closed_per_s: per_s(a.closed),
        connections_max: a.open_max,
        lifetime_ms_median: l
            .get(l.len().saturating_sub(1) / 2)
            .map(|ns| *ns as f64 / 1e6),
        bytes_in: a.bytes_in,
        bytes_out: a.bytes_out,
        pool: (a.pool.span_ns > 0).then(|| PoolShare {
            connections_mean: a.pool.open_ns as f64 / a.pool.span_ns as f64,
            all_busy_share: a.pool.all_busy_ns as f64 / a.pool.span_ns as f64,
            waiting_requests_mean: a.pool.waiting_ns as f64 / a.pool.all_busy_ns.max(1) as f64,
        }),
        connect_ms: (a.connects.requests > 0).then(|| DurationMs::of(&a.connects)),
        failures: a.failures,
        failures_by_reason: a.failure_reasons.clone(),
    }
}

/// A listening TCP socket with connections waiting to be accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitingListener {
    /// Local address and port.
    pub addr: Dest,
    /// Connections waiting in its accept queue (`sk_ack_backlog`).
    pub queue: u64,
    /// The socket's inode (to find its owner).
    pub inode: u64,
}

/// Parses /proc/net/tcp or tcp6: the listening sockets (state 0A) with
/// connections waiting to be accepted (for a listener the kernel prints
/// its accept queue's length as rx_queue; its backlog is not there).
pub fn waiting_listeners(text: &str) -> Vec<WaitingListener> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "0A" {
            continue;
        }
        let Some(queue) = f[4]
            .split_once(':')
            .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
        else {
            continue;
        };
        if queue == 0 {
            continue;
        }
        let Some((addr, port)) = f[1].split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port, 16) else {
            continue;
        };
        let ip = match addr.len() {
            8 => u32::from_str_radix(addr, 16)
                .ok()
                .map(|v| IpAddr::from(v.to_le_bytes())),
            32 => {
                let mut b = [0u8; 16];
                let mut ok = true;
                for (i, chunk) in b.chunks_mut(4).enumerate() {
                    match u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16) {
                        Ok(v) => chunk.copy_from_slice(&v.to_le_bytes()),
                        Err(_) => ok = false,
                    }
                }
                ok.then(|| IpAddr::from(b))
            }
            _ => None,
        };
        let Some(ip) = ip else { continue };
        out.push(WaitingListener {
            addr: (ip, port),
            queue,
            inode: f[9].parse().unwrap_or(0),
        });
    }
    out.sort_by_key(|l| std::cmp::Reverse(l.queue));
    out
}

/// The process holding socket `inode`, by its descriptors.
pub fn socket_owner(inode: u64) -> Option<u32> {
    let want = format!("socket:[{inode}]");
    for e in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two connections; round trips [0,10) and [5,20) on them, one
    /// [30,40); four inbound requests over [0,20): both busy over [5,10)
    /// with 4 in progress (2 waiting), and not after.
    #[test]
    fn pool_time_sweeps_busy_connections_and_waiting_requests() {
        let mut dest = vec![
            (0, 0, 1),
            (0, 0, 1),
            (0, 1, 0),
            (10, -1, 0),
            (5, 1, 0),
            (20, -1, 0),
            (30, 1, 0),
            (40, -1, 0),
        ];
        let inbound = [(0, 4), (20, -4)];
        let p = pool_time(&mut dest, &inbound, 0);
        assert_eq!(
            p,
            PoolTime {
                span_ns: 40,
                all_busy_ns: 5,
                waiting_ns: 10,
                open_ns: 80,
            }
        );
        // One connection open before: the same round trips on it alone
        // keep it busy over [0,20) and [30,40).
        let mut one = vec![
            (0, 1, 0),
            (10, -1, 0),
            (10, 1, 0),
            (20, -1, 0),
            (30, 1, 0),
            (40, -1, 0),
        ];
        let p = pool_time(&mut one, &inbound, 1);
        assert_eq!(p.all_busy_ns, 30);
        assert_eq!(p.waiting_ns, 3 * 20);
        assert_eq!(pool_time(&mut [], &inbound, 1), PoolTime::default());
    }

    #[test]
    fn sockaddrs_and_protocols() {
        let mut v4 = [0u8; 28];
        v4[..2].copy_from_slice(&2u16.to_ne_bytes());
        v4[2..4].copy_from_slice(&6379u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[10, 0, 3, 7]);
        assert_eq!(
            parse_sockaddr(&v4),
            Some(("10.0.3.7".parse().unwrap(), 6379))
        );
        assert_eq!(protocol(b"*3\r\n$3\r\nSET\r\n", 7000), "redis");
        assert_eq!(protocol(b"GET / HTTP/1.1\r\n", 9000), "http");
        assert_eq!(
            protocol(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f], 1),
            "postgresql"
        );
        assert_eq!(protocol(b"", 5432), "postgresql");
        assert_eq!(protocol(b"hello", 4000), "tcp");
    }

    #[test]
    fn waiting_listeners_from_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000002 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n\
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17 1 0 100 0 0 10 0\n\
   2: 0100007F:1F91 0100007F:9C40 01 00000000:00000005 00:00000000 00000000     0        0 18 1 0 100 0 0 10 0\n";
        assert_eq!(
            waiting_listeners(text),
            [WaitingListener {
                addr: ("127.0.0.1".parse().unwrap(), 8080),
                queue: 2,
                inode: 4242
            }]
        );
    }
}
