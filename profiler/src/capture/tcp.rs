//! TCP retransmits, loader side: the retransmit and socket-owner
//! tracepoints (layouts from tracefs), the owners' names and cgroups read
//! while they live, and per-window connection counts.
//! Kernel side: `profiler-ebpf/src/tcp.rs`; shared types:
//! `profiler_common::tcp`.

use super::kernel::Closing;
use std::collections::{BTreeMap, HashMap};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use profiler_common::tcp::{self, RetransKey, RetransValue, SliceCount, field};

use super::{
    CaptureError, Setup, Signal,
    kernel::{
        Ring, Tracepoints, batch_read, drain_ring, possible_cpus, take_map, take_percpu_array,
        take_ring,
    },
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
    retrans: Option<BpfHashMap<MapData, RetransKey, RetransValue>>,
    /// Owners read since the last window.
    owners: HashMap<u32, OwnerInfo>,
    /// [`tcp::RETRANS_TIMES`], read at each tick.
    times_map: Option<MapData>,
    /// Each CPU's slots as last read (`[slot * ncpus + cpu]`).
    seen: Vec<SliceCount>,
    /// Retransmits per slice since the last window.
    times: BTreeMap<u32, u32>,
    ncpus: usize,
}

impl Signal for Tcp {
    fn configure(&mut self, setup: &mut Setup<'_>) {
        setup
            .sizes
            .push((tcp::SOCK_OWNERS, setup.host().socket_owners()));
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
        self.ncpus = possible_cpus() as usize;
        self.seen = vec![SliceCount::default(); tcp::RETRANS_TIMES.entries as usize * self.ncpus];
        self.times_map = Some(take_percpu_array(ebpf, tcp::RETRANS_TIMES)?);
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

    /// Reads the retransmits per slice (one batch lookup of the array):
    /// what a slot gained since it was last read, or all of it where a
    /// new slice took the slot over.
    fn tick(&mut self) {
        let Some(map) = self.times_map.as_ref() else {
            return;
        };
        let (seen, times, ncpus) = (&mut self.seen, &mut self.times, self.ncpus);
        let read = batch_read(map, ncpus, false, |slot: u32, v: &[SliceCount]| {
            for (cpu, now) in v.iter().enumerate() {
                let Some(was) = seen.get_mut(slot as usize * ncpus + cpu) else {
                    continue;
                };
                let new = if now.slice == was.slice {
                    now.count.saturating_sub(was.count)
                } else {
                    now.count
                };
                *was = *now;
                if new > 0 {
                    *times.entry(now.slice).or_default() += new;
                }
            }
        });
        if let Err(e) = read {
            eprintln!("profiler: warning: cannot read the retransmits' times: {e}");
        }
    }

    fn collect(
        &mut self,
        _ebpf: &mut Ebpf,
        out: &mut RawProfile,
        drain: bool,
    ) -> Result<(), CaptureError> {
        self.tick();
        out.retransmit_times = if drain {
            std::mem::take(&mut self.times).into_iter().collect()
        } else {
            self.times.iter().map(|(&s, &n)| (s, n)).collect()
        };
        out.socket_owners = std::mem::take(&mut self.owners);
        let Some(retrans) = self.retrans.as_mut() else {
            return Ok(());
        };
        let mut keys = Vec::new();
        for item in retrans.iter() {
            let Ok((key, v)) = item else { continue };
            if drain {
                keys.push(key);
            }
            if v.count > 0 {
                out.retransmits.push((key, v));
            }
        }
        for key in keys {
            // Gone already: nothing to empty.
            let _ = retrans.remove(&key);
        }
        Ok(())
    }

    fn detach(&mut self, ebpf: &mut Ebpf, closing: &mut Closing) -> Vec<CaptureError> {
        self.tracepoints.detach(ebpf, closing)
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
