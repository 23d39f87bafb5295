//! The USE stage: Utilization, Saturation and Errors of CPU, memory and
//! network for the capture window, from the kernel programs' counts and
//! /proc. Produces the table `record` prints, `use.json` (schema in
//! docs/use-json.md) and the lines of `events.jsonl`.

mod table;
mod throttling;

pub use table::{events_jsonl, render_table, table_notes, table_rows};
pub use throttling::Throttling;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use profiler_common::{
    sched::LATENCY_SLOTS,
    tcp::{RetransKey, RetransValue},
};
use serde::Serialize;

use crate::{
    hostsnap::HostSnapshot,
    model::{OomKill, OwnerInfo, RawProfile},
};

/// Version tag of the use.json schema.
pub const SCHEMA: &str = "profiler.use/1";

/// One histogram bucket: `count` values at most `le`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Bucket {
    /// Upper bound, inclusive.
    pub le: u64,
    /// Values in the bucket.
    pub count: u64,
}

/// Run-queue latency.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Waits measured.
    pub count: u64,
    /// Percentiles, microseconds: the upper bound of the log2 bucket that
    /// holds them (as runqlat prints them).
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Longest wait, exact.
    pub max: u64,
    /// log2 buckets (`le` = 2^(i+1) - 1 us), empty tail trimmed.
    pub histogram: Vec<Bucket>,
    /// The same per CPU.
    pub per_cpu: Vec<CpuLatency>,
}

/// Run-queue latency of one CPU.
#[derive(Clone, Debug, Serialize)]
pub struct CpuLatency {
    /// CPU id.
    pub cpu: u32,
    /// Waits measured.
    pub count: u64,
    /// Median, us (bucket bound).
    pub p50: u64,
    /// 99th percentile, us (bucket bound).
    pub p99: u64,
    /// Buckets.
    pub histogram: Vec<Bucket>,
}

/// Run-queue depth.
#[derive(Clone, Debug, Serialize)]
pub struct Depth {
    /// Samples read.
    pub samples: u64,
    /// Mean tasks waiting (excluding the running one), over CPUs and time.
    pub mean: f64,
    /// Most tasks seen waiting.
    pub max: u64,
    /// `le` = tasks waiting.
    pub histogram: Vec<Bucket>,
    /// Where it was read: `rq.cfs.<field>`.
    pub field: String,
}

/// CPU row.
#[derive(Clone, Debug, Serialize)]
pub struct Cpu {
    /// Online CPUs.
    pub count: usize,
    /// Busy share over all CPUs, 0..1.
    pub utilization: f64,
    /// Busy share per CPU.
    pub per_cpu: Vec<CpuUtil>,
    /// How utilization was measured.
    pub utilization_source: String,
    /// Busy share over all CPUs by the kernel's own accounting
    /// (/proc/stat), beside the sampled one: sampling the cpu-clock loses
    /// ticks on CPUs that switch between idle and busy every few
    /// microseconds, where the two part ways.
    pub utilization_proc_stat: Option<f64>,
    /// Run-queue latency, or null when unavailable.
    pub runqueue_latency_us: Option<Latency>,
    /// Run-queue depth, or null when unavailable.
    pub runqueue_depth: Option<Depth>,
    /// Context switches per second over all CPUs (counted by perf
    /// events), or null when unavailable.
    pub context_switches_per_s: Option<f64>,
    /// Tasks moved between CPUs per second, or null when unavailable.
    pub migrations_per_s: Option<f64>,
    /// CPU throttling of every cgroup that ran under a CPU quota in the
    /// window, most throttled first.
    pub throttling: Vec<Throttling>,
}

/// Utilization of one CPU.
#[derive(Clone, Debug, Serialize)]
pub struct CpuUtil {
    /// CPU id.
    pub cpu: u32,
    /// 0..1, from samples.
    pub utilization: f64,
    /// 0..1, from /proc/stat.
    pub utilization_proc_stat: Option<f64>,
}

/// An OOM kill in use.json.
#[derive(Clone, Debug, Serialize)]
pub struct OomRecord {
    /// When, RFC 3339 UTC.
    pub time: String,
    /// Victim pid.
    pub pid: u32,
    /// Victim command name.
    pub comm: String,
    /// Victim uid, null if the kernel does not report it.
    pub uid: Option<u32>,
    /// Virtual memory, kB.
    pub total_vm_kb: u64,
    /// Anonymous RSS, kB.
    pub anon_rss_kb: u64,
    /// File RSS, kB.
    pub file_rss_kb: u64,
    /// Shared-memory RSS, kB.
    pub shmem_rss_kb: u64,
    /// oom_score_adj.
    pub oom_score_adj: i16,
    /// Victim's cgroup path, null if it could not be read.
    pub cgroup: Option<String>,
}

/// Memory row.
#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    /// Used share at the end of the window: 1 - MemAvailable/MemTotal.
    pub utilization: Option<f64>,
    /// MemTotal, kB.
    pub total_kb: Option<u64>,
    /// MemAvailable at the end, kB.
    pub available_kb: Option<u64>,
    /// Share of the window some task stalled on memory (PSI), 0..1.
    pub pressure_stall_ratio: Option<f64>,
    /// Every OOM kill of the window.
    pub oom_kills: Vec<OomRecord>,
    /// The kernel's own count of OOM kills in the window (/proc/vmstat).
    pub kernel_oom_kill_count: Option<u64>,
    /// Page faults that waited for I/O, per second (counted by perf
    /// events), or null when unavailable.
    pub major_faults_per_s: Option<f64>,
    /// Where the figures come from.
    pub source: String,
}

/// One retransmitting connection.
#[derive(Clone, Debug, Serialize)]
pub struct RetransConn {
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// Source address.
    pub saddr: String,
    /// Source port.
    pub sport: u16,
    /// Destination address.
    pub daddr: String,
    /// Destination port.
    pub dport: u16,
    /// TCP state at the retransmits.
    pub state: String,
    /// Retransmits.
    pub count: u64,
    /// First one, RFC 3339.
    pub first: String,
    /// Last one, RFC 3339.
    pub last: String,
    /// Owner process, if known.
    pub pid: Option<u32>,
    /// Owner command name, if known.
    pub comm: Option<String>,
    /// Owner cgroup, if known.
    pub cgroup: Option<String>,
}

/// Network row.
#[derive(Clone, Debug, Serialize)]
pub struct Network {
    /// Retransmits traced (exact).
    pub tcp_retransmits: u64,
    /// Per connection (and TCP state), most first.
    pub retransmits_by_connection: Vec<RetransConn>,
    /// When: `[ms, count]` pairs, `count` retransmits in the 10 ms from
    /// `ms` after the start, in order (only slices that had some).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retransmit_times: Vec<[u64; 2]>,
    /// The kernel's RetransSegs over the window (counts segments; can
    /// exceed the retransmit count when one retransmit carries several).
    pub kernel_retrans_segs: Option<i64>,
    /// The kernel's OutSegs over the window.
    pub kernel_out_segs: Option<i64>,
    /// Bytes per second received, all interfaces but lo.
    pub rx_bytes_per_s: f64,
    /// Bytes per second sent.
    pub tx_bytes_per_s: f64,
    /// Throughput over link speed, when the interfaces report a speed.
    pub utilization: Option<f64>,
    /// Interface errors and drops.
    pub interface_errors: u64,
    /// Connections dropped at listen (ListenDrops).
    pub listen_drops: Option<i64>,
    /// Failed connection attempts + resets (AttemptFails + EstabResets).
    pub connection_failures: Option<i64>,
    /// Where the figures come from.
    pub source: String,
}

/// A signal not collected.
#[derive(Clone, Debug, Serialize)]
pub struct Missing {
    /// Which.
    pub signal: String,
    /// Why.
    pub reason: String,
}

/// use.json.
#[derive(Clone, Debug, Serialize)]
pub struct UseReport {
    /// Schema tag.
    pub schema: &'static str,
    /// Window length.
    pub duration_s: f64,
    /// CPU.
    pub cpu: Cpu,
    /// Memory.
    pub memory: Memory,
    /// Network.
    pub network: Network,
    /// Signals that could not be collected, and why.
    pub unavailable: Vec<Missing>,
    /// What the profiler itself cost over the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profiler: Option<crate::selfcost::SelfCost>,
    /// Where the threads' time off the CPU went (when recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offcpu: Option<crate::offcpu::OffCpuSummary>,
    /// Event loops: turns and stalls (when timed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_loops: Option<crate::loops::EventLoops>,
    /// One row a second: CPU busy per CPU, run-queue wait and depth,
    /// retransmits, OOM kills, requests and errors, stalls, samples.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub seconds: Vec<crate::model::Second>,
}

/// Upper bound of log2 bucket `i` in us.
fn bucket_le(i: usize) -> u64 {
    (1u64 << (i + 1)) - 1
}

fn log2_buckets(h: &[u64]) -> Vec<Bucket> {
    let last = h.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
    h[..last]
        .iter()
        .enumerate()
        .map(|(i, &count)| Bucket {
            le: bucket_le(i),
            count,
        })
        .collect()
}

/// The bucket bound at quantile `q` of a log2 histogram.
pub fn quantile(h: &[u64], q: f64) -> u64 {
    let total: u64 = h.iter().sum();
    if total == 0 {
        return 0;
    }
    let target = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, &c) in h.iter().enumerate() {
        seen += c;
        if seen >= target {
            return bucket_le(i);
        }
    }
    bucket_le(h.len() - 1)
}

fn sum_rows(rows: &[Vec<u64>], width: usize) -> Vec<u64> {
    let mut out = vec![0; width];
    for r in rows {
        for (o, v) in out.iter_mut().zip(r) {
            *o += v;
        }
    }
    out
}

/// TCP state names (include/net/tcp_states.h).
pub fn tcp_state(s: u16) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

/// Converts CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) to wall time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    wall: SystemTime,
    mono_ns: u64,
}

impl Clock {
    /// Pairs the wall clock with CLOCK_MONOTONIC now.
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into ts.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Clock {
            wall: SystemTime::now(),
            mono_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
        }
    }

    /// RFC 3339 (UTC, milliseconds) of a monotonic timestamp.
    pub fn rfc3339(&self, mono_ns: u64) -> String {
        let t = if mono_ns >= self.mono_ns {
            self.wall + Duration::from_nanos(mono_ns - self.mono_ns)
        } else {
            self.wall - Duration::from_nanos(self.mono_ns - mono_ns)
        };
        humantime::format_rfc3339_millis(t).to_string()
    }
}

fn comm_str(c: &[u8]) -> String {
    String::from_utf8_lossy(c.split(|b| *b == 0).next().unwrap_or(&[])).into_owned()
}

/// A retransmitting connection, named and attributed.
pub fn retrans_conn(
    key: &RetransKey,
    v: &RetransValue,
    owner: Option<&OwnerInfo>,
    clock: &Clock,
) -> RetransConn {
    let (family, saddr, daddr) = if key.family == 10 {
        (
            "ipv6",
            Ipv6Addr::from(key.saddr).to_string(),
            Ipv6Addr::from(key.daddr).to_string(),
        )
    } else {
        let s = [key.saddr[0], key.saddr[1], key.saddr[2], key.saddr[3]];
        let d = [key.daddr[0], key.daddr[1], key.daddr[2], key.daddr[3]];
        (
            "ipv4",
            Ipv4Addr::from(s).to_string(),
            Ipv4Addr::from(d).to_string(),
        )
    };
    let pid = (v.owner_tgid != 0).then_some(v.owner_tgid);
    // What was read while the owner lived, else what /proc says now, else
    // the cgroup v2 id the kernel recorded.
    let now = pid.map(crate::procs::owner_info).unwrap_or_default();
    let kernel_comm = (v.owner_tgid != 0)
        .then(|| comm_str(&v.owner_comm))
        .filter(|c| !c.is_empty());
    let comm = owner
        .and_then(|o| o.comm.clone())
        .or(now.comm)
        .or(kernel_comm);
    let cgroup = owner
        .and_then(|o| o.cgroup.clone())
        .or(now.cgroup)
        .or_else(|| crate::cgroups::path_of_id(v.owner_cgroup));
    RetransConn {
        family: family.into(),
        saddr,
        sport: key.sport,
        daddr,
        dport: key.dport,
        state: tcp_state(key.state).into(),
        count: v.count,
        first: clock.rfc3339(v.first_ns),
        last: clock.rfc3339(v.last_ns),
        pid,
        comm,
        cgroup,
    }
}

/// An OOM kill for use.json (kernel pages in kB).
pub fn oom_record(k: &OomKill, clock: &Clock) -> OomRecord {
    // SAFETY: sysconf has no preconditions.
    let page_kb = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) / 1024) as u64;
    let e = &k.event;
    OomRecord {
        time: clock.rfc3339(e.ts_ns),
        pid: e.pid,
        comm: comm_str(&e.comm),
        uid: (e.uid != u32::MAX).then_some(e.uid),
        total_vm_kb: e.total_vm * page_kb,
        anon_rss_kb: e.anon_rss * page_kb,
        file_rss_kb: e.file_rss * page_kb,
        shmem_rss_kb: e.shmem_rss * page_kb,
        oom_score_adj: e.oom_score_adj,
        cgroup: k
            .victim_cgroup
            .clone()
            .or_else(|| crate::cgroups::path_of_id(e.trigger_cgroup)),
    }
}

/// Busy share of one CPU (or all) between two /proc/stat readings.
fn proc_stat_busy(start: &HostSnapshot, end: &HostSnapshot, cpu: Option<u32>) -> Option<f64> {
    let (mut busy, mut total) = (0u64, 0u64);
    for (id, &(b1, t1)) in &end.cpu_times {
        if cpu.is_some_and(|c| c != *id) {
            continue;
        }
        let &(b0, t0) = start.cpu_times.get(id)?;
        busy += b1.saturating_sub(b0);
        total += t1.saturating_sub(t0);
    }
    (total > 0).then(|| busy as f64 / total as f64)
}

/// Builds the report of a window.
pub fn build(
    raw: &RawProfile,
    start: &HostSnapshot,
    end: &HostSnapshot,
    duration: Duration,
    hz: u64,
    clock: &Clock,
) -> UseReport {
    let secs = duration.as_secs_f64().max(1e-9);
    let expected_ticks = (hz as f64 * secs).max(1.0);

    // CPU: busy ticks over the ticks the window should have had. An idle
    // CPU in a tickless VM may take no tick at all, so the count of ticks
    // seen is not the denominator.
    let per_cpu: Vec<CpuUtil> = raw
        .cpu_ids
        .iter()
        .map(|&cpu| {
            let busy = raw.cpu_busy_ticks.get(cpu as usize).copied().unwrap_or(0) as f64;
            CpuUtil {
                cpu,
                utilization: (busy / expected_ticks).min(1.0),
                utilization_proc_stat: proc_stat_busy(start, end, Some(cpu)),
            }
        })
        .collect();
    let utilization = if per_cpu.is_empty() {
        0.0
    } else {
        per_cpu.iter().map(|c| c.utilization).sum::<f64>() / per_cpu.len() as f64
    };
    let missing = |sig: &str| raw.unavailable.iter().any(|u| u.signal == sig);

    let runqueue_latency_us = (!missing("runqueue_latency")).then(|| {
        let total = sum_rows(&raw.runq_latency, LATENCY_SLOTS as usize);
        let max = raw.runq_latency_max_us;
        // A bucket's bound can exceed the longest wait seen: clamp to it.
        let q = |p: f64| quantile(&total, p).min(max);
        Latency {
            count: total.iter().sum(),
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            max,
            histogram: log2_buckets(&total),
            per_cpu: raw
                .cpu_ids
                .iter()
                .filter_map(|&cpu| {
                    let h = raw.runq_latency.get(cpu as usize)?;
                    Some(CpuLatency {
                        cpu,
                        count: h.iter().sum(),
                        p50: quantile(h, 0.5),
                        p99: quantile(h, 0.99),
                        histogram: log2_buckets(h),
                    })
                })
                .collect(),
        }
    });
    let runqueue_depth = (!missing("runqueue_depth")).then(|| {
        let h = sum_rows(
            &raw.runq_depth,
            profiler_common::sched::DEPTH_SLOTS as usize,
        );
        let samples: u64 = h.iter().sum();
        let weighted: u64 = h.iter().enumerate().map(|(d, &c)| d as u64 * c).sum();
        let last = h.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
        Depth {
            samples,
            mean: if samples == 0 {
                0.0
            } else {
                weighted as f64 / samples as f64
            },
            max: last.saturating_sub(1) as u64,
            histogram: h[..last]
                .iter()
                .enumerate()
                .map(|(d, &count)| Bucket {
                    le: d as u64,
                    count,
                })
                .collect(),
            field: format!("rq.cfs.{}", raw.depth_field.unwrap_or("?")),
        }
    });

    let kb = |s: &HostSnapshot, k: &str| s.meminfo.get(k).copied();
    let total_kb = kb(end, "MemTotal");
    let available_kb = kb(end, "MemAvailable");
    let mem_util = match (total_kb, available_kb) {
        (Some(t), Some(a)) if t > 0 => Some(1.0 - a as f64 / t as f64),
        _ => None,
    };
    let stall = match (start.memory_stall_us, end.memory_stall_us) {
        (Some(a), Some(b)) => Some(((b.saturating_sub(a)) as f64 / 1e6 / secs).min(1.0)),
        _ => None,
    };
    let memory = Memory {
        utilization: mem_util,
        total_kb,
        available_kb,
        pressure_stall_ratio: stall,
        oom_kills: raw.oom_kills.iter().map(|k| oom_record(k, clock)).collect(),
        kernel_oom_kill_count: match (start.oom_kill, end.oom_kill) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
        major_faults_per_s: raw.counted.map(|c| c.major_faults as f64 / secs),
        source: "utilization: /proc/meminfo (1 - MemAvailable/MemTotal) at the end; saturation: /proc/pressure/memory \
                 (share of the window with a task stalled on memory), major page faults (a counting perf event per CPU); \
                 errors: OOM kills traced by oom:mark_victim"
            .into(),
    };

    let delta = |m: &str,
                 a: &std::collections::HashMap<String, i64>,
                 b: &std::collections::HashMap<String, i64>|
     -> Option<i64> { Some(b.get(m)? - a.get(m)?) };
    let mut conns: Vec<RetransConn> = raw
        .retransmits
        .iter()
        .map(|(k, v)| retrans_conn(k, v, raw.socket_owners.get(&v.owner_tgid), clock))
        .collect();
    conns.sort_by(|a, b| b.count.cmp(&a.count).then(a.first.cmp(&b.first)));
    let rx = end.net.rx_bytes.saturating_sub(start.net.rx_bytes) as f64 / secs;
    let tx = end.net.tx_bytes.saturating_sub(start.net.tx_bytes) as f64 / secs;
    let network = Network {
        tcp_retransmits: raw.counter(profiler_common::counters::Counter::Retransmits),
        retransmits_by_connection: conns,
        retransmit_times: {
            let slice = profiler_common::stacks::TIME_SLICE_NS;
            let origin = (raw.time_origin_ns / slice) as u32;
            raw.retransmit_times
                .iter()
                .map(|&(s, n)| {
                    // Before the start (not expected): at the start.
                    let r = s.wrapping_sub(origin);
                    let r = if r > u32::MAX / 2 { 0 } else { r };
                    [u64::from(r) * slice / 1_000_000, u64::from(n)]
                })
                .collect()
        },
        kernel_retrans_segs: delta("RetransSegs", &start.tcp, &end.tcp),
        kernel_out_segs: delta("OutSegs", &start.tcp, &end.tcp),
        rx_bytes_per_s: rx,
        tx_bytes_per_s: tx,
        utilization: (end.net.speed_mbps > 0).then(|| (rx.max(tx) * 8.0 / (end.net.speed_mbps as f64 * 1e6)).min(1.0)),
        interface_errors: (end.net.errors + end.net.drops).saturating_sub(start.net.errors + start.net.drops),
        listen_drops: delta("ListenDrops", &start.tcp_ext, &end.tcp_ext),
        connection_failures: match (delta("AttemptFails", &start.tcp, &end.tcp), delta("EstabResets", &start.tcp, &end.tcp)) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        },
        source: "utilization: /proc/net/dev bytes (all interfaces but lo) over /sys/class/net/*/speed; saturation: \
                 TCP retransmits traced by tcp:tcp_retransmit_skb (per connection), beside /proc/net/snmp RetransSegs; \
                 errors: interface errors and drops (/proc/net/dev), ListenDrops, AttemptFails + EstabResets"
            .into(),
    };

    UseReport {
        schema: SCHEMA,
        duration_s: secs,
        cpu: Cpu {
            count: raw.cpus,
            utilization,
            per_cpu,
            utilization_source: format!(
                "cpu-clock ticks at {hz} Hz that found a task other than idle running, over the {expected_ticks:.0} ticks per CPU of the window"
            ),
            utilization_proc_stat: proc_stat_busy(start, end, None),
            runqueue_latency_us,
            runqueue_depth,
            context_switches_per_s: raw.counted.map(|c| c.context_switches as f64 / secs),
            migrations_per_s: raw.counted.map(|c| c.migrations as f64 / secs),
            throttling: throttling::between(start, end),
        },
        memory,
        network,
        unavailable: raw
            .unavailable
            .iter()
            .map(|u| Missing {
                signal: u.signal.into(),
                reason: u.reason.clone(),
            })
            .collect(),
        profiler: None,
        offcpu: None,
        event_loops: None,
        seconds: raw.seconds.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_bounds() {
        // 0-1 us: 50, 2-3 us: 40, 4-7 us: 9, 8-15 us: 1
        let h = [50, 40, 9, 1, 0, 0];
        assert_eq!(quantile(&h, 0.5), 1);
        assert_eq!(quantile(&h, 0.9), 3);
        assert_eq!(quantile(&h, 0.99), 7);
        assert_eq!(quantile(&h, 1.0), 15);
        assert_eq!(quantile(&[0, 0], 0.5), 0);
        assert_eq!(
            log2_buckets(&h),
            vec![
                Bucket { le: 1, count: 50 },
                Bucket { le: 3, count: 40 },
                Bucket { le: 7, count: 9 },
                Bucket { le: 15, count: 1 }
            ]
        );
    }

    #[test]
    fn connections_are_named() {
        let mut key = RetransKey {
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 40000,
            dport: 8080,
            family: 2,
            state: 1,
        };
        key.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        key.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        let v = RetransValue {
            count: 3,
            first_ns: 1,
            last_ns: 2,
            ..Default::default()
        };
        let c = retrans_conn(&key, &v, None, &Clock::now());
        assert_eq!(
            (
                c.saddr.as_str(),
                c.daddr.as_str(),
                c.state.as_str(),
                c.family.as_str()
            ),
            ("127.0.0.1", "10.0.0.2", "ESTABLISHED", "ipv4")
        );
        assert_eq!(c.pid, None);
        let mut k6 = key;
        k6.family = 10;
        k6.saddr = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(retrans_conn(&k6, &v, None, &Clock::now()).saddr, "::1");
    }

    #[test]
    fn clock_formats_rfc3339() {
        let c = Clock::now();
        let s = c.rfc3339(c.mono_ns);
        assert!(s.ends_with('Z') && s.contains('T'), "{s}");
    }
}
