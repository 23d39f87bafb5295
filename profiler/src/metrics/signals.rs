//! What each signal's window adds to the metrics: throttling, off-CPU
//! time, event loops, requests and downstream connections.

use super::*;

impl Metrics {
    /// Adds a window's CPU throttling (labelled by container; `host` for
    /// a cgroup that is none).
    pub fn add_throttling(&mut self, throttling: &[crate::usereport::Throttling]) {
        for t in throttling {
            let l = self.container_label(t.container.as_deref().unwrap_or("host"));
            self.throttled.get_or_create(&l).inc_by(t.throttled_s);
        }
    }

    /// Adds a window's off-CPU seconds, by cause and container.
    pub fn add_offcpu(&mut self, s: &crate::offcpu::OffCpuSummary) {
        for p in &s.by_process {
            let container = self.container_label(&p.container).container;
            for (cause, secs) in &p.by_cause_s.0 {
                if *secs > 0.0 {
                    let l = CauseLabel {
                        cause: cause.to_string(),
                        container: container.clone(),
                    };
                    self.offcpu.get_or_create(&l).inc_by(*secs);
                }
            }
        }
    }

    /// Adds a window's event-loop turns (what each loop thread added in
    /// it) and stalls, labelled by container and thread name.
    pub fn add_loops(
        &mut self,
        raw: &RawProfile,
        container_of: &mut dyn FnMut(u32) -> Option<String>,
    ) {
        let mut labels: HashMap<u32, LoopLabel> = HashMap::new();
        for l in &raw.loops {
            let t = &l.turns;
            let comm = String::from_utf8_lossy(t.comm.split(|b| *b == 0).next().unwrap_or(&[]))
                .into_owned();
            let comm = if self.comms.contains(&comm) || self.comms.len() < MAX_COMM_LABELS {
                self.comms.insert(comm.clone());
                comm
            } else {
                "other".to_string()
            };
            let name = container_of(t.tgid).unwrap_or_else(|| "host".to_string());
            let label = LoopLabel {
                container: self.container_label(&name).container,
                comm,
            };
            // Quarter octaves to the octaves of KernelHistogram.
            let per = profiler_common::loops::SUB_BUCKETS as usize;
            let octaves: Vec<u64> = t
                .hist
                .chunks(per)
                .map(|c| c.iter().map(|&n| u64::from(n)).sum())
                .collect();
            if t.turns > 0 {
                self.loop_turns
                    .get_or_create(&label)
                    .add(&octaves, t.total_ns / 1000);
            }
            labels.insert(l.tid, label);
        }
        for s in &raw.stalls {
            if let Some(l) = labels.get(&s.tid) {
                self.loop_stalls.get_or_create(l).inc();
            }
        }
    }

    /// Adds a window's requests and downstream traffic.
    pub fn add_requests(
        &mut self,
        raw: &RawProfile,
        container_of: &mut dyn FnMut(u32) -> Option<String>,
    ) {
        // Histograms of 1/16 octaves to the octaves of KernelHistogram.
        fn octaves(hist: &[u64]) -> Vec<u64> {
            let mut out = vec![0u64; 40];
            for (slot, &n) in hist.iter().enumerate() {
                let octave = if slot < 16 {
                    (usize::BITS - 1 - slot.max(1).leading_zeros()) as usize
                } else {
                    slot / 16 + 3
                };
                if let Some(o) = out.get_mut(octave) {
                    *o += n;
                }
            }
            out
        }
        for ((tgid, method, route), a) in &raw.routes {
            let name = container_of(*tgid).unwrap_or_else(|| "host".to_string());
            let container = self.container_label(&name).container;
            let route =
                if self.routes_seen.contains(route) || self.routes_seen.len() < MAX_ROUTE_LABELS {
                    self.routes_seen.insert(route.clone());
                    route.clone()
                } else {
                    "other".to_string()
                };
            let label = RouteLabel {
                container: container.clone(),
                route: route.clone(),
                method: method.clone(),
            };
            self.http_duration
                .get_or_create(&label)
                .add(&octaves(&a.hist), a.total_ns / 1000);
            for (code, n) in [
                (
                    "2xx",
                    a.requests - a.errors_4xx - a.errors_5xx - a.redirects,
                ),
                ("3xx", a.redirects),
                ("4xx", a.errors_4xx),
                ("5xx", a.errors_5xx),
            ] {
                if n > 0 {
                    self.http_requests
                        .get_or_create(&RouteCodeLabel {
                            container: container.clone(),
                            route: route.clone(),
                            method: method.clone(),
                            code: code.into(),
                        })
                        .inc_by(n);
                }
            }
        }
        self.conns_open.clear();
        for ((tgid, dest), a) in &raw.destinations {
            let name = container_of(*tgid).unwrap_or_else(|| "host".to_string());
            let container = self.container_label(&name).container;
            let at = format!("{}:{}", dest.0, dest.1);
            let destination =
                if self.dests_seen.contains(&at) || self.dests_seen.len() < MAX_DEST_LABELS {
                    self.dests_seen.insert(at.clone());
                    at
                } else {
                    "other".to_string()
                };
            let label = DestLabel {
                container,
                destination,
                protocol: a
                    .protocol
                    .unwrap_or_else(|| crate::requests::downstream::protocol(&[], dest.1))
                    .to_string(),
            };
            if a.round_trips.requests > 0 {
                self.round_trips
                    .get_or_create(&label)
                    .add(&octaves(&a.round_trips.hist), a.round_trips.total_ns / 1000);
            }
            if a.opened > 0 {
                self.conns_opened.get_or_create(&label).inc_by(a.opened);
            }
            if a.connects.requests > 0 {
                self.connects
                    .get_or_create(&label)
                    .add(&octaves(&a.connects.hist), a.connects.total_ns / 1000);
            }
            for (reason, n) in &a.failure_reasons {
                self.conn_failures
                    .get_or_create(&DestReasonLabel {
                        container: label.container.clone(),
                        destination: label.destination.clone(),
                        protocol: label.protocol.clone(),
                        reason: reason.to_string(),
                    })
                    .inc_by(*n);
            }
            self.conns_open
                .get_or_create(&label)
                .inc_by(a.open_now.max(0));
        }
    }
}
