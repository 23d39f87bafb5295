//! Counted events: context switches, CPU migrations and major page faults
//! on every online CPU, counted (not sampled) by the kernel's software perf
//! events, opened with `perf_event_open` through perf-event-open-sys (aya
//! opens only sampling events). No kernel program: the kernel counts, the
//! loader reads each counter's total at every window.

use super::kernel::Closing;
use std::{
    io::Read,
    os::fd::{FromRawFd, OwnedFd},
};

use aya::Ebpf;
use perf_event_open_sys::{self as sys, bindings};

use super::{CaptureError, Setup, Signal};
use crate::model::{CountedEvents, RawProfile};

const SIGNAL: &str = "counted_events";

/// What is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    ContextSwitches,
    Migrations,
    MajorFaults,
}

impl Event {
    const ALL: [Event; 3] = [
        Event::ContextSwitches,
        Event::Migrations,
        Event::MajorFaults,
    ];

    fn config(self) -> u64 {
        u64::from(match self {
            Event::ContextSwitches => bindings::PERF_COUNT_SW_CONTEXT_SWITCHES,
            Event::Migrations => bindings::PERF_COUNT_SW_CPU_MIGRATIONS,
            Event::MajorFaults => bindings::PERF_COUNT_SW_PAGE_FAULTS_MAJ,
        })
    }
}

/// One counter: an event on a CPU, and its total at the last window.
struct Counter {
    event: Event,
    file: std::fs::File,
    last: u64,
}

/// The counted-events signal.
#[derive(Default)]
pub struct Counted {
    counters: Vec<Counter>,
}

/// Opens a counting software event on one CPU, for every task.
fn open(event: Event, cpu: u32) -> std::io::Result<std::fs::File> {
    let mut attr = bindings::perf_event_attr {
        type_: bindings::PERF_TYPE_SOFTWARE,
        size: std::mem::size_of::<bindings::perf_event_attr>() as u32,
        config: event.config(),
        ..Default::default()
    };
    // SAFETY: a valid attr for the call's duration; pid -1 with a CPU
    // counts every task on that CPU.
    let fd = unsafe {
        sys::perf_event_open(
            &mut attr,
            -1,
            cpu as i32,
            -1,
            u64::from(bindings::PERF_FLAG_FD_CLOEXEC),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us, owned from here on.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A counter's total so far (a counting event reads as one u64).
fn total(file: &mut std::fs::File) -> std::io::Result<u64> {
    let mut buf = [0u8; 8];
    file.read_exact(&mut buf)?;
    Ok(u64::from_ne_bytes(buf))
}

impl Signal for Counted {
    fn configure(&mut self, _setup: &mut Setup<'_>) {}

    fn attach(&mut self, _ebpf: &mut Ebpf, setup: &mut Setup<'_>) -> Result<(), CaptureError> {
        for &cpu in setup.cpus {
            for event in Event::ALL {
                match open(event, cpu) {
                    Ok(file) => self.counters.push(Counter {
                        event,
                        file,
                        last: 0,
                    }),
                    Err(e) => {
                        self.counters.clear();
                        setup.unavailable(
                            SIGNAL,
                            format!("perf_event_open of a {event:?} counter on CPU {cpu}: {e}"),
                        );
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    fn collect(
        &mut self,
        _ebpf: &mut Ebpf,
        out: &mut RawProfile,
        _drain: bool,
    ) -> Result<(), CaptureError> {
        if self.counters.is_empty() {
            return Ok(());
        }
        let mut counted = CountedEvents::default();
        for c in &mut self.counters {
            let now = total(&mut c.file)?;
            let d = now.saturating_sub(c.last);
            c.last = now;
            match c.event {
                Event::ContextSwitches => counted.context_switches += d,
                Event::Migrations => counted.migrations += d,
                Event::MajorFaults => counted.major_faults += d,
            }
        }
        out.counted = Some(counted);
        Ok(())
    }

    fn detach(&mut self, _ebpf: &mut Ebpf, _closing: &mut Closing) -> Vec<CaptureError> {
        // Closing the descriptors ends the counting.
        self.counters.clear();
        Vec::new()
    }
}
