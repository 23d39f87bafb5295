//! Requests and connections as the kernel saw them, made into
//! `requests.json` and the printed RED block: [`http`] parses request
//! lines and status codes and keeps per-route duration histograms,
//! [`downstream`] keeps each process's outbound destinations, [`doctor`]
//! says what the figures mean.

pub mod doctor;
pub mod downstream;
pub mod http;
pub mod sockdiag;

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

pub use doctor::Finding;
use http::{DurationMs, RouteAgg};

use crate::{
    containers::{Attributor, group_of},
    model::RawProfile,
    procs::ProcessTable,
    symbolize::process_name,
};

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
    pub destinations: Vec<downstream::Destination>,
    /// Accepted connections it closed itself after answering on them,
    /// while the client kept them: its keep-alive timeout at work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_closes: Option<IdleCloses>,
    /// Exchanges on the TLS connections it accepted (absent when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

/// A server's TLS traffic: encrypted, so no method, route or status; a
/// read on an idle connection and the first write after it are one
/// exchange (the handshake's flights count too).
#[derive(Clone, Debug, Serialize)]
pub struct Tls {
    /// Exchanges.
    pub exchanges: u64,
    /// Per second.
    pub rate_per_s: f64,
    /// Their durations, read to the answer's first write.
    pub duration_ms: DurationMs,
    /// What this can and cannot say.
    pub note: &'static str,
}

/// [`Tls::note`].
const TLS_NOTE: &str = "encrypted in the process (TLS): no routes, status codes or errors; end TLS at the load balancer (plaintext inside the VPC) for RED per route";

/// A server's closes of idle keep-alive connections.
#[derive(Clone, Debug, Serialize)]
pub struct IdleCloses {
    /// How many.
    pub count: usize,
    /// Median idle time before the close, seconds.
    pub idle_s_median: f64,
}

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
    /// mid-way) or was neither HTTP/1.x nor TLS: not counted.
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
    pub waiting: Vec<downstream::WaitingListener>,
}

impl Listen {
    /// Reads the listeners with connections waiting now (from sock_diag,
    /// else /proc/net/tcp and tcp6), with the counters' deltas.
    pub fn now(overflows: i64, drops: i64) -> Self {
        let waiting = sockdiag::waiting_listeners().unwrap_or_else(|_| {
            let mut waiting = Vec::new();
            for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
                if let Ok(text) = std::fs::read_to_string(f) {
                    waiting.extend(downstream::waiting_listeners(&text));
                }
            }
            waiting.sort_by_key(|l| std::cmp::Reverse(l.queue));
            waiting
        });
        Listen {
            overflows,
            drops,
            waiting,
        }
    }
}

/// Builds requests.json from a capture's routes, TLS exchanges,
/// destinations and idle closes (those of `exclude` left out), and what
/// was dropped at listen.
pub fn report(
    raw: &RawProfile,
    listen: &Listen,
    duration_s: f64,
    procs: &ProcessTable,
    attributor: &mut Attributor,
    exclude: Option<u32>,
) -> RequestsReport {
    let (routes, idle_closes, destinations) = (&raw.routes, &raw.idle_closes, &raw.destinations);
    let mut tls: HashMap<u32, &RouteAgg> = HashMap::new();
    let mut by: BTreeMap<u32, HashMap<(String, String), RouteAgg>> = BTreeMap::new();
    for (tgid, agg) in &raw.tls {
        if Some(*tgid) != exclude {
            by.entry(*tgid).or_default();
            tls.insert(*tgid, agg);
        }
    }
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
    let mut dests: BTreeMap<u32, HashMap<downstream::Dest, downstream::DestAgg>> = BTreeMap::new();
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
                let d = downstream::destination(&dest, &a, requests, duration_s);
                findings.extend(doctor::destination(pid, &d, &a, &route_requests));
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
            if let Some(c) = &idle_closes {
                findings.extend(doctor::idle_closes(pid, c));
            }
            Process {
                pid,
                comm: process_name(pid, "", procs),
                container: group_of(pid, procs, attributor),
                requests,
                routes,
                destinations,
                idle_closes,
                tls: tls.get(&pid).map(|a| Tls {
                    exchanges: a.requests,
                    rate_per_s: a.requests as f64 / duration_s.max(1e-9),
                    duration_ms: DurationMs::of(a),
                    note: TLS_NOTE,
                }),
            }
        })
        .collect();
    processes.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.pid.cmp(&b.pid)));
    findings.extend(doctor::listen_overflow(listen));
    RequestsReport {
        schema: SCHEMA,
        duration_s,
        processes,
        findings,
        listen_overflows: listen.overflows,
        unparsed: raw.requests_unparsed,
    }
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
        if let Some(t) = &p.tls {
            tail.push_str(&format!(
                "  {} (pid {}) TLS: {:.1} exchanges/s, p50 {:.1} ms, p99 {:.1} ms ({})\n",
                p.comm, p.pid, t.rate_per_s, t.duration_ms.p50, t.duration_ms.p99, t.note
            ));
        }
        // The three with the most round trips, and any that failed.
        for (_, d) in p
            .destinations
            .iter()
            .enumerate()
            .filter(|(i, d)| *i < 3 || d.failures > 0)
        {
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
                d.connect_ms
                    .as_ref()
                    .map(|c| format!(", connect p50 {:.2} ms, max {:.2} ms", c.p50, c.max))
                    .unwrap_or_default()
                    + &if d.failures > 0 {
                        let reasons: Vec<String> = d
                            .failures_by_reason
                            .iter()
                            .map(|(k, v)| format!("{v} {k}"))
                            .collect();
                        format!(", {} failed ({})", d.failures, reasons.join(", "))
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
