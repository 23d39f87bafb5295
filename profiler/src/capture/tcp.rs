//! TCP retransmits, loader side: the retransmit and socket-owner
//! tracepoints (layouts from tracefs), the owners' names and cgroups read
//! while they live, and per-window connection counts summed over CPUs.
//! Kernel side: `profiler-ebpf/src/tcp.rs`; shared types:
//! `profiler_common::tcp`.

use std::collections::HashMap;

use aya::{
    Ebpf,
    maps::{MapData, PerCpuHashMap},
};
use profiler_common::tcp::{self, RetransKey, RetransValue, field};

use super::{
    CaptureError, Setup, Signal,
    kernel::{Ring, Tracepoints, drain_ring, take_map, take_ring},
};
use crate::{
    model::{MAX_SOCKET_OWNERS, OwnerInfo, RawProfile},
    procs::ProcessTable,
    tracefs::Format,
};

const RETRANSMITS: &str = "tcp_retransmits";
const SYNACK: &str = "tcp_synack_retransmits";
const OWNERS: &str = "tcp_retransmit_owners";

/// The TCP retransmit signal.
#[derive(Default)]
pub struct Tcp {
    tracepoints: Tracepoints,
    owner_events: Option<Ring>,
    retrans: Option<PerCpuHashMap<MapData, RetransKey, RetransValue>>,
    /// Owners read since the last window.
    owners: HashMap<u32, OwnerInfo>,
}

impl Signal for Tcp {
    fn configure(&mut self, setup: &mut Setup<'_>) {
        match Format::read("tcp", "tcp_retransmit_skb") {
            Ok(f) => setup.config.retrans = f.offsets(&field::NAMES),
            Err(reason) => setup.unavailable(RETRANSMITS, reason),
        }
        match Format::read("tcp", "tcp_retransmit_synack") {
            Ok(f) => setup.config.synack = f.offsets(&field::NAMES),
            Err(reason) => setup.unavailable(SYNACK, reason),
        }
        match Format::read("sock", "inet_sock_set_state") {
            Ok(f) => setup.config.sock_owner_sk = f.offset_or_none("skaddr"),
            Err(reason) => setup.unavailable(OWNERS, reason),
        }
    }

    fn attach(&mut self, ebpf: &mut Ebpf, setup: &mut Setup<'_>) -> Result<(), CaptureError> {
        self.owner_events = Some(take_ring(ebpf, tcp::OWNER_EVENTS)?);
        self.retrans = Some(take_map(ebpf, tcp::RETRANS)?);
        let programs = [
            (
                RETRANSMITS,
                tcp::PROG_RETRANSMIT,
                &[("tcp", "tcp_retransmit_skb")][..],
            ),
            (
                OWNERS,
                tcp::PROG_SOCK_OWNER,
                &[
                    ("sock", "inet_sock_set_state"),
                    ("sock", "sock_send_length"),
                ][..],
            ),
            (
                SYNACK,
                tcp::PROG_RETRANSMIT_SYNACK,
                &[("tcp", "tcp_retransmit_synack")][..],
            ),
        ];
        for (signal, prog, points) in programs {
            if setup.is_unavailable(signal) {
                continue;
            }
            // sock_send_length (6.3+) only adds owners; the others are
            // needed.
            self.tracepoints
                .attach(ebpf, setup, signal, prog, points, &["sock_send_length"])?;
        }
        Ok(())
    }

    fn rings(&self) -> Vec<&Ring> {
        self.owner_events.iter().collect()
    }

    fn drain(&mut self, _procs: &mut ProcessTable) {
        let owners = &mut self.owners;
        if let Some(ring) = self.owner_events.as_mut() {
            drain_ring(ring, |tgid: u32| {
                if owners.len() < MAX_SOCKET_OWNERS && !owners.contains_key(&tgid) {
                    owners.insert(tgid, crate::procs::owner_info(tgid));
                }
            });
        }
    }

    fn collect(
        &mut self,
        _ebpf: &mut Ebpf,
        out: &mut RawProfile,
        drain: bool,
    ) -> Result<(), CaptureError> {
        out.socket_owners = std::mem::take(&mut self.owners);
        let Some(retrans) = self.retrans.as_mut() else {
            return Ok(());
        };
        let mut keys = Vec::new();
        for item in retrans.iter() {
            let Ok((key, per_cpu)) = item else { continue };
            if drain {
                keys.push(key);
            }
            let mut total = RetransValue::default();
            for v in per_cpu.iter() {
                if v.count == 0 {
                    continue;
                }
                if total.count == 0 || v.first_ns < total.first_ns {
                    total.first_ns = v.first_ns;
                }
                total.last_ns = total.last_ns.max(v.last_ns);
                total.count += v.count;
                if total.owner_tgid == 0 {
                    total.owner_tgid = v.owner_tgid;
                    total.owner_cgroup = v.owner_cgroup;
                    total.owner_comm = v.owner_comm;
                }
            }
            if total.count > 0 {
                out.retransmits.push((key, total));
            }
        }
        for key in keys {
            // Gone already: nothing to empty.
            let _ = retrans.remove(&key);
        }
        Ok(())
    }

    fn detach(&mut self, ebpf: &mut Ebpf) -> Vec<CaptureError> {
        self.tracepoints.detach(ebpf)
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::tcp::field;

    #[test]
    fn field_names_match_their_indexes() {
        assert_eq!(field::NAMES[field::SKADDR], "skaddr");
        assert_eq!(field::NAMES[field::STATE], "state");
        assert_eq!(field::NAMES[field::DADDR6], "daddr_v6");
    }
}
