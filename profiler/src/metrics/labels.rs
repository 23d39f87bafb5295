//! The daemon's label sets, their bounds, and a histogram whose buckets
//! the kernel counted.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::MetricType,
};

/// Most distinct `container` label values at once; the rest are counted
/// as `other`. Values unseen for [`LABEL_TTL_WINDOWS`] windows are dropped.
pub const MAX_CONTAINER_LABELS: usize = 200;
/// Windows after which an unseen container label is dropped.
pub const LABEL_TTL_WINDOWS: u64 = 10;

/// A `container` label: a container's name, `host` for processes in no
/// container, `idle` for idle CPU time, `all` for whole-host figures, or
/// `other` past [`MAX_CONTAINER_LABELS`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ContainerLabel {
    /// See the type.
    pub container: String,
}

/// Why samples were lost.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Counter name, as in use.json.
    pub reason: String,
}

/// Why threads were off the CPU, by container.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    /// The cause (`lock`, `disk`, ...; see use.json's offcpu).
    pub cause: String,
    /// As [`ContainerLabel`].
    pub container: String,
}

/// An event loop's process name, by container.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoopLabel {
    /// As [`ContainerLabel`].
    pub container: String,
    /// The loop thread's name (`other` past [`MAX_COMM_LABELS`]).
    pub comm: String,
}

/// A route of a container.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// As [`ContainerLabel`].
    pub container: String,
    /// The normalized route (`other` past the bounds).
    pub route: String,
    /// The method.
    pub method: String,
}

/// A route's requests by status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteCodeLabel {
    /// As [`ContainerLabel`].
    pub container: String,
    /// As [`RouteLabel`].
    pub route: String,
    /// The method.
    pub method: String,
    /// `2xx`, `3xx`, `4xx`, `5xx` (`1xx` folded into `2xx`).
    pub code: String,
}

/// A downstream destination of a container.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestLabel {
    /// As [`ContainerLabel`].
    pub container: String,
    /// `address:port` (`other` past [`MAX_DEST_LABELS`]).
    pub destination: String,
    /// `http`, `redis`, `postgresql`, ... or `tcp`.
    pub protocol: String,
}

/// A destination and why a connection to it failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestReasonLabel {
    /// As [`ContainerLabel`].
    pub container: String,
    /// As [`DestLabel`].
    pub destination: String,
    /// As [`DestLabel`].
    pub protocol: String,
    /// `refused`, `timed_out`, `reset`, ...
    pub reason: String,
}

/// Most distinct route and destination label values.
pub const MAX_ROUTE_LABELS: usize = 500;
/// Most distinct destination label values.
pub const MAX_DEST_LABELS: usize = 200;

/// Most distinct `comm` label values of event loops.
pub const MAX_COMM_LABELS: usize = 100;

/// An eBPF program.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabel {
    /// Program name.
    pub program: String,
}

/// A histogram whose buckets come counted from the kernel (log2
/// microseconds), exposed in seconds.
#[derive(Clone, Debug, Default)]
pub struct KernelHistogram {
    inner: Arc<Mutex<(Vec<u64>, u64)>>,
}

impl KernelHistogram {
    /// Adds bucket counts (one per log2 slot) and their sum in microseconds.
    pub fn add(&self, slots: &[u64], sum_us: u64) {
        let mut g = self.inner.lock().unwrap();
        if g.0.len() < slots.len() {
            g.0.resize(slots.len(), 0);
        }
        for (a, b) in g.0.iter_mut().zip(slots) {
            *a += b;
        }
        g.1 += sum_us;
    }
}

impl prometheus_client::metrics::TypedMetric for KernelHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for KernelHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let g = self.inner.lock().unwrap();
        let count: u64 = g.0.iter().sum();
        // Slot i holds latencies d (us) with log2(d) == i: d < 2^(i+1).
        let mut buckets: Vec<(f64, u64)> =
            g.0.iter()
                .enumerate()
                .map(|(i, &c)| ((1u64 << (i + 1)) as f64 / 1e6, c))
                .collect();
        if let Some(last) = buckets.last_mut() {
            last.0 = f64::MAX; // the last slot also holds everything longer
        }
        encoder.encode_histogram::<NoLabelSet>(g.1 as f64 / 1e6, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}
