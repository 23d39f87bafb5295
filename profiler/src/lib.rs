//! `profiler`: a kernel-level profiler for Linux hosts.
//!
//! The pipeline, one module per stage (see ARCHITECTURE.md):
//! [`capture`] (eBPF + loader) -> [`procmaps`]/[`procs`] (normalize) ->
//! [`symbolize`] -> [`fold`] -> [`render`] / [`pprof`] / [`metrics`].
//! [`record`] drives it for the one-shot `profiler record`, [`daemon`] in
//! consecutive windows for `profiler daemon`; [`containers`] names the
//! container of each process.

pub mod capture;
pub mod cgroups;
pub mod cli;
pub mod containers;
pub mod daemon;
pub mod diff;
pub mod fold;
#[cfg(test)]
mod golden;
pub mod hostsnap;
pub mod jitcfi;
pub mod jitdump;
pub mod kbtf;
pub mod loops;
pub mod metrics;
pub mod model;
pub mod offcpu;
pub mod output;
pub mod perfmap;
pub mod pprof;
pub mod preflight;
pub mod privs;
pub mod procmaps;
pub mod procs;
pub mod record;
pub mod render;
pub mod replay;
pub mod report;
pub mod requests;
pub mod selfcost;
pub mod status;
pub mod symbolize;
pub mod symreport;
pub mod tracefs;
pub mod unwind;
pub mod usereport;
