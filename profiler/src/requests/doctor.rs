//! The doctor: what the request and connection figures mean, in words,
//! with the figures that show it (requests.json's `findings`).

use std::collections::HashMap;

use serde::Serialize;

use super::{IdleCloses, Listen, downstream};

/// An AWS ALB's idle timeout: a server closing idle connections sooner
/// makes the balancer send on a closing connection (a 502).
const LB_IDLE_S: f64 = 60.0;

/// Something the figures show, in words.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// `no_keepalive`, `n_plus_one`, `pool_saturated`,
    /// `keepalive_shorter_than_lb`, `listen_overflow`.
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
/// Round trips to a destination, at least, before its pool is judged.
const POOL_MIN_ROUND_TRIPS: u64 = 50;
/// Share of the time all its connections were busy, at least, for a pool
/// at its limit...
const POOL_ALL_BUSY_SHARE: f64 = 0.5;
/// ... while this many inbound requests more than connections busy were
/// in progress, on average.
const POOL_WAITING_MIN: f64 = 1.0;

/// A server closing idle keep-alive connections before a load balancer
/// would.
pub fn idle_closes(pid: u32, c: &IdleCloses) -> Option<Finding> {
    (c.count >= 1 && (0.5..LB_IDLE_S).contains(&c.idle_s_median)).then(|| Finding {
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
                })
}

/// Connections dropped at listen: the listener that had the longest
/// queue at the end, its owner.
pub fn listen_overflow(listen: &Listen) -> Option<Finding> {
    if listen.overflows <= 0 {
        return None;
    }
    let top = listen.waiting.first();
    let owner = top.and_then(|l| super::downstream::socket_owner(l.inode));
    Some(Finding {
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
    })
}

/// What one destination of a process shows.
pub fn destination(
    pid: u32,
    d: &downstream::Destination,
    a: &downstream::DestAgg,
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
    if let Some(p) = &d.pool
        && d.round_trips >= POOL_MIN_ROUND_TRIPS
        && p.all_busy_share >= POOL_ALL_BUSY_SHARE
        && p.waiting_requests_mean >= POOL_WAITING_MIN
    {
        out.push(Finding {
            kind: "pool_saturated",
            pid,
            route: None,
            destination: Some(at.clone()),
            figures: serde_json::json!({
                "connections_max": d.connections_max,
                "all_busy_share": p.all_busy_share,
                "waiting_requests_mean": p.waiting_requests_mean,
                "round_trips": d.round_trips,
                "round_trip_ms_p50": d.round_trip_ms.p50,
            }),
            message: format!(
                "to {at} ({}): all {} connections busy {:.0}% of the time, with {:.1} requests on average in progress beyond them, waiting for a connection (as the kernel sees it: every connection open had a round trip in flight while more of the process's requests were in progress than connections busy); round trips p50 {:.1} ms: raise the pool's size, or make the round trips shorter",
                d.protocol,
                d.connections_max,
                100.0 * p.all_busy_share,
                p.waiting_requests_mean,
                d.round_trip_ms.p50
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
