//! HTTP/1.x as the kernel saw it: request lines and status codes parsed
//! from the first bytes of each request and response, routes normalized
//! (`/users/123` and `/users/456` are `/users/:id`), and per process and
//! route: requests, 4xx, 5xx and a duration histogram.

use std::collections::HashMap;

use serde::Serialize;

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

/// Lower bound (inclusive, us) of bucket `slot`.
pub fn slot_lower_us(slot: usize) -> u64 {
    if slot == 0 {
        0
    } else {
        slot_upper_us(slot - 1)
    }
}

/// What the first bytes a server read on an idle connection were.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Head {
    /// An HTTP/1.x request: method and path.
    Http(String, String),
    /// A TLS record: encrypted, no route to read.
    Tls,
    /// Neither (another protocol, or a request seen from its middle).
    Other,
}

/// Whether bytes start with a TLS record header: content type 20..23
/// (change cipher spec, alert, handshake, application data), version
/// 3.x.
pub fn is_tls(head: &[u8]) -> bool {
    matches!(head, [20..=23, 3, 0..=4, ..])
}

/// Tells what a request's first bytes are.
pub fn classify(head: &[u8]) -> Head {
    match parse_request(head) {
        Some((method, path)) => Head::Http(method, path),
        None if is_tls(head) => Head::Tls,
        None => Head::Other,
    }
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
    /// Counts one of `ns`.
    pub fn time(&mut self, ns: u64) {
        if self.hist.is_empty() {
            self.hist = vec![0; SLOTS];
        }
        self.requests += 1;
        self.hist[slot_of(ns / 1000)] += 1;
        self.max_ns = self.max_ns.max(ns);
        self.total_ns += ns;
    }

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
) -> RouteKey {
    let mut key = (tgid, method.to_string(), normalize(path));
    if !routes.contains_key(&key)
        && routes.keys().filter(|k| k.0 == tgid).count() >= MAX_ROUTES_PER_PROCESS
    {
        key.2 = "other".into();
    }
    let r = routes.entry(key.clone()).or_default();
    r.time(duration_ns);
    match status {
        400..=499 => r.errors_4xx += 1,
        500..=599 => r.errors_5xx += 1,
        300..=399 => r.redirects += 1,
        _ => {}
    }
    key
}

/// A histogram bucket.
#[derive(Clone, Debug, Serialize)]
pub struct Bucket {
    /// Lower bound (inclusive), ms: the buckets listed are the non-empty
    /// ones, so the one before does not say where this one starts.
    pub ge_ms: f64,
    /// Upper bound (exclusive), ms.
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
            let lo = slot_lower_us(i) as f64;
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
                    ge_ms: slot_lower_us(i) as f64 / 1000.0,
                    le_ms: slot_upper_us(i) as f64 / 1000.0,
                    count: *c,
                })
                .collect(),
        }
    }
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
