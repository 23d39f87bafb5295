//! Prometheus metrics of the daemon (OpenMetrics text, with the
//! `prometheus-client` crate): the USE signals and the samples, labelled by
//! container with a bounded number of label values, and the daemon's own
//! cost.

use std::{collections::HashMap, sync::atomic::AtomicU64};

use profiler_common::{counters::Counter as K, sched::LATENCY_SLOTS};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use crate::model::RawProfile;

mod labels;
mod signals;

pub use labels::*;

type F64Gauge = Gauge<f64, AtomicU64>;
type F64Counter = Counter<f64, AtomicU64>;

/// Every metric the daemon serves.
pub struct Metrics {
    registry: Registry,
    samples: Family<ContainerLabel, Counter>,
    utilization: Family<ContainerLabel, F64Gauge>,
    runq_latency: KernelHistogram,
    runq_depth: F64Gauge,
    runq_depth_max: Gauge,
    retransmits: Family<ContainerLabel, Counter>,
    oom_kills: Family<ContainerLabel, Counter>,
    context_switches: Counter,
    throttled: Family<ContainerLabel, F64Counter>,
    offcpu: Family<CauseLabel, F64Counter>,
    loop_turns: Family<LoopLabel, KernelHistogram>,
    loop_stalls: Family<LoopLabel, Counter>,
    comms: std::collections::HashSet<String>,
    http_requests: Family<RouteCodeLabel, Counter>,
    http_duration: Family<RouteLabel, KernelHistogram>,
    round_trips: Family<DestLabel, KernelHistogram>,
    conns_opened: Family<DestLabel, Counter>,
    conns_open: Family<DestLabel, Gauge>,
    connects: Family<DestLabel, KernelHistogram>,
    conn_failures: Family<DestReasonLabel, Counter>,
    routes_seen: std::collections::HashSet<String>,
    dests_seen: std::collections::HashSet<String>,
    migrations: Counter,
    major_faults: Counter,
    lost: Family<ReasonLabel, Counter>,
    windows: Counter,
    cpu_seconds: F64Counter,
    rss: Gauge,
    tracked: Gauge,
    self_share: F64Gauge,
    bpf_run_time: Family<ProgramLabel, F64Counter>,
    bpf_run_count: Family<ProgramLabel, Counter>,
    /// Container label -> window it was last seen in.
    labels: HashMap<String, u64>,
    window: u64,
    last_cpu_s: f64,
    last_bpf: HashMap<String, (u64, u64)>,
}

/// Counters that mean samples or events were lost.
const LOST: [K; 15] = [
    K::ConnsFull,
    K::RequestEventsLost,
    K::CountMapFull,
    K::UserStackDropped,
    K::KernelStackDropped,
    K::EventsLost,
    K::StackCopiesLost,
    K::OomEventsLost,
    K::RetransMapFull,
    K::RunqStartFull,
    K::OffcpuStartFull,
    K::OffcpuStackDropped,
    K::LoopsFull,
    K::StallsLost,
    K::LoopBlocksLost,
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            samples: Family::default(),
            utilization: Family::default(),
            runq_latency: KernelHistogram::default(),
            runq_depth: F64Gauge::default(),
            runq_depth_max: Gauge::default(),
            retransmits: Family::default(),
            oom_kills: Family::default(),
            context_switches: Counter::default(),
            throttled: Family::default(),
            offcpu: Family::default(),
            loop_turns: Family::default(),
            loop_stalls: Family::default(),
            comms: Default::default(),
            http_requests: Family::default(),
            http_duration: Family::default(),
            round_trips: Family::default(),
            conns_opened: Family::default(),
            connects: Family::default(),
            conn_failures: Family::default(),
            conns_open: Family::default(),
            routes_seen: Default::default(),
            dests_seen: Default::default(),
            migrations: Counter::default(),
            major_faults: Counter::default(),
            lost: Family::default(),
            windows: Counter::default(),
            cpu_seconds: F64Counter::default(),
            rss: Gauge::default(),
            tracked: Gauge::default(),
            self_share: F64Gauge::default(),
            bpf_run_time: Family::default(),
            bpf_run_count: Family::default(),
            labels: HashMap::new(),
            window: 0,
            last_cpu_s: 0.0,
            last_bpf: HashMap::new(),
        };
        registry.register(
            "profiler_cpu_samples",
            "On-CPU stack samples taken, by container (idle: CPU idle; host: in no container)",
            m.samples.clone(),
        );
        registry.register_with_unit(
            "profiler_cpu_utilization",
            "Share of all CPUs busy over the last window, whole host (all) and by container",
            Unit::Other("ratio".into()),
            m.utilization.clone(),
        );
        registry.register_with_unit(
            "profiler_runqueue_latency",
            "Time from a task becoming runnable to running (sched_wakeup/sched_switch, as runqlat)",
            Unit::Seconds,
            m.runq_latency.clone(),
        );
        registry.register(
            "profiler_runqueue_depth",
            "Mean tasks waiting per CPU run queue over the last window, sampled at each tick",
            m.runq_depth.clone(),
        );
        registry.register(
            "profiler_runqueue_depth_max",
            "Most tasks waiting on one CPU run queue in the last window",
            m.runq_depth_max.clone(),
        );
        registry.register(
            "profiler_tcp_retransmits",
            "TCP segments retransmitted (tcp_retransmit_skb/synack), by container of the socket owner",
            m.retransmits.clone(),
        );
        registry.register(
            "profiler_oom_kills",
            "Processes killed by the kernel's OOM killer, by container of the victim",
            m.oom_kills.clone(),
        );
        registry.register(
            "profiler_context_switches",
            "Context switches on every CPU, counted by perf events (CPU saturation)",
            m.context_switches.clone(),
        );
        registry.register_with_unit(
            "profiler_cpu_throttled",
            "Time tasks of a cgroup with a CPU quota waited for the next period (cpu.stat), by container",
            Unit::Seconds,
            m.throttled.clone(),
        );
        registry.register_with_unit(
            "profiler_offcpu",
            "Time threads spent off the CPU, by cause and container (daemon --off-cpu; idle and condvar: waiting for work)",
            Unit::Seconds,
            m.offcpu.clone(),
        );
        registry.register_with_unit(
            "profiler_event_loop_turn",
            "Event-loop turns (from the return of an epoll wait to the next call), by container and thread name",
            Unit::Seconds,
            m.loop_turns.clone(),
        );
        registry.register(
            "profiler_event_loop_stalls",
            "Event-loop turns of at least --stall-threshold, by container and thread name",
            m.loop_stalls.clone(),
        );
        registry.register(
            "profiler_http_requests",
            "HTTP/1.x requests served, by container, route, method and status class (daemon --requests)",
            m.http_requests.clone(),
        );
        registry.register_with_unit(
            "profiler_http_request_duration",
            "Server-side duration of HTTP/1.x requests (first byte read to first byte of the response written), by container, route and method",
            Unit::Seconds,
            m.http_duration.clone(),
        );
        registry.register_with_unit(
            "profiler_downstream_round_trip",
            "Round trips on outbound connections (a write to the first bytes of its answer), by container, destination and protocol",
            Unit::Seconds,
            m.round_trips.clone(),
        );
        registry.register(
            "profiler_downstream_connections_opened",
            "Outbound connections opened, by container, destination and protocol",
            m.conns_opened.clone(),
        );
        registry.register(
            "profiler_downstream_connections",
            "Outbound connections open at the end of the window, by container, destination and protocol",
            m.conns_open.clone(),
        );
        registry.register_with_unit(
            "profiler_downstream_connect",
            "Handshakes of outbound TCP connections (SYN sent to established), by container, destination and protocol",
            Unit::Seconds,
            m.connects.clone(),
        );
        registry.register(
            "profiler_downstream_failures",
            "Outbound connects that failed and connections that ended in an error, by container, destination, protocol and reason (refused, timed_out, reset, unreachable, abandoned, no_local_port, failed)",
            m.conn_failures.clone(),
        );
        registry.register(
            "profiler_cpu_migrations",
            "Tasks moved from one CPU to another, counted by perf events",
            m.migrations.clone(),
        );
        registry.register(
            "profiler_major_page_faults",
            "Page faults that waited for I/O, counted by perf events (memory saturation)",
            m.major_faults.clone(),
        );
        registry.register(
            "profiler_lost_samples",
            "Samples, stacks or events lost, by reason",
            m.lost.clone(),
        );
        registry.register("profiler_windows", "Windows completed", m.windows.clone());
        registry.register_with_unit(
            "profiler_process_cpu",
            "CPU time used by the daemon itself (user + system)",
            Unit::Seconds,
            m.cpu_seconds.clone(),
        );
        registry.register_with_unit(
            "profiler_process_resident_memory",
            "Resident memory of the daemon",
            Unit::Bytes,
            m.rss.clone(),
        );
        registry.register(
            "profiler_tracked_processes",
            "Processes whose maps and names the daemon holds (live ones, and exited ones not yet symbolized)",
            m.tracked.clone(),
        );
        registry.register_with_unit(
            "profiler_self_cpu_share",
            "The daemon's CPU time (eBPF programs + userspace) as a share of all CPUs' time over the last window",
            Unit::Other("ratio".into()),
            m.self_share.clone(),
        );
        registry.register_with_unit(
            "profiler_bpf_run_time",
            "Time the kernel spent in the daemon's eBPF programs (kernel.bpf_stats_enabled)",
            Unit::Seconds,
            m.bpf_run_time.clone(),
        );
        registry.register(
            "profiler_bpf_runs",
            "Runs of the daemon's eBPF programs (kernel.bpf_stats_enabled)",
            m.bpf_run_count.clone(),
        );
        // Every series a dashboard looks for exists from the start, at 0.
        let host = ContainerLabel {
            container: "host".into(),
        };
        m.retransmits.get_or_create(&host).inc_by(0);
        m.oom_kills.get_or_create(&host).inc_by(0);
        for c in LOST {
            m.lost
                .get_or_create(&ReasonLabel {
                    reason: c.name().to_string(),
                })
                .inc_by(0);
        }
        Metrics { registry, ..m }
    }

    /// The label for a container name, within the bound.
    pub fn container_label(&mut self, name: &str) -> ContainerLabel {
        let fixed = matches!(name, "host" | "idle" | "all" | "other");
        let container = if fixed
            || self.labels.contains_key(name)
            || self.labels.len() < MAX_CONTAINER_LABELS
        {
            if !fixed {
                self.labels.insert(name.to_string(), self.window);
            }
            name.to_string()
        } else {
            "other".to_string()
        };
        ContainerLabel { container }
    }

    /// Adds one slice of a capture (see [`crate::capture::Capture::collect_window`]),
    /// with the container name of each process (`None`: a host process).
    pub fn add_slice(
        &mut self,
        raw: &RawProfile,
        container_of: &mut dyn FnMut(u32) -> Option<String>,
        retransmit_owner: &mut dyn FnMut(&RawProfile, usize) -> Option<String>,
        oom_victim: &mut dyn FnMut(&RawProfile, usize) -> Option<String>,
    ) {
        let mut by_container: HashMap<String, u64> = HashMap::new();
        for s in &raw.stacks {
            let name = if s.tgid == 0 {
                "idle".to_string()
            } else {
                container_of(s.tgid).unwrap_or_else(|| "host".to_string())
            };
            *by_container.entry(name).or_default() += s.count;
        }
        for (name, n) in by_container {
            let l = self.container_label(&name);
            self.samples.get_or_create(&l).inc_by(n);
        }
        for c in LOST {
            let n = raw.counter(c);
            if n > 0 {
                self.lost
                    .get_or_create(&ReasonLabel {
                        reason: c.name().to_string(),
                    })
                    .inc_by(n);
            }
        }
        let mut slots = vec![0u64; LATENCY_SLOTS as usize];
        for cpu in &raw.runq_latency {
            for (a, b) in slots.iter_mut().zip(cpu) {
                *a += b;
            }
        }
        self.runq_latency
            .add(&slots, raw.counter(K::RunqLatencyTotalUs));
        // Retransmits: per connection where the map had room, the rest
        // (past the per-connection map) as `other`.
        let mut attributed = 0;
        for i in 0..raw.retransmits.len() {
            let n = raw.retransmits[i].1.count;
            attributed += n;
            let name = retransmit_owner(raw, i).unwrap_or_else(|| "host".to_string());
            let l = self.container_label(&name);
            self.retransmits.get_or_create(&l).inc_by(n);
        }
        let rest = raw.counter(K::Retransmits).saturating_sub(attributed);
        if rest > 0 {
            let l = self.container_label("other");
            self.retransmits.get_or_create(&l).inc_by(rest);
        }
        for i in 0..raw.oom_kills.len() {
            let name = oom_victim(raw, i).unwrap_or_else(|| "host".to_string());
            let l = self.container_label(&name);
            self.oom_kills.get_or_create(&l).inc();
        }
        if let Some(c) = raw.counted {
            self.context_switches.inc_by(c.context_switches);
            self.migrations.inc_by(c.migrations);
            self.major_faults.inc_by(c.major_faults);
        }
        let lost_oom = raw
            .counter(K::OomKills)
            .saturating_sub(raw.oom_kills.len() as u64);
        if lost_oom > 0 {
            let l = self.container_label("other");
            self.oom_kills.get_or_create(&l).inc_by(lost_oom);
        }
    }

    /// Sets the gauges of a finished window (`raw`: the whole window) and
    /// drops container labels unseen for a while.
    pub fn end_window(
        &mut self,
        raw: &RawProfile,
        container_of: &mut dyn FnMut(u32) -> Option<String>,
    ) {
        self.window += 1;
        self.windows.inc();
        let ticks: u64 = raw.cpu_ticks.iter().sum();
        let busy: u64 = raw.cpu_busy_ticks.iter().sum();
        self.utilization.clear();
        if ticks > 0 {
            let all = self.container_label("all");
            self.utilization
                .get_or_create(&all)
                .set(busy as f64 / ticks as f64);
            let mut by: HashMap<String, u64> = HashMap::new();
            for s in raw.stacks.iter().filter(|s| s.tgid != 0) {
                let name = container_of(s.tgid).unwrap_or_else(|| "host".to_string());
                *by.entry(name).or_default() += s.count;
            }
            for (name, n) in by {
                let l = self.container_label(&name);
                self.utilization
                    .get_or_create(&l)
                    .set(n as f64 / ticks as f64);
            }
        }
        let (mut n, mut sum, mut max) = (0u64, 0u64, 0i64);
        for cpu in &raw.runq_depth {
            for (depth, &c) in cpu.iter().enumerate() {
                n += c;
                sum += depth as u64 * c;
                if c > 0 {
                    max = max.max(depth as i64);
                }
            }
        }
        self.runq_depth
            .set(if n > 0 { sum as f64 / n as f64 } else { 0.0 });
        self.runq_depth_max.set(max);
        // Labels of containers gone for a while make room for new ones.
        let now = self.window;
        let stale: Vec<String> = self
            .labels
            .iter()
            .filter(|(_, seen)| now.saturating_sub(**seen) > LABEL_TTL_WINDOWS)
            .map(|(k, _)| k.clone())
            .collect();
        for name in stale {
            self.labels.remove(&name);
            let l = ContainerLabel { container: name };
            self.samples.remove(&l);
            self.retransmits.remove(&l);
            self.oom_kills.remove(&l);
        }
    }

    /// Updates the daemon's own cost: CPU seconds and RSS from /proc/self,
    /// and the cumulative run time and count of each eBPF program.
    pub fn update_self(&mut self, bpf: &[(String, u64, u64)]) {
        if let Some((cpu_s, rss)) = own_usage() {
            if cpu_s > self.last_cpu_s {
                self.cpu_seconds.inc_by(cpu_s - self.last_cpu_s);
                self.last_cpu_s = cpu_s;
            }
            self.rss.set(rss as i64);
        }
        for (name, ns, runs) in bpf {
            let (last_ns, last_runs) = self.last_bpf.get(name).copied().unwrap_or((0, 0));
            let l = ProgramLabel {
                program: name.clone(),
            };
            if *ns > last_ns {
                self.bpf_run_time
                    .get_or_create(&l)
                    .inc_by((ns - last_ns) as f64 / 1e9);
            }
            if *runs > last_runs {
                self.bpf_run_count
                    .get_or_create(&l)
                    .inc_by(runs - last_runs);
            }
            self.last_bpf.insert(name.clone(), (*ns, *runs));
        }
    }

    /// Processes held in the process table.
    pub fn set_tracked(&mut self, n: usize) {
        self.tracked.set(n as i64);
    }

    /// The daemon's share of the machine's CPU over the last window.
    pub fn set_self_share(&mut self, share: f64) {
        self.self_share.set(share);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// Container labels in use (tests, bounds).
    pub fn labels_in_use(&self) -> usize {
        self.labels.len()
    }
}

/// The daemon's CPU seconds (user + system) and RSS in bytes.
pub fn own_usage() -> Option<(f64, u64)> {
    let stat = crate::procs::Stat::read("self")?;
    let (ticks, rss_pages) = (stat.utime + stat.stime, stat.rss_pages);
    // SAFETY: sysconf has no preconditions.
    let (hz, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    Some((ticks as f64 / hz, rss_pages * page))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RawStack;

    fn stack(tgid: u32, count: u64) -> RawStack {
        RawStack {
            tgid,
            thread: "t".into(),
            user: Ok(vec![1]),
            user_cut: None,
            kernel: Err(-14),
            count,
        }
    }

    #[test]
    fn exposition_has_the_names_and_labels() {
        let mut m = Metrics::new();
        let mut raw = RawProfile {
            stacks: vec![stack(0, 5), stack(10, 3), stack(11, 2)],
            cpu_ticks: vec![10, 10],
            cpu_busy_ticks: vec![3, 2],
            runq_latency: vec![vec![0; LATENCY_SLOTS as usize]; 2],
            runq_depth: vec![vec![4, 1], vec![0, 0, 1]],
            ..Default::default()
        };
        raw.runq_latency[0][3] = 2; // 8..15 us
        raw.counters.add(K::RunqLatencyTotalUs, 20);
        raw.counters.add(K::KernelStackDropped, 1);
        let mut names = |tgid: u32| (tgid == 10).then(|| "docker:3f1a2b4c5d6e".to_string());
        m.add_slice(&raw, &mut names, &mut |_, _| None, &mut |_, _| None);
        m.end_window(&raw, &mut names);
        m.update_self(&[("sample_stack".into(), 2_000_000, 7)]);
        let text = m.encode();
        for want in [
            "profiler_cpu_samples_total{container=\"idle\"} 5",
            "profiler_cpu_samples_total{container=\"docker:3f1a2b4c5d6e\"} 3",
            "profiler_cpu_samples_total{container=\"host\"} 2",
            "profiler_cpu_utilization_ratio{container=\"all\"} 0.25",
            "profiler_runqueue_latency_seconds_count 2",
            "profiler_runqueue_latency_seconds_sum 0.00002",
            "profiler_runqueue_latency_seconds_bucket{le=\"0.000016\"} 2",
            "profiler_runqueue_latency_seconds_bucket{le=\"+Inf\"} 2",
            "profiler_runqueue_depth 0.5",
            "profiler_runqueue_depth_max 2",
            "profiler_bpf_run_time_seconds_total{program=\"sample_stack\"} 0.002",
            "profiler_bpf_runs_total{program=\"sample_stack\"} 7",
            "profiler_windows_total 1",
            "# TYPE profiler_tcp_retransmits counter",
            "# TYPE profiler_oom_kills counter",
            "# TYPE profiler_lost_samples counter",
            "profiler_process_cpu_seconds_total",
            "profiler_process_resident_memory_bytes",
            "# TYPE profiler_self_cpu_share_ratio gauge",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(
            text.contains("profiler_lost_samples_total{reason=\""),
            "{text}"
        );
    }

    #[test]
    fn container_labels_are_bounded_and_expire() {
        let mut m = Metrics::new();
        for i in 0..MAX_CONTAINER_LABELS + 50 {
            let l = m.container_label(&format!("c{i}"));
            if i < MAX_CONTAINER_LABELS {
                assert_eq!(l.container, format!("c{i}"));
            } else {
                assert_eq!(l.container, "other");
            }
        }
        assert_eq!(m.labels_in_use(), MAX_CONTAINER_LABELS);
        let raw = RawProfile::default();
        for _ in 0..=LABEL_TTL_WINDOWS + 1 {
            m.end_window(&raw, &mut |_| None);
        }
        assert_eq!(m.labels_in_use(), 0);
        assert_eq!(m.container_label("new").container, "new");
    }
}
