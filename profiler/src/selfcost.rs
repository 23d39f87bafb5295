//! What the profiler itself costs, measured in every run: the kernel time
//! of its eBPF programs (BPF_ENABLE_STATS, held by the capture for its life
//! only), its userspace CPU time and its memory, each as a share of the
//! machine over the same interval.

use serde::Serialize;

/// Cumulative figures at one instant.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    /// Per program: name, run time ns, runs.
    pub programs: Vec<(String, u64, u64)>,
    /// User + system CPU seconds of this process.
    pub cpu_s: f64,
}

impl Reading {
    /// Reads the figures now: `bpf` from [`crate::capture::Capture::bpf_stats`].
    pub fn now(bpf: &[(String, u64, u64)]) -> Self {
        Reading {
            programs: bpf.to_vec(),
            cpu_s: crate::metrics::own_usage().map_or(0.0, |u| u.0),
        }
    }

    /// Run time (ns) and runs of all the programs.
    fn bpf_totals(&self) -> (u64, u64) {
        self.programs
            .iter()
            .fold((0, 0), |(ns, n), p| (ns + p.1, n + p.2))
    }
}

/// The cost over an interval (use.json's `profiler`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SelfCost {
    /// Seconds the eBPF programs ran in the kernel (null when the kernel's
    /// statistics could not be enabled: they need CAP_SYS_ADMIN).
    pub bpf_run_time_s: Option<f64>,
    /// Program runs.
    pub bpf_runs: Option<u64>,
    /// Mean cost of one run, ns.
    pub bpf_ns_per_run: Option<f64>,
    /// Userspace CPU seconds (user + system) of the profiler.
    pub user_cpu_s: f64,
    /// Kernel-side plus userspace CPU time as a share of all CPUs' time.
    pub share_of_cpu: f64,
    /// Peak resident memory, bytes.
    pub peak_rss_bytes: u64,
    /// Peak RSS as a share of the machine's memory.
    pub share_of_memory: f64,
    /// Per program that ran: kernel cost per run (empty without the
    /// statistics).
    pub programs: Vec<ProgramCost>,
    /// Where the start's time went, ms (`record`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_ms: Option<std::collections::BTreeMap<&'static str, f64>>,
    /// Every CPU sample the kernel took, and where each went (`record`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<SampleAccount>,
}

/// The CPU samples' books: `taken` = `kept` + every `lost_*`. `kept` is
/// what the stacks (stacks.folded, the flame graph) hold, less the
/// profiler's own samples when it ran a command.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SampleAccount {
    /// Samples the kernel took (after the pid filter).
    pub taken: u64,
    /// Samples in the captured stacks.
    pub kept: u64,
    /// Lost in the kernel's count map (full), or past `--max-stacks`.
    pub lost_count_map: u64,
    /// Stack copies lost: their ring buffer was full.
    pub lost_ring: u64,
    /// Stacks sent aside (`--unwind fp` collisions) past `--max-stacks`.
    pub lost_sent_aside: u64,
}

impl SampleAccount {
    /// The books of a capture.
    pub fn of(raw: &crate::model::RawProfile) -> Self {
        use profiler_common::counters::Counter;
        SampleAccount {
            taken: raw.counter(Counter::Samples),
            kept: raw.stacks.iter().map(|s| s.count).sum(),
            lost_count_map: raw.counter(Counter::CountMapFull),
            lost_ring: raw.counter(Counter::StackCopiesLost),
            lost_sent_aside: raw
                .unwind
                .as_ref()
                .filter(|u| u.samples == 0)
                .map_or(0, |u| u.dropped),
        }
    }

    /// Samples taken that are neither kept nor counted lost (0 when the
    /// books balance).
    pub fn unaccounted(&self) -> i64 {
        self.taken as i64
            - (self.kept + self.lost_count_map + self.lost_ring + self.lost_sent_aside) as i64
    }
}

/// One eBPF program's cost over the interval.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ProgramCost {
    /// Program name (`sample_stack`: per sample; `sched_switch`,
    /// `sched_wakeup`: per scheduler event).
    pub name: String,
    /// Runs.
    pub runs: u64,
    /// Mean ns per run.
    pub ns_per_run: f64,
}

/// The cost between two readings over `elapsed` seconds on `cpus` CPUs.
pub fn between(
    start: &Reading,
    end: &Reading,
    elapsed_s: f64,
    cpus: usize,
    stats_on: bool,
) -> SelfCost {
    let ((ns0, n0), (ns1, n1)) = (start.bpf_totals(), end.bpf_totals());
    let bpf_s = ns1.saturating_sub(ns0) as f64 / 1e9;
    let runs = n1.saturating_sub(n0);
    let user = (end.cpu_s - start.cpu_s).max(0.0);
    let machine = (elapsed_s * cpus.max(1) as f64).max(1e-9);
    let peak = peak_rss_bytes();
    let mem = mem_total_bytes().max(1);
    let programs = if stats_on {
        end.programs
            .iter()
            .filter_map(|(name, ns, n)| {
                let (ns0, n0) = start
                    .programs
                    .iter()
                    .find(|p| p.0 == *name)
                    .map_or((0, 0), |p| (p.1, p.2));
                let runs = n.saturating_sub(n0);
                (runs > 0).then(|| ProgramCost {
                    name: name.clone(),
                    runs,
                    ns_per_run: ns.saturating_sub(ns0) as f64 / runs as f64,
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    SelfCost {
        programs,
        bpf_run_time_s: stats_on.then_some(bpf_s),
        bpf_runs: stats_on.then_some(runs),
        bpf_ns_per_run: (stats_on && runs > 0).then(|| bpf_s * 1e9 / runs as f64),
        user_cpu_s: user,
        share_of_cpu: (if stats_on { bpf_s } else { 0.0 } + user) / machine,
        peak_rss_bytes: peak,
        share_of_memory: peak as f64 / mem as f64,
        startup_ms: None,
        samples: None,
    }
}

/// One line for a person: what the run cost.
pub fn render(c: &SelfCost) -> String {
    let bpf = match (c.bpf_run_time_s, c.bpf_runs, c.bpf_ns_per_run) {
        (Some(s), Some(n), per) => format!(
            "eBPF {:.1} ms in {n} runs{}",
            s * 1000.0,
            per.map_or(String::new(), |p| format!(" ({p:.0} ns each)"))
        ),
        _ => "eBPF run time not measured (needs CAP_SYS_ADMIN)".to_string(),
    };
    format!(
        "profiler: own cost: {bpf}, userspace {:.2} CPU s; {:.2}% of the machine's CPU time; peak RSS {} MiB ({:.2}% of memory)\n",
        c.user_cpu_s,
        c.share_of_cpu * 100.0,
        c.peak_rss_bytes >> 20,
        c.share_of_memory * 100.0
    )
}

/// Peak resident memory of this process (VmHWM), bytes.
pub fn peak_rss_bytes() -> u64 {
    kib_field("/proc/self/status", "VmHWM") * 1024
}

/// Resident memory now, bytes.
pub fn rss_bytes() -> u64 {
    kib_field("/proc/self/status", "VmRSS") * 1024
}

/// Where memory went, phase by phase (`-v`): each phase's RSS and the
/// peak so far, in MiB.
#[derive(Default)]
pub struct MemoryPhases(Vec<(&'static str, [u64; 4])>);

impl MemoryPhases {
    /// Notes the RSS at the end of `phase`: in all, anonymous (the heap),
    /// file pages (mapped binaries and debug info), and the peak so far.
    pub fn mark(&mut self, phase: &'static str) {
        let status = std::fs::read_to_string("/proc/self/status")
            .map(|s| crate::hostsnap::parse_meminfo(&s))
            .unwrap_or_default();
        let mib = |k: &str| status.get(k).copied().unwrap_or(0) >> 10;
        self.0.push((
            phase,
            [mib("VmRSS"), mib("RssAnon"), mib("RssFile"), mib("VmHWM")],
        ));
    }

    /// One line.
    pub fn render(&self) -> String {
        self.0
            .iter()
            .map(|(p, [rss, anon, file, peak])| {
                format!("{p} {rss} MiB ({anon} anon, {file} file; peak {peak})")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn mem_total_bytes() -> u64 {
    kib_field("/proc/meminfo", "MemTotal") * 1024
}

/// A `Key: N kB` field of a /proc file (0 when unreadable).
fn kib_field(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .map(|s| crate::hostsnap::parse_meminfo(&s))
        .ok()
        .and_then(|m| m.get(key).copied())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_of_the_machine() {
        let a = Reading {
            programs: vec![("sample_stack".into(), 1_000_000, 10)],
            cpu_s: 1.0,
        };
        let b = Reading {
            programs: vec![("sample_stack".into(), 101_000_000, 1010)],
            cpu_s: 1.3,
        };
        let c = between(&a, &b, 10.0, 2, true);
        assert_eq!(c.programs.len(), 1);
        assert_eq!(c.programs[0].runs, 1000);
        assert!((c.programs[0].ns_per_run - 100_000.0).abs() < 1e-6);
        assert_eq!(c.bpf_runs, Some(1000));
        assert!((c.bpf_run_time_s.unwrap() - 0.1).abs() < 1e-9);
        assert!((c.bpf_ns_per_run.unwrap() - 100_000.0).abs() < 1e-6);
        // (0.1 + 0.3) CPU s of 20.
        assert!((c.share_of_cpu - 0.02).abs() < 1e-9, "{c:?}");
        assert!(c.peak_rss_bytes > 0 && c.share_of_memory > 0.0 && c.share_of_memory < 1.0);
        let off = between(&a, &b, 10.0, 2, false);
        assert!(off.programs.is_empty());
        assert_eq!(off.bpf_run_time_s, None);
        assert!((off.share_of_cpu - 0.015).abs() < 1e-9);
        assert!(render(&off).contains("needs CAP_SYS_ADMIN"));
        assert!(render(&c).contains("100000 ns each"), "{}", render(&c));
    }
}
