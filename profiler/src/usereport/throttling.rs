//! CPU throttling of the cgroups that ran under a CPU quota: what their
//! `cpu.stat` counted between the window's two host snapshots.

use serde::Serialize;

use crate::hostsnap::HostSnapshot;

/// CPU throttling of one cgroup over the window (its `cpu.stat`).
#[derive(Clone, Debug, Serialize)]
pub struct Throttling {
    /// The container the cgroup is, or null when it is none.
    pub container: Option<String>,
    /// The cgroup's path in the CPU hierarchy.
    pub cgroup: String,
    /// Enforcement periods in which it ran.
    pub periods: u64,
    /// Of those, periods in which it hit its quota.
    pub throttled_periods: u64,
    /// Time its tasks waited for the next period, seconds.
    pub throttled_s: f64,
}

/// The cgroups throttled between two snapshots, most throttled first
/// (share of periods, then time).
pub(super) fn between(start: &HostSnapshot, end: &HostSnapshot) -> Vec<Throttling> {
    let mut out: Vec<Throttling> = end
        .cpu_throttling
        .iter()
        .filter_map(|(path, b)| {
            let a = start.cpu_throttling.get(path).copied().unwrap_or_default();
            let periods = b.periods.checked_sub(a.periods)?;
            (periods > 0).then(|| Throttling {
                container: crate::containers::from_cgroup(path).map(|c| c.label()),
                cgroup: path.clone(),
                periods,
                throttled_periods: b.throttled_periods.saturating_sub(a.throttled_periods),
                throttled_s: b.throttled_us.saturating_sub(a.throttled_us) as f64 / 1e6,
            })
        })
        .collect();
    let share = |t: &Throttling| t.throttled_periods as f64 / t.periods as f64;
    out.sort_by(|x, y| {
        share(y)
            .total_cmp(&share(x))
            .then(y.throttled_s.total_cmp(&x.throttled_s))
            .then(x.cgroup.cmp(&y.cgroup))
    });
    out
}
