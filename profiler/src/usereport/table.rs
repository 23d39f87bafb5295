//! The USE table printed on stderr, and events.jsonl: the report in
//! words and in lines for log pipelines.

use serde::Serialize;

use super::UseReport;

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{} ms", v / 1000)
    } else {
        format!("{v} µs")
    }
}

fn rate(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.1} MB/s", b / 1e6)
    } else {
        format!("{:.1} kB/s", b / 1e3)
    }
}

/// The table `record` prints: one line per resource, words first.
pub fn render_table(r: &UseReport) -> String {
    let mut out = format!("USE summary: {:.1} s, {} CPUs\n", r.duration_s, r.cpu.count);
    for [name, u, s, e] in table_rows(r) {
        out.push_str(&format!(
            "  {name:<8} U: {u}\n  {:<8} S: {s}\n  {:<8} E: {e}\n",
            "", ""
        ));
    }
    for line in table_notes(r) {
        out.push_str(&line);
    }
    out
}

/// The USE table's rows: resource, utilization, saturation, errors, in
/// words.
pub fn table_rows(r: &UseReport) -> [[String; 4]; 3] {
    let cpu_u = {
        let parts: Vec<String> = r
            .cpu
            .per_cpu
            .iter()
            .take(8)
            .map(|c| format!("cpu{} {}", c.cpu, pct(c.utilization)))
            .collect();
        let mut u = format!("{} busy ({})", pct(r.cpu.utilization), parts.join(", "));
        if let Some(k) = r.cpu.utilization_proc_stat
            && (k - r.cpu.utilization).abs() > 0.1
        {
            u.push_str(&format!(
                "; {} by the kernel's accounting (/proc/stat): sampling misses ticks when CPUs flip between idle and busy",
                pct(k)
            ));
        }
        u
    };
    let mut cpu_s = Vec::new();
    if let Some(l) = &r.cpu.runqueue_latency_us {
        cpu_s.push(format!(
            "run-queue wait p50 {}, p99 {}, max {}",
            us(l.p50),
            us(l.p99),
            us(l.max)
        ));
    }
    if let Some(d) = &r.cpu.runqueue_depth {
        cpu_s.push(format!(
            "{:.2} tasks waiting per CPU (max {})",
            d.mean, d.max
        ));
    }
    for t in r
        .cpu
        .throttling
        .iter()
        .filter(|t| t.throttled_periods > 0)
        .take(2)
    {
        cpu_s.push(format!(
            "{} throttled {:.0}% of its periods ({:.1} s waiting for quota)",
            t.container.as_deref().unwrap_or(&t.cgroup),
            t.throttled_periods as f64 * 100.0 / t.periods as f64,
            t.throttled_s
        ));
    }
    if let (Some(cs), Some(m)) = (r.cpu.context_switches_per_s, r.cpu.migrations_per_s) {
        cpu_s.push(format!("{cs:.0} context switches/s, {m:.0} migrations/s"));
    }
    if cpu_s.is_empty() {
        cpu_s.push("unavailable".into());
    }
    let mem_u = match (r.memory.utilization, r.memory.total_kb) {
        (Some(u), Some(t)) => format!("{} used of {:.1} GiB", pct(u), t as f64 / 1024.0 / 1024.0),
        _ => "unknown".into(),
    };
    let ooms = r.memory.oom_kills.len();
    let mut mem_s = match r.memory.pressure_stall_ratio {
        Some(p) => format!("stalled {:.1}% of the time (PSI); ", p * 100.0),
        None => String::new(),
    };
    if let Some(f) = r.memory.major_faults_per_s {
        mem_s.push_str(&format!("{f:.0} major faults/s; "));
    }
    mem_s.push_str(&format!("{ooms} OOM kills"));
    let mem_e = if ooms == 0 {
        "no OOM kills".to_string()
    } else {
        let names: Vec<String> = r
            .memory
            .oom_kills
            .iter()
            .take(3)
            .map(|k| format!("{} (pid {})", k.comm, k.pid))
            .collect();
        format!("{ooms} OOM kills: {}", names.join(", "))
    };
    let n = &r.network;
    let net_u = match n.utilization {
        Some(u) => format!(
            "{} in, {} out ({} of link)",
            rate(n.rx_bytes_per_s),
            rate(n.tx_bytes_per_s),
            pct(u)
        ),
        None => format!(
            "{} in, {} out",
            rate(n.rx_bytes_per_s),
            rate(n.tx_bytes_per_s)
        ),
    };
    let net_s = match (n.kernel_out_segs, n.kernel_retrans_segs) {
        (Some(out), Some(_)) if out > 0 => format!(
            "{} TCP retransmits ({:.2}% of segments sent)",
            n.tcp_retransmits,
            100.0 * n.tcp_retransmits as f64 / out as f64
        ),
        _ => format!("{} TCP retransmits", n.tcp_retransmits),
    };
    let net_e = format!(
        "{} interface errors/drops, {} listen drops, {} failed/reset connections",
        n.interface_errors,
        n.listen_drops.map_or("?".into(), |v| v.to_string()),
        n.connection_failures.map_or("?".into(), |v| v.to_string())
    );
    [
        ["CPU".into(), cpu_u, cpu_s.join("; "), "-".to_string()],
        ["Memory".into(), mem_u, mem_s, mem_e],
        ["Network".into(), net_u, net_s, net_e],
    ]
}

/// The lines under the USE table: off-CPU, event loops, the top
/// retransmitter, what was not collected (each ends in a newline).
pub fn table_notes(r: &UseReport) -> Vec<String> {
    let n = &r.network;
    let mut out = Vec::new();
    if let Some(o) = &r.offcpu {
        out.push(crate::offcpu::render_line(o));
    }
    if let Some(l) = &r.event_loops {
        out.push(crate::loops::render_line(l));
    }
    if let Some(c) = n.retransmits_by_connection.first() {
        out.push(format!(
            "  top retransmitter: {}:{} -> {}:{} {} x{}{}\n",
            c.saddr,
            c.sport,
            c.daddr,
            c.dport,
            c.state,
            c.count,
            c.comm
                .as_ref()
                .map(|m| format!(" ({m}, pid {})", c.pid.unwrap_or(0)))
                .unwrap_or_default()
        ));
    }
    for m in &r.unavailable {
        out.push(format!("  unavailable: {}: {}\n", m.signal, m.reason));
    }
    out
}

/// Lines of events.jsonl: one per OOM kill and one per retransmitting
/// connection, in time order.
pub fn events_jsonl(r: &UseReport) -> Vec<String> {
    #[derive(Serialize)]
    struct Ev<'a, T: Serialize> {
        event: &'static str,
        time: &'a str,
        #[serde(flatten)]
        data: &'a T,
    }
    let mut lines: Vec<(String, String)> = Vec::new();
    for k in &r.memory.oom_kills {
        let l = serde_json::to_string(&Ev {
            event: "oom_kill",
            time: &k.time,
            data: k,
        })
        .unwrap_or_default();
        lines.push((k.time.clone(), l));
    }
    for c in &r.network.retransmits_by_connection {
        let l = serde_json::to_string(&Ev {
            event: "tcp_retransmits",
            time: &c.first,
            data: c,
        })
        .unwrap_or_default();
        lines.push((c.first.clone(), l));
    }
    lines.sort();
    lines.into_iter().map(|(_, l)| l).collect()
}
