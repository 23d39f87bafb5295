//! Host-wide counters read from /proc (and the cgroups' `cpu.stat`) at the
//! start and end of a capture, for the USE rows that come from the
//! kernel's own accounting (memory, network throughput and errors, CPU
//! throttling).

use std::{collections::HashMap, fs};

/// What /proc said at one moment.
#[derive(Clone, Debug, Default)]
pub struct HostSnapshot {
    /// /proc/meminfo, in kB.
    pub meminfo: HashMap<String, u64>,
    /// /proc/net/dev totals over interfaces other than `lo`.
    pub net: NetTotals,
    /// /proc/net/snmp `Tcp:` counters.
    pub tcp: HashMap<String, i64>,
    /// /proc/net/netstat `TcpExt:` counters.
    pub tcp_ext: HashMap<String, i64>,
    /// /proc/vmstat `oom_kill` (kernels >= 4.13).
    pub oom_kill: Option<u64>,
    /// /proc/pressure/memory `some` total stall, microseconds (PSI).
    pub memory_stall_us: Option<u64>,
    /// /proc/stat per-CPU times: CPU id -> (busy, total) in clock ticks.
    pub cpu_times: HashMap<u32, (u64, u64)>,
    /// CPU bandwidth control of every cgroup that ran under a quota
    /// (`cpu.stat`), by cgroup path.
    pub cpu_throttling: HashMap<String, crate::cgroups::CpuThrottle>,
}

/// Parses the `cpuN` lines of /proc/stat into (busy, total) ticks; idle and
/// iowait are the idle part, steal is left out of both.
pub fn parse_proc_stat(text: &str) -> HashMap<u32, (u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let id: u32 = f.next()?.strip_prefix("cpu")?.parse().ok()?;
            let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
            if v.len() < 5 {
                return None;
            }
            // user nice system idle iowait irq softirq [steal ...]
            let idle = v[3] + v[4];
            let total: u64 = v.iter().take(7).sum();
            Some((id, (total - idle, total)))
        })
        .collect()
}

/// Interface totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetTotals {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Receive + transmit errors.
    pub errors: u64,
    /// Receive + transmit drops.
    pub drops: u64,
    /// Summed link speed of the interfaces that report one, Mbit/s.
    pub speed_mbps: u64,
}

/// Parses /proc/meminfo into kB values.
pub fn parse_meminfo(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let n = v.split_whitespace().next()?.parse().ok()?;
            Some((k.trim().to_string(), n))
        })
        .collect()
}

/// Parses /proc/net/dev, summing every interface but `lo`.
pub fn parse_net_dev(text: &str) -> NetTotals {
    let mut t = NetTotals::default();
    for line in text.lines().skip(2) {
        let Some((iface, rest)) = line.split_once(':') else {
            continue;
        };
        if iface.trim() == "lo" {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 16 {
            continue;
        }
        t.rx_bytes += v[0];
        t.errors += v[2] + v[10];
        t.drops += v[3] + v[11];
        t.tx_bytes += v[8];
        if let Ok(s) = fs::read_to_string(format!("/sys/class/net/{}/speed", iface.trim()))
            && let Ok(mbps) = s.trim().parse::<i64>()
            && mbps > 0
        {
            t.speed_mbps += mbps as u64;
        }
    }
    t
}

/// Parses the header/value line pairs of /proc/net/snmp and
/// /proc/net/netstat for one prefix (`Tcp`, `TcpExt`).
pub fn parse_pairs(text: &str, prefix: &str) -> HashMap<String, i64> {
    let tag = format!("{prefix}:");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&tag)).collect();
    let mut out = HashMap::new();
    if let [names, values, ..] = lines[..] {
        for (n, v) in names
            .split_whitespace()
            .skip(1)
            .zip(values.split_whitespace().skip(1))
        {
            if let Ok(v) = v.parse() {
                out.insert(n.to_string(), v);
            }
        }
    }
    out
}

/// The `some ... total=` of a PSI file.
pub fn parse_psi_some_total(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with("some"))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// Reads everything now; what a kernel lacks stays empty.
pub fn snapshot() -> HostSnapshot {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    HostSnapshot {
        meminfo: parse_meminfo(&read("/proc/meminfo")),
        net: parse_net_dev(&read("/proc/net/dev")),
        tcp: parse_pairs(&read("/proc/net/snmp"), "Tcp"),
        tcp_ext: parse_pairs(&read("/proc/net/netstat"), "TcpExt"),
        oom_kill: read("/proc/vmstat")
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok()),
        memory_stall_us: parse_psi_some_total(&read("/proc/pressure/memory")),
        cpu_times: parse_proc_stat(&read("/proc/stat")),
        cpu_throttling: crate::cgroups::cpu_throttling(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let m = parse_meminfo(
            "MemTotal:       24576000 kB\nMemAvailable:   20000000 kB\nHugePages_Total:       0\n",
        );
        assert_eq!(m["MemTotal"], 24576000);
        assert_eq!(m["MemAvailable"], 20000000);
        assert_eq!(m["HugePages_Total"], 0);
    }

    #[test]
    fn net_dev_skips_loopback() {
        let text = "Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls carrier compressed\n    lo: 100 1 0 0 0 0 0 0 100 1 0 0 0 0 0 0\n  eth0: 1000 10 1 2 0 0 0 0 500 5 3 4 0 0 0 0\n";
        let t = parse_net_dev(text);
        assert_eq!(
            (t.rx_bytes, t.tx_bytes, t.errors, t.drops),
            (1000, 500, 4, 6)
        );
    }

    #[test]
    fn snmp_pairs() {
        let text = "Ip: Forwarding\nIp: 1\nTcp: RtoAlgorithm ActiveOpens RetransSegs MaxConn\nTcp: 1 25 7 -1\n";
        let t = parse_pairs(text, "Tcp");
        assert_eq!(t["RetransSegs"], 7);
        assert_eq!(t["MaxConn"], -1);
        assert!(parse_pairs(text, "Udp").is_empty());
    }

    #[test]
    fn proc_stat() {
        let t = parse_proc_stat(
            "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 5 0 5 40 0 0 0 3 0 0\ncpu1 5 0 5 30 10 0 0\nintr 1 2\n",
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t[&0], (10, 50));
        assert_eq!(t[&1], (10, 50));
    }

    #[test]
    fn psi() {
        assert_eq!(
            parse_psi_some_total(
                "some avg10=0.00 avg60=0.00 avg300=0.00 total=1234\nfull avg10=0 total=5\n"
            ),
            Some(1234)
        );
        assert_eq!(parse_psi_some_total(""), None);
    }
}
