//! Requests, loader side: the syscall tracepoints of accept, read,
//! write and close (their layouts checked against tracefs), and the
//! events of the ring paired into requests (HTTP/1.x parsed here) and
//! aggregated per process and route. Kernel side:
//! `profiler-ebpf/src/requests.rs`; shared types:
//! `profiler_common::requests`.

use super::kernel::Closing;
use std::collections::HashMap;

use aya::Ebpf;
use profiler_common::requests::{
    self, EVENT_CLOSE, EVENT_CONN_ERROR, EVENT_CONNECT, EVENT_CONNECT_FAILED, EVENT_ESTABLISHED,
    EVENT_FIRST_WRITE, EVENT_REQUEST, EVENT_RESPONSE, EVENT_ROUND_TRIP, FLAG_PEER_CLOSED,
    ROLE_OUTBOUND, ReqEvent,
};

use super::{
    CaptureError, Setup, Signal,
    kernel::{Ring, Tracepoints, drain_ring, take_ring},
};
use crate::{
    model::{RawProfile, Second, TimedRequest},
    procs::ProcessTable,
    requests::{
        downstream::{self, Dest, DestAgg, PoolEvent, PoolTime, pool_time},
        http::{self, RouteAgg, RouteKey},
    },
    tracefs::Format,
};

const REQUESTS: &str = "requests";
/// The part of it that times outbound handshakes and tells failures.
const CONNECTS: &str = "requests: connect latency and failures";

/// Fields of `sock:inet_sock_set_state` read by `req_sock_state`, at
/// the offsets it reads them.
const STATE_FIELDS: [(&str, u32); 8] = [
    ("skaddr", 8),
    ("oldstate", 16),
    ("newstate", 20),
    ("dport", 26),
    ("family", 28),
    ("protocol", 30),
    ("daddr", 36),
    ("daddr_v6", 56),
];
/// Requests waiting for their response, at most.
const MAX_PENDING: usize = 65_536;
/// Most requests kept one by one per window (24 bytes each); the
/// per-route figures count them all.
const MAX_TIMED_REQUESTS: usize = 1_000_000;

/// A request: process, fd, the connection's accept time, its start.
type RequestId = (u32, u32, u64, u64);

/// The requests signal.
#[derive(Default)]
pub struct Requests {
    on: bool,
    tracepoints: Tracepoints,
    ring: Option<Ring>,
    /// (tgid, fd, accepted, request start) -> (method, path) of requests
    /// whose response has not started.
    pending: HashMap<RequestId, http::Head>,
    /// Per process, exchanges on TLS connections it accepted (a read and
    /// the write answering it).
    tls: HashMap<u32, RouteAgg>,
    /// HTTP responses and 5xx responses since the last second.
    recent: (u64, u64),
    /// Requests one by one since the last window, bounded.
    timed: Vec<TimedRequest>,
    /// Route -> index in `route_names`.
    route_ids: HashMap<RouteKey, u32>,
    route_names: Vec<RouteKey>,
    routes: HashMap<RouteKey, RouteAgg>,
    /// Responses whose request was not seen whole, and requests that were
    /// not HTTP/1.x.
    unparsed: u64,
    /// Outbound connections open: (tgid, fd, opened) -> destination.
    outbound: HashMap<(u32, u32, u64), Dest>,
    dests: HashMap<(u32, Dest), DestAgg>,
    /// Whether `sock:inet_sock_set_state` is followed.
    sock_states: bool,
    /// Each destination's round trips and connections over time, and
    /// each process's inbound requests: how busy a pool was.
    timelines: Timelines,
    /// Per process, how long its accepted connections had been idle
    /// since their last response when it closed them itself (ns).
    idle_closes: HashMap<u32, Vec<u64>>,
}

/// Timeline events kept per slice, at most (16 bytes each).
const MAX_TIMELINE: usize = 1 << 20;

/// What [`pool_time`] sweeps, for one slice.
#[derive(Default)]
struct Timelines {
    dests: HashMap<(u32, Dest), Vec<PoolEvent>>,
    inbound: HashMap<u32, Vec<(u64, i32)>>,
    /// Connections open to each destination when the slice began.
    open_at_start: HashMap<(u32, Dest), i64>,
    len: usize,
}

impl Timelines {
    fn dest(&mut self, key: (u32, Dest), e: PoolEvent) {
        if self.len < MAX_TIMELINE {
            self.len += 1;
            self.dests.entry(key).or_default().push(e);
        }
    }

    fn inbound(&mut self, tgid: u32, t: u64, delta: i32) {
        if self.len < MAX_TIMELINE {
            self.len += 1;
            self.inbound.entry(tgid).or_default().push((t, delta));
        }
    }

    /// A destination's figures over the slice.
    fn pool(&mut self, key: (u32, Dest)) -> PoolTime {
        let open = self.open_at_start.get(&key).copied().unwrap_or(0);
        let inbound = self.inbound.get(&key.0).map_or(&[][..], |v| v.as_slice());
        match self.dests.get_mut(&key) {
            Some(d) => pool_time(d, inbound, open),
            None => PoolTime::default(),
        }
    }
}

/// Idle closes kept per process.
const MAX_IDLE_CLOSES: usize = 10_000;

/// Most outbound connections remembered open, and destinations kept.
const MAX_OUTBOUND: usize = 65_536;

/// Every tracepoint used, with the offset its first field must have:
/// syscall arguments from 16 (`unsigned long` each), `ret` at 16.
const POINTS: [(&str, &str); 11] = [
    ("sys_enter_connect", "fd"),
    ("sys_exit_connect", "ret"),
    ("sys_exit_accept", "ret"),
    ("sys_exit_accept4", "ret"),
    ("sys_enter_read", "fd"),
    ("sys_exit_read", "ret"),
    ("sys_enter_recvfrom", "fd"),
    ("sys_exit_recvfrom", "ret"),
    ("sys_enter_write", "fd"),
    ("sys_enter_sendto", "fd"),
    ("sys_enter_writev", "fd"),
];

impl Signal for Requests {
    fn configure(&mut self, setup: &mut Setup<'_>) {
        self.on = setup.cfg.requests;
        if !self.on {
            setup.sizes.push((requests::CONNS, 1));
            setup.sizes.push((requests::PENDING_READS, 1));
            setup.sizes.push((requests::REQ_EVENTS, 4096));
            setup.sizes.push((requests::OUT_SOCKS, 1));
            return;
        }
        for (point, field) in POINTS.iter().chain(&[("sys_enter_close", "fd")]) {
            match Format::read("syscalls", point) {
                Ok(f) if f.offset_or_none(field) == 16 => {}
                Ok(_) => {
                    setup.unavailable(
                        REQUESTS,
                        format!("syscalls:{point} has {field} elsewhere than at offset 16: a layout this profiler does not know"),
                    );
                    self.on = false;
                    return;
                }
                Err(e) => {
                    setup.unavailable(
                        REQUESTS,
                        format!("{e} (syscall tracepoints need a kernel built with CONFIG_FTRACE_SYSCALLS)"),
                    );
                    self.on = false;
                    return;
                }
            }
        }
        setup.config.requests = 1;
        self.sock_states = match Format::read("sock", "inet_sock_set_state") {
            Ok(f) => match STATE_FIELDS
                .iter()
                .find(|(name, at)| f.offset_or_none(name) != *at)
            {
                None => true,
                Some((name, _)) => {
                    setup.unavailable(
                        CONNECTS,
                        format!("sock:inet_sock_set_state has {name} elsewhere than this profiler reads it"),
                    );
                    false
                }
            },
            Err(e) => {
                setup.unavailable(CONNECTS, e);
                false
            }
        };
        if self.sock_states {
            setup.config.sock_states = 1;
            // Why a handshake failed: the socket's error, if BTF says
            // where it is (else failures are counted without a reason).
            if let Ok(btf) = setup.btf
                && let Some((off, _)) = crate::kbtf::member_offset(btf, "sock", "sk_err")
            {
                setup.config.sk_err = off;
            }
        } else {
            setup.sizes.push((requests::OUT_SOCKS, 1));
        }
    }

    fn attach(&mut self, ebpf: &mut Ebpf, setup: &mut Setup<'_>) -> Result<(), CaptureError> {
        if !self.on {
            return Ok(());
        }
        self.ring = Some(take_ring(ebpf, requests::REQ_EVENTS)?);
        let sets: [(profiler_common::ProgDef, &[&str]); 8] = [
            (requests::PROG_CONNECT_ENTER, &["sys_enter_connect"]),
            (requests::PROG_CONNECT_EXIT, &["sys_exit_connect"]),
            (
                requests::PROG_ACCEPT,
                &["sys_exit_accept", "sys_exit_accept4"],
            ),
            (
                requests::PROG_READ_ENTER,
                &["sys_enter_read", "sys_enter_recvfrom"],
            ),
            (
                requests::PROG_READ_EXIT,
                &["sys_exit_read", "sys_exit_recvfrom"],
            ),
            (
                requests::PROG_WRITE,
                &["sys_enter_write", "sys_enter_sendto"],
            ),
            (requests::PROG_WRITEV, &["sys_enter_writev"]),
            (requests::PROG_CLOSE, &["sys_enter_close"]),
        ];
        for (prog, names) in sets {
            let points: Vec<(&str, &str)> = names.iter().map(|n| ("syscalls", *n)).collect();
            if !self
                .tracepoints
                .attach(ebpf, setup, REQUESTS, prog, &points, &[])?
            {
                self.on = false;
                break;
            }
        }
        if self.on
            && self.sock_states
            && !self.tracepoints.attach(
                ebpf,
                setup,
                CONNECTS,
                requests::PROG_SOCK_STATE,
                &[("sock", "inet_sock_set_state")],
                &[],
            )?
        {
            self.sock_states = false;
        }
        Ok(())
    }

    fn rings(&self) -> Vec<&Ring> {
        self.ring.iter().collect()
    }

    /// Its records are sent without wakeups.
    fn polled(&self) -> bool {
        self.ring.is_some()
    }

    fn second(&mut self, row: &mut Second) {
        (row.requests, row.errors) = std::mem::take(&mut self.recent);
    }

    fn drain(&mut self, _procs: &mut ProcessTable) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let (pending, routes, unparsed) = (&mut self.pending, &mut self.routes, &mut self.unparsed);
        let (outbound, dests) = (&mut self.outbound, &mut self.dests);
        let idle_closes = &mut self.idle_closes;
        let timelines = &mut self.timelines;
        let tls = &mut self.tls;
        let recent = &mut self.recent;
        let (timed, route_ids, route_names) =
            (&mut self.timed, &mut self.route_ids, &mut self.route_names);
        drain_ring(ring, |e: ReqEvent| {
            let head = &e.head[..(e.len as usize).min(e.head.len())];
            let conn = (e.tgid, e.fd, e.accepted_ns, e.request_ns);
            let out_key = (e.tgid, e.fd, e.accepted_ns);
            let room = dests.len() < MAX_OUTBOUND;
            match e.kind {
                EVENT_CONNECT => {
                    if let Some(dest) = downstream::parse_sockaddr(&e.head)
                        && outbound.len() < MAX_OUTBOUND
                        && (room || dests.contains_key(&(e.tgid, dest)))
                    {
                        outbound.insert(out_key, dest);
                        timelines.dest((e.tgid, dest), (e.time_ns, 0, 1));
                        let d = dests.entry((e.tgid, dest)).or_default();
                        d.opened += 1;
                        d.open_now += 1;
                        d.open_max = d.open_max.max(d.open_now);
                    }
                }
                EVENT_CONNECT_FAILED | EVENT_CONN_ERROR => {
                    if let Some(dest) = downstream::parse_sockaddr(&e.head)
                        && (room || dests.contains_key(&(e.tgid, dest)))
                    {
                        let d = dests.entry((e.tgid, dest)).or_default();
                        d.failed(downstream::failure_reason(e.kind, e.len));
                        // A non-blocking connect counted as opened when
                        // connect(2) returned: it never was.
                        if e.kind == EVENT_CONNECT_FAILED && outbound.remove(&out_key).is_some() {
                            d.opened = d.opened.saturating_sub(1);
                            d.open_now -= 1;
                            timelines.dest((e.tgid, dest), (e.time_ns, 0, -1));
                        }
                    }
                }
                EVENT_ESTABLISHED => {
                    if let Some(dest) = downstream::parse_sockaddr(&e.head)
                        && (room || dests.contains_key(&(e.tgid, dest)))
                    {
                        dests
                            .entry((e.tgid, dest))
                            .or_default()
                            .connected(e.time_ns.saturating_sub(e.request_ns));
                    }
                }
                EVENT_FIRST_WRITE => {
                    if let Some(dest) = outbound.get(&out_key)
                        && let Some(d) = dests.get_mut(&(e.tgid, *dest))
                        && d.protocol.is_none()
                    {
                        d.protocol = Some(downstream::protocol(head, dest.1));
                    }
                }
                EVENT_ROUND_TRIP => {
                    if let Some(dest) = outbound.get(&out_key)
                        && let Some(d) = dests.get_mut(&(e.tgid, *dest))
                    {
                        d.round_trip(e.time_ns.saturating_sub(e.request_ns));
                        timelines.dest((e.tgid, *dest), (e.request_ns, 1, 0));
                        timelines.dest((e.tgid, *dest), (e.time_ns, -1, 0));
                        // The inbound request it served, when only one
                        // of this process was in progress.
                        let mut serving = pending.iter().filter(|(k, _)| k.0 == e.tgid);
                        if let (Some((_, http::Head::Http(method, path))), None) =
                            (serving.next(), serving.next())
                        {
                            *d.by_route
                                .entry((method.clone(), http::normalize(path)))
                                .or_default() += 1;
                        }
                    }
                }
                EVENT_CLOSE if e.role == ROLE_OUTBOUND => {
                    if let Some(dest) = outbound.remove(&out_key)
                        && let Some(d) = dests.get_mut(&(e.tgid, dest))
                    {
                        timelines.dest((e.tgid, dest), (e.time_ns, 0, -1));
                        d.closed(
                            e.time_ns.saturating_sub(e.accepted_ns),
                            e.bytes_in,
                            e.bytes_out,
                        );
                    }
                }
                EVENT_REQUEST if pending.len() < MAX_PENDING => {
                    pending.insert(conn, http::classify(head));
                }
                EVENT_RESPONSE => match pending.remove(&conn).inspect(|_| {
                    timelines.inbound(e.tgid, e.request_ns, 1);
                    timelines.inbound(e.tgid, e.time_ns, -1);
                }) {
                    Some(http::Head::Tls) => {
                        tls.entry(e.tgid)
                            .or_default()
                            .time(e.time_ns.saturating_sub(e.request_ns));
                    }
                    Some(http::Head::Http(method, path)) => match http::parse_status(head) {
                        Some(status) => {
                            recent.0 += 1;
                            recent.1 += u64::from(status >= 500);
                            let duration = e.time_ns.saturating_sub(e.request_ns);
                            let key = http::add(routes, e.tgid, &method, &path, status, duration);
                            if timed.len() < MAX_TIMED_REQUESTS {
                                let route = match route_ids.get(&key) {
                                    Some(&id) => id,
                                    None => {
                                        let id = route_names.len() as u32;
                                        route_names.push(key.clone());
                                        route_ids.insert(key, id);
                                        id
                                    }
                                };
                                timed.push(TimedRequest {
                                    time_ns: e.time_ns,
                                    route,
                                    duration_us: u32::try_from(duration / 1000).unwrap_or(u32::MAX),
                                    status,
                                });
                            }
                        }
                        None => *unparsed += 1,
                    },
                    _ => *unparsed += 1,
                },
                EVENT_CLOSE => {
                    // The server closed a connection that had answered,
                    // the client had not: its keep-alive timeout.
                    if e.flags & FLAG_PEER_CLOSED == 0 && e.request_ns != 0 {
                        let v = idle_closes.entry(e.tgid).or_default();
                        if v.len() < MAX_IDLE_CLOSES {
                            v.push(e.time_ns.saturating_sub(e.request_ns));
                        }
                    }
                    pending.retain(|k, _| (k.0, k.1, k.2) != (e.tgid, e.fd, e.accepted_ns));
                }
                _ => {}
            }
        });
    }

    fn collect(
        &mut self,
        _ebpf: &mut Ebpf,
        out: &mut RawProfile,
        drain: bool,
    ) -> Result<(), CaptureError> {
        if self.ring.is_none() {
            return Ok(());
        }
        out.requests_on = true;
        out.requests_unparsed += self.unparsed;
        out.request_times.append(&mut self.timed);
        out.request_routes = self.route_names.clone();
        for (pid, v) in &self.idle_closes {
            out.idle_closes.push((*pid, v.clone()));
        }
        if drain {
            // The requests handed over, their routes can be numbered
            // afresh.
            self.route_ids.clear();
            self.route_names.clear();
            self.idle_closes.clear();
            out.routes.extend(self.routes.drain());
            out.tls.extend(self.tls.drain());
            self.unparsed = 0;
            // Destinations with connections open stay, their figures
            // start over.
            let mut timelines = std::mem::take(&mut self.timelines);
            for (k, v) in self.dests.iter_mut() {
                let mut d = v.clone();
                d.pool = timelines.pool(*k);
                out.destinations.push((*k, d));
                let open = v.open_now;
                *v = DestAgg {
                    protocol: v.protocol,
                    open_now: open,
                    open_max: open,
                    ..Default::default()
                };
                self.timelines.open_at_start.insert(*k, open);
            }
            self.dests.retain(|_, v| v.open_now > 0);
        } else {
            out.routes
                .extend(self.routes.iter().map(|(k, v)| (k.clone(), v.clone())));
            out.tls
                .extend(self.tls.iter().map(|(k, v)| (*k, v.clone())));
            for (k, v) in &self.dests {
                let mut d = v.clone();
                d.pool = self.timelines.pool(*k);
                out.destinations.push((*k, d));
            }
        }
        Ok(())
    }

    fn forget(&mut self, gone: &[u32]) {
        self.pending.retain(|k, _| !gone.contains(&k.0));
        self.timelines.inbound.retain(|k, _| !gone.contains(k));
        self.outbound.retain(|k, _| !gone.contains(&k.0));
    }

    fn detach(&mut self, ebpf: &mut Ebpf, closing: &mut Closing) -> Vec<CaptureError> {
        self.tracepoints.detach(ebpf, closing)
    }
}
