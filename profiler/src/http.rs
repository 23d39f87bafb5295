//! HTTP/1.x as the kernel saw it: request lines and status codes parsed
//! from the first bytes of each request and response, routes normalized
//! (`/users/123` and `/users/456` are `/users/:id`), per process and
//! route: requests, 4xx, 5xx and a duration histogram; and
//! `requests.json` and the printed RED block made of them.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::{
    containers::{Attributor, group_of},
    procs::ProcessTable,
    symbolize::process_name,
};

/// Distinct routes kept per process; the rest are `other`.
pub const MAX_ROUTES_PER_PROCESS: usize = 100;

const METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
];

/// The method and path (query dropped) of a request's first bytes, or
/// None when they are not an HTTP/1.x request line.
pub fn parse_request(head: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(head).ok().or_else(|| {
        std::str::from_utf8(&head[..head.iter().rposition(|b| b.is_ascii()).map_or(0, |i| i + 1)])
            .ok()
    })?;
    let (method, rest) = text.split_once(' ')?;
    if !METHODS.contains(&method) {
        return None;
    }
    let target = rest.split([' ', '\r', '\n']).next()?;
    // A request line cut at the bytes read: its path as far as it goes.
    let complete = rest.contains(" HTTP/1.");
    let path = target.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') && path != "*" {
        return None;
    }
    let mut path = path.to_string();
    if !complete && !rest.contains(' ') && !target.contains('?') {
        path.push('…');
    }
    Some((method.to_string(), path))
}

/// The status code of a response's first bytes (`HTTP/1.1 200 OK`).
pub fn parse_status(head: &[u8]) -> Option<u16> {
    let rest = head.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// A path as a route: numeric, UUID and long hex segments become `:id`,
/// `:uuid`, `:hex`.
pub fn normalize(path: &str) -> String {
    let seg = |s: &str| -> String {
        let hex = |c: char| c.is_ascii_hexdigit();
        if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
            ":id".into()
        } else if s.len() == 36
            && s.char_indices().all(|(i, c)| {
                if [8, 13, 18, 23].contains(&i) {
                    c == '-'
                } else {
                    hex(c)
                }
            })
        {
            ":uuid".into()
        } else if s.len() >= 16 && s.chars().all(hex) {
            ":hex".into()
        } else {
            s.to_string()
        }
    };
    path.split('/').map(seg).collect::<Vec<_>>().join("/")
}

/// Sub-buckets per power of two of the duration histogram (6% wide).
const SUB: u64 = 16;
/// Buckets: exact microseconds below 16, then 16 per power of two up to
/// 2^32 us.
pub const SLOTS: usize = 480;

/// The duration histogram's bucket of `us` microseconds.
pub fn slot_of(us: u64) -> usize {
    if us < SUB {
        return us as usize;
    }
    let log = 63 - us.leading_zeros() as u64;
    let sub = (us >> (log - 4)) & (SUB - 1);
    (((log - 3) * SUB + sub) as usize).min(SLOTS - 1)
}

/// Upper bound (exclusive, us) of bucket `slot`.
pub fn slot_upper_us(slot: usize) -> u64 {
    let slot = slot as u64;
    if slot < SUB {
        return slot + 1;
    }
    let log = slot / SUB + 3;
    (SUB + slot % SUB + 1) << (log - 4)
}

/// Process, method, route.
pub type RouteKey = (u32, String, String);

/// One route's requests.
#[derive(Clone, Debug, Default)]
pub struct RouteAgg {
    /// Requests.
    pub requests: u64,
    /// Of which 4xx.
    pub errors_4xx: u64,
    /// Of which 5xx.
    pub errors_5xx: u64,
    /// Of which 3xx.
    pub redirects: u64,
    /// Durations, [`slot_of`] buckets of microseconds.
    pub hist: Vec<u64>,
    /// Longest, ns.
    pub max_ns: u64,
    /// Sum, ns.
    pub total_ns: u64,
}

impl RouteAgg {
    /// Adds another's requests.
    pub fn merge(&mut self, o: &RouteAgg) {
        self.requests += o.requests;
        self.errors_4xx += o.errors_4xx;
        self.errors_5xx += o.errors_5xx;
        self.redirects += o.redirects;
        if self.hist.len() < o.hist.len() {
            self.hist.resize(o.hist.len(), 0);
        }
        for (a, b) in self.hist.iter_mut().zip(&o.hist) {
            *a += b;
        }
        self.max_ns = self.max_ns.max(o.max_ns);
        self.total_ns += o.total_ns;
    }
}

/// Counts one request of `tgid` (routes past the bound are `other`).
pub fn add(
    routes: &mut HashMap<RouteKey, RouteAgg>,
    tgid: u32,
    method: &str,
    path: &str,
    status: u16,
    duration_ns: u64,
) {
    let mut key = (tgid, method.to_string(), normalize(path));
    if !routes.contains_key(&key)
        && routes.keys().filter(|k| k.0 == tgid).count() >= MAX_ROUTES_PER_PROCESS
    {
        key.2 = "other".into();
    }
    let r = routes.entry(key).or_default();
    if r.hist.is_empty() {
        r.hist = vec![0; SLOTS];
    }
    r.requests += 1;
    match status {
        400..=499 => r.errors_4xx += 1,
        500..=599 => r.errors_5xx += 1,
        300..=399 => r.redirects += 1,
        _ => {}
    }
    r.hist[slot_of(duration_ns / 1000)] += 1;
    r.max_ns = r.max_ns.max(duration_ns);
    r.total_ns += duration_ns;
}

/// A histogram bucket.
#[derive(Clone, Debug, Serialize)]
pub struct Bucket {
    /// Upper bound, ms.
    pub le_ms: f64,
    /// Requests.
    pub count: u64,
}

/// Durations, ms.
#[derive(Clone, Debug, Serialize)]
pub struct DurationMs {
    /// Median, interpolated within its bucket (buckets 6% wide), at most
    /// `max`.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Longest, exact.
    pub max: f64,
    /// Mean, exact.
    pub mean: f64,
    /// Non-empty buckets.
    pub histogram: Vec<Bucket>,
}

fn quantile_ms(hist: &[u64], q: f64, max_ms: f64) -> f64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let target = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, &c) in hist.iter().enumerate() {
        seen += c;
        if seen >= target {
            // Linear within the bucket: its lower bound plus the share of
            // its width the quantile reaches into it.
            let lo = if i == 0 { 0 } else { slot_upper_us(i - 1) } as f64;
            let hi = slot_upper_us(i) as f64;
            let into = (target - (seen - c)) as f64 / c as f64;
            return ((lo + (hi - lo) * into) / 1000.0).min(max_ms);
        }
    }
    max_ms
}

impl DurationMs {
    /// Of a route's (or destination's) histogram.
    pub fn of(r: &RouteAgg) -> Self {
        let max = r.max_ns as f64 / 1e6;
        DurationMs {
            p50: quantile_ms(&r.hist, 0.50, max),
            p90: quantile_ms(&r.hist, 0.90, max),
            p99: quantile_ms(&r.hist, 0.99, max),
            max,
            mean: r.total_ns as f64 / 1e6 / r.requests.max(1) as f64,
            histogram: r
                .hist
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| Bucket {
                    le_ms: slot_upper_us(i) as f64 / 1000.0,
                    count: *c,
                })
                .collect(),
        }
    }
}

/// One route of a process.
#[derive(Clone, Debug, Serialize)]
pub struct Route {
    /// Method.
    pub method: String,
    /// Normalized path.
    pub route: String,
    /// Requests answered.
    pub requests: u64,
    /// Requests per second over the capture.
    pub rate_per_s: f64,
    /// 5xx answers.
    pub errors_5xx: u64,
    /// 4xx answers.
    pub errors_4xx: u64,
    /// Server-side duration: first byte of the request read to first byte
    /// of the response written.
    pub duration_ms: DurationMs,
}

/// One serving process.
#[derive(Clone, Debug, Serialize)]
pub struct Process {
    /// Process id.
    pub pid: u32,
    /// Name.
    pub comm: String,
    /// Container, or `host`.
    pub container: String,
    /// Requests answered, all routes.
    pub requests: u64,
    /// Its routes, most time spent first.
    pub routes: Vec<Route>,
    /// Where it connected to, most round trips first.
    pub destinations: Vec<crate::downstream::Destination>,
    /// Accepted connections it closed itself after answering on them,
    /// while the client kept them: its keep-alive timeout at work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_closes: Option<IdleCloses>,
}

/// A server's closes of idle keep-alive connections.
#[derive(Clone, Debug, Serialize)]
pub struct IdleCloses {
    /// How many.
    pub count: usize,
    /// Median idle time before the close, seconds.
    pub idle_s_median: f64,
}

/// An AWS ALB's idle timeout: a server closing idle connections sooner
/// makes the balancer send on a closing connection (a 502).
const LB_IDLE_S: f64 = 60.0;

/// Something the figures show, in words.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// `no_keepalive`, `n_plus_one`.
    pub kind: &'static str,
    /// The process.
    pub pid: u32,
    /// The route it is about (`METHOD /route`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The destination it is about (`address:port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// The figures that show it.
    pub figures: serde_json::Value,
    /// What it means and what to do.
    pub message: String,
}

/// A destination opening at least this many connections, one for every
/// two round trips or fewer, reuses none.
const NO_KEEPALIVE_MIN_CONNECTIONS: u64 = 10;
/// Round trips to one destination per request of a route, at least, that
/// are an N+1.
const N_PLUS_ONE_MIN: f64 = 10.0;
/// Requests of a route, at least, before N+1 is said.
const N_PLUS_ONE_MIN_REQUESTS: u64 = 5;

/// requests.json.
#[derive(Clone, Debug, Serialize)]
pub struct RequestsReport {
    /// Schema tag.
    pub schema: &'static str,
    /// Capture length, seconds.
    pub duration_s: f64,
    /// Serving and connecting processes, most requests first.
    pub processes: Vec<Process>,
    /// What the figures show, in words.
    pub findings: Vec<Finding>,
    /// Connections the host dropped because an accept queue was full
    /// (TcpExtListenOverflows over the capture).
    pub listen_overflows: i64,
    /// Responses whose request was not seen whole (the capture started
    /// mid-way) or was not HTTP/1.x (TLS, another protocol): not counted.
    pub unparsed: u64,
}

/// requests.json's schema tag.
pub const SCHEMA: &str = "profiler.requests/1";

/// Connections dropped at listen over the capture (TcpExt counters) and
/// the listeners with connections waiting at its end.
#[derive(Clone, Debug, Default)]
pub struct Listen {
    /// TcpExtListenOverflows over the capture: connections dropped
    /// because an accept queue was full.
    pub overflows: i64,
    /// TcpExtListenDrops over the capture (overflows and other drops).
    pub drops: i64,
    /// Listeners with connections waiting at the end, longest queue
    /// first.
    pub waiting: Vec<crate::downstream::WaitingListener>,
}

impl Listen {
    /// Reads the listeners of /proc/net/tcp and tcp6 now, with the
    /// counters' deltas.
    pub fn now(overflows: i64, drops: i64) -> Self {
        let mut waiting = Vec::new();
        for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(f) {
                waiting.extend(crate::downstream::waiting_listeners(&text));
            }
        }
        waiting.sort_by_key(|l| std::cmp::Reverse(l.queue));
        Listen {
            overflows,
            drops,
            waiting,
        }
    }
}

/// Builds requests.json from a capture's routes, destinations and idle
/// closes (those of `exclude` left out), and what was dropped at listen.
#[allow(clippy::too_many_arguments)]
pub fn report(
    routes: &[(RouteKey, RouteAgg)],
    listen: &Listen,
    idle_closes: &[(u32, Vec<u64>)],
    destinations: &[((u32, crate::downstream::Dest), crate::downstream::DestAgg)],
    unparsed: u64,
    duration_s: f64,
    procs: &ProcessTable,
    attributor: &mut Attributor,
    exclude: Option<u32>,
) -> RequestsReport {
    let mut by: BTreeMap<u32, HashMap<(String, String), RouteAgg>> = BTreeMap::new();
    for ((tgid, method, route), agg) in routes {
        if Some(*tgid) == exclude {
            continue;
        }
        by.entry(*tgid)
            .or_default()
            .entry((method.clone(), route.clone()))
            .or_default()
            .merge(agg);
    }
    let mut dests: BTreeMap<u32, HashMap<crate::downstream::Dest, crate::downstream::DestAgg>> =
        BTreeMap::new();
    for ((tgid, dest), agg) in destinations {
        if Some(*tgid) == exclude {
            continue;
        }
        by.entry(*tgid).or_default();
        dests
            .entry(*tgid)
            .or_default()
            .entry(*dest)
            .or_default()
            .merge(agg);
    }
    let mut findings = Vec::new();
    let mut processes: Vec<Process> = by
        .into_iter()
        .map(|(pid, rs)| {
            let route_requests: HashMap<(String, String), u64> =
                rs.iter().map(|(k, a)| (k.clone(), a.requests)).collect();
            let mut routes: Vec<(u64, Route)> = rs
                .into_iter()
                .map(|((method, route), a)| {
                    (
                        a.total_ns,
                        Route {
                            method,
                            route,
                            requests: a.requests,
                            rate_per_s: a.requests as f64 / duration_s.max(1e-9),
                            errors_5xx: a.errors_5xx,
                            errors_4xx: a.errors_4xx,
                            duration_ms: DurationMs::of(&a),
                        },
                    )
                })
                .collect();
            routes.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.route.cmp(&b.1.route)));
            let routes: Vec<Route> = routes.into_iter().map(|(_, r)| r).collect();
            let requests: u64 = routes.iter().map(|r| r.requests).sum();
            let mut destinations = Vec::new();
            for (dest, a) in dests.remove(&pid).unwrap_or_default() {
                let d = crate::downstream::destination(&dest, &a, requests);
                findings.extend(findings_of(pid, &d, &a, &route_requests));
                destinations.push(d);
            }
            destinations.sort_by(|a, b| {
                b.round_trips
                    .cmp(&a.round_trips)
                    .then(a.address.cmp(&b.address))
            });
            let mut idle: Vec<u64> = idle_closes
                .iter()
                .filter(|(p, _)| *p == pid)
                .flat_map(|(_, v)| v.iter().copied())
                .collect();
            idle.sort_unstable();
            let idle_closes = (!idle.is_empty()).then(|| IdleCloses {
                count: idle.len(),
                idle_s_median: idle[(idle.len() - 1) / 2] as f64 / 1e9,
            });
            if let Some(c) = &idle_closes
                && c.count >= 1
                && (0.5..LB_IDLE_S).contains(&c.idle_s_median)
            {
                findings.push(Finding {
                    kind: "keepalive_shorter_than_lb",
                    pid,
                    route: None,
                    destination: None,
                    figures: serde_json::json!({
                        "closes": c.count,
                        "idle_s_median": c.idle_s_median,
                        "lb_idle_s": LB_IDLE_S,
                    }),
                    message: format!(
                        "pid {pid} closes idle keep-alive connections after {:.1} s ({} closes); an AWS ALB keeps them {LB_IDLE_S:.0} s and may send a request as it closes: intermittent 502s. Keep them longer than the balancer (Node: server.keepAliveTimeout = 65000, headersTimeout above it)",
                        c.idle_s_median, c.count
                    ),
                });
            }
            Process {
                pid,
                comm: process_name(pid, "", procs),
                container: group_of(pid, procs, attributor),
                requests,
                routes,
                destinations,
                idle_closes,
            }
        })
        .collect();
    processes.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.pid.cmp(&b.pid)));
    if listen.overflows > 0 {
        let top = listen.waiting.first();
        let owner = top.and_then(|l| crate::downstream::socket_owner(l.inode));
        findings.push(Finding {
            kind: "listen_overflow",
            pid: owner.unwrap_or(0),
            route: None,
            destination: top.map(|l| format!("{}:{}", l.addr.0, l.addr.1)),
            figures: serde_json::json!({
                "overflows": listen.overflows,
                "listen_drops": listen.drops,
                "queue_at_end": top.map(|l| l.queue),
            }),
            message: match top {
                Some(l) => format!(
                    "{} connections dropped because an accept queue was full; at the end {} waited on {}:{}{}: accept faster (a blocked event loop does not accept) or raise the backlog (listen(fd, 511), net.core.somaxconn)",
                    listen.overflows,
                    l.queue,
                    l.addr.0,
                    l.addr.1,
                    owner.map(|p| format!(" (pid {p})")).unwrap_or_default()
                ),
                None => format!(
                    "{} connections dropped because an accept queue was full (TcpExtListenOverflows): a server did not accept fast enough (a blocked event loop does not accept) or its backlog is small (listen(fd, 511), net.core.somaxconn)",
                    listen.overflows
                ),
            },
        });
    }
    RequestsReport {
        schema: SCHEMA,
        duration_s,
        processes,
        findings,
        listen_overflows: listen.overflows,
        unparsed,
    }
}

/// What one destination of a process shows.
fn findings_of(
    pid: u32,
    d: &crate::downstream::Destination,
    a: &crate::downstream::DestAgg,
    route_requests: &HashMap<(String, String), u64>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let at = format!("{}:{}", d.address, d.port);
    if d.connections_opened >= NO_KEEPALIVE_MIN_CONNECTIONS
        && d.round_trips > 0
        && d.connections_opened * 2 >= d.round_trips
    {
        out.push(Finding {
            kind: "no_keepalive",
            pid,
            route: None,
            destination: Some(at.clone()),
            figures: serde_json::json!({
                "connections_opened": d.connections_opened,
                "round_trips": d.round_trips,
                "lifetime_ms_median": d.lifetime_ms_median,
            }),
            message: format!(
                "to {at} ({}): {} connections opened for {} round trips{}: reuse connections ({})",
                d.protocol,
                d.connections_opened,
                d.round_trips,
                d.lifetime_ms_median
                    .map(|l| format!("; median lifetime {l:.0} ms"))
                    .unwrap_or_default(),
                if d.protocol == "http" {
                    "an http.Agent with keepAlive: true"
                } else {
                    "a connection pool"
                }
            ),
        });
    }
    for ((method, route), n) in &a.by_route {
        let requests = route_requests
            .get(&(method.clone(), route.clone()))
            .copied()
            .unwrap_or(0);
        if requests < N_PLUS_ONE_MIN_REQUESTS {
            continue;
        }
        let per = *n as f64 / requests as f64;
        if per >= N_PLUS_ONE_MIN {
            out.push(Finding {
                kind: "n_plus_one",
                pid,
                route: Some(format!("{method} {route}")),
                destination: Some(at.clone()),
                figures: serde_json::json!({
                    "round_trips_per_request": per,
                    "requests": requests,
                    "round_trips": n,
                }),
                message: format!(
                    "{method} {route}: {per:.0} {} round trips per request to {at}: fetch in one (a query with IN (...), a pipeline, MGET)",
                    d.protocol
                ),
            });
        }
    }
    out
}

/// The printed RED block: the routes that took the most time.
pub fn render(r: &RequestsReport) -> String {
    let mut rows: Vec<(&Process, &Route)> = r
        .processes
        .iter()
        .flat_map(|p| p.routes.iter().map(move |x| (p, x)))
        .collect();
    let mut tail = String::new();
    for p in &r.processes {
        for d in p.destinations.iter().take(3) {
            tail.push_str(&format!(
                "  {} (pid {}) -> {}:{} ({}): {} round trips{}, p50 {:.1} ms, p99 {:.1} ms; {} connections opened, {} at most at once{}\n",
                p.comm,
                p.pid,
                d.address,
                d.port,
                d.protocol,
                d.round_trips,
                d.round_trips_per_request
                    .map(|x| format!(" ({x:.1} per request)"))
                    .unwrap_or_default(),
                d.round_trip_ms.p50,
                d.round_trip_ms.p99,
                d.connections_opened,
                d.connections_max,
                if d.failures > 0 {
                    format!(", {} failed", d.failures)
                } else {
                    String::new()
                }
            ));
        }
    }
    for f in &r.findings {
        tail.push_str(&format!(
            "  finding ({}, pid {}): {}\n",
            f.kind, f.pid, f.message
        ));
    }
    if rows.is_empty() {
        return if tail.is_empty() {
            String::new()
        } else {
            format!("Downstream\n{tail}")
        };
    }
    rows.sort_by(|a, b| {
        let t = |x: &Route| x.duration_ms.mean * x.requests as f64;
        t(b.1).total_cmp(&t(a.1))
    });
    let mut out = String::from("RED (HTTP/1.x requests served, by time spent)\n");
    for (p, x) in rows.iter().take(8) {
        let errors = x.errors_5xx + x.errors_4xx;
        out.push_str(&format!(
            "  {} (pid {}) {} {}: {:.1} req/s, {:.1}% errors ({} 5xx, {} 4xx), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
            p.comm,
            p.pid,
            x.method,
            x.route,
            x.rate_per_s,
            100.0 * errors as f64 / x.requests.max(1) as f64,
            x.errors_5xx,
            x.errors_4xx,
            x.duration_ms.p50,
            x.duration_ms.p99,
            x.duration_ms.max
        ));
    }
    out.push_str(&tail);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_status_codes() {
        assert_eq!(
            parse_request(b"GET /users/12?x=1 HTTP/1.1\r\nHost: a\r\n"),
            Some(("GET".into(), "/users/12".into()))
        );
        assert_eq!(
            parse_request(b"POST /a HTTP/1.1\r\n"),
            Some(("POST".into(), "/a".into()))
        );
        assert_eq!(parse_request(b"\x16\x03\x01\x02\x00\x01"), None);
        assert_eq!(parse_request(b"*3\r\n$3\r\nSET\r\n"), None);
        assert_eq!(
            parse_request(b"GET /very/long/pa"),
            Some(("GET".into(), "/very/long/pa…".into()))
        );
        assert_eq!(
            parse_status(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status(b"HTTP/1.0 200 OK"), Some(200));
        assert_eq!(parse_status(b"{\"a\":1}"), None);
    }

    #[test]
    fn routes_are_normalized() {
        assert_eq!(normalize("/users/123"), "/users/:id");
        assert_eq!(
            normalize("/o/3f2504e0-4f89-11d3-9a0c-0305e82c3301/items"),
            "/o/:uuid/items"
        );
        assert_eq!(normalize("/blob/deadbeefdeadbeef42"), "/blob/:hex");
        assert_eq!(normalize("/docs/intro"), "/docs/intro");
    }

    #[test]
    fn routes_are_bounded_per_process() {
        let mut m = HashMap::new();
        for i in 0..(MAX_ROUTES_PER_PROCESS + 5) {
            add(&mut m, 7, "GET", &format!("/r{i}"), 200, 1000);
        }
        assert_eq!(m.len(), MAX_ROUTES_PER_PROCESS + 1);
        assert_eq!(m[&(7, "GET".into(), "other".into())].requests, 5);
    }

    #[test]
    fn buckets_are_a_sixteenth_octave_wide() {
        for us in [0u64, 1, 15, 16, 17, 31, 32, 33, 1000, 20_000, 123_456_789] {
            let s = slot_of(us);
            assert!(us < slot_upper_us(s), "{us} in {s}");
            assert!(s == 0 || us >= slot_upper_us(s - 1), "{us} in {s}");
        }
        assert_eq!(slot_of(u64::MAX), SLOTS - 1);
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let mut m = HashMap::new();
        for _ in 0..100 {
            add(&mut m, 1, "GET", "/", 200, 20_000_000);
        }
        let r = &m[&(1, "GET".into(), "/".into())];
        let d = DurationMs::of(r);
        assert!((d.p50 - 20.0).abs() <= 1.5 && d.p50 <= d.max, "{d:?}");
        assert_eq!(d.max, 20.0);
    }
}
