//! The daemon's HTTP side (axum): metrics, profiles on request, the last
//! window's flame graph and USE report. Nothing a request says reaches
//! the filesystem; profile requests are bounded in length and in number.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{DEFAULT_PROFILE_SECONDS, MAX_CONCURRENT_PROFILES};
use crate::metrics::Metrics;

/// A profile, or why it could not be made (answered with 500).
pub(super) type Body = Result<Vec<u8>, crate::output::OutputError>;

/// What a profile request wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Want {
    Pprof,
    Svg,
}

pub(super) struct ProfileRequest {
    pub(super) seconds: u64,
    pub(super) want: Want,
    pub(super) reply: oneshot::Sender<Body>,
}

/// What the HTTP handlers share with the sampling loop.
pub(super) struct Shared {
    pub(super) metrics: Mutex<Metrics>,
    pub(super) last_svg: Mutex<Option<Arc<Body>>>,
    pub(super) last_use: Mutex<Option<Arc<Vec<u8>>>>,
    /// The last window's report.html.
    pub(super) last_report: Mutex<Option<Arc<Vec<u8>>>>,
    pub(super) requests: mpsc::Sender<ProfileRequest>,
    pub(super) inflight: Arc<Semaphore>,
    pub(super) max_seconds: u64,
    pub(super) window: Duration,
}

pub(super) fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into() + "\n",
    )
        .into_response()
}

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(report))
        .route("/report.html", get(report))
        .route("/help", get(index))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/debug/pprof/profile", get(pprof_profile))
        .route("/flamegraph.svg", get(flamegraph))
        .route("/use.json", get(use_json))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "not found; see / for the endpoints") })
        .with_state(shared)
}

/// The last window's report page; the endpoints' list until a window
/// has finished.
pub(super) async fn report(State(s): State<Arc<Shared>>) -> Response {
    let last = s.last_report.lock().unwrap().clone();
    match last {
        Some(html) => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            (*html).clone(),
        )
            .into_response(),
        None => index().await,
    }
}

pub(super) async fn index() -> Response {
    text(
        StatusCode::OK,
        "profiler daemon\n\
         /                                 report.html of the last window (this list until one has finished)\n\
         /help                             this list\n\
         /metrics                          Prometheus metrics\n\
         /debug/pprof/profile?seconds=N    gzipped pprof CPU profile of the next N seconds\n\
         /flamegraph.svg[?seconds=N]       flame graph of the last window, or of the next N seconds\n\
         /use.json                         USE report of the last window\n\
         /healthz                          liveness",
    )
}

pub(super) async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let body = s.metrics.lock().unwrap().encode();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// The `seconds` of a request: a whole number from 1 to the maximum.
pub(super) fn parse_seconds(
    q: &HashMap<String, String>,
    max: u64,
) -> Result<Option<u64>, Box<Response>> {
    let Some(v) = q.get("seconds") else {
        return Ok(None);
    };
    match v.trim().parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
        _ => Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            format!(
                "seconds={v:?}: use a whole number of seconds from 1 to {max} (the daemon's --max-profile-seconds)"
            ),
        ))),
    }
}

pub(super) async fn run_request(s: &Shared, seconds: u64, want: Want) -> Response {
    let Ok(_permit) = s.inflight.clone().try_acquire_owned() else {
        return text(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{MAX_CONCURRENT_PROFILES} profiles are already being taken; retry when one has finished"
            ),
        );
    };
    let (reply, rx) = oneshot::channel();
    let req = ProfileRequest {
        seconds,
        want,
        reply,
    };
    if s.requests.send(req).await.is_err() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping");
    }
    match rx.await {
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Ok(Ok(body)) if want == Want::Pprof => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"profile\"",
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            body,
        )
            .into_response(),
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, "image/svg+xml")], body).into_response(),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping"),
    }
}

pub(super) async fn pprof_profile(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let seconds = match parse_seconds(&q, s.max_seconds) {
        Ok(v) => v.unwrap_or(DEFAULT_PROFILE_SECONDS.min(s.max_seconds)),
        Err(r) => return *r,
    };
    run_request(&s, seconds, Want::Pprof).await
}

pub(super) async fn flamegraph(
    State(s): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match parse_seconds(&q, s.max_seconds) {
        Err(r) => *r,
        Ok(Some(seconds)) => run_request(&s, seconds, Want::Svg).await,
        Ok(None) => match s.last_svg.lock().unwrap().clone() {
            Some(svg) => match &*svg {
                Ok(svg) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg.clone()).into_response(),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            },
            None => not_yet(&s),
        },
    }
}

pub(super) async fn use_json(State(s): State<Arc<Shared>>) -> Response {
    match s.last_use.lock().unwrap().clone() {
        Some(j) => ([(header::CONTENT_TYPE, "application/json")], (*j).clone()).into_response(),
        None => not_yet(&s),
    }
}

pub(super) fn not_yet(s: &Shared) -> Response {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "no window has finished yet (windows last {} s); retry then, or ask /flamegraph.svg?seconds=N",
            s.window.as_secs_f64()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_bounded() {
        let q = |v: &str| HashMap::from([("seconds".to_string(), v.to_string())]);
        assert_eq!(parse_seconds(&HashMap::new(), 60).ok(), Some(None));
        assert_eq!(parse_seconds(&q("5"), 60).ok(), Some(Some(5)));
        for bad in ["0", "61", "-1", "abc", "1.5", ""] {
            let r = parse_seconds(&q(bad), 60).unwrap_err();
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
