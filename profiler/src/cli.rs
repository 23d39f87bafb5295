//! Command-line interface.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

/// Kernel-level profiler for Linux hosts: on-CPU flame graphs from eBPF.
#[derive(Debug, Parser)]
#[command(name = "profiler", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Capture a profile once: folded stacks and a flame graph.
    Record(RecordArgs),
}

/// Options of `profiler record`.
#[derive(Debug, Args, Clone)]
pub struct RecordArgs {
    /// Samples per second on each CPU.
    #[arg(
        short = 'F',
        long = "frequency",
        value_name = "HZ",
        default_value_t = 99
    )]
    pub frequency: u64,

    /// How long to capture: 10, 10s, 2m, 1h, 500ms (default: until Ctrl-C,
    /// or until the command or every -p process exits).
    #[arg(short = 'd', long = "duration", value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Profile only this process and all its threads (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Directory for the outputs (default: a new ./profile-<timestamp>/).
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// How user stacks are walked: `fp` (frame pointers, in the kernel),
    /// `dwarf` (the binaries' CFI on a copied stack, in userspace, frame
    /// pointers where no CFI covers an address), `auto` (as dwarf).
    #[arg(long = "unwind", value_enum, default_value = "auto")]
    pub unwind: crate::unwind::UnwindMode,

    /// Most bytes of user stack copied per sample for dwarf/auto
    /// unwinding: 4096 to 32768, in whole pages, counted from the page
    /// holding the stack pointer (only the pages up to the stack's top are
    /// copied). Deeper stacks are cut, and counted as truncated.
    #[arg(long = "stack-bytes", value_name = "BYTES", default_value_t = 32768, value_parser = parse_stack_bytes)]
    pub stack_bytes: u32,

    /// Collect only the USE signals (run queues, retransmits, OOM kills,
    /// utilization): no stacks, no flame graph, the lowest overhead.
    #[arg(long = "no-stacks")]
    pub no_stacks: bool,

    /// Start this command and profile it (and its children) until it exits.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl RecordArgs {
    /// Whether stacks are taken.
    pub fn stacks(&self) -> bool {
        !self.no_stacks
    }
}

/// Parses `--stack-bytes`: a multiple of 4096 from 4096 to 32768.
pub fn parse_stack_bytes(s: &str) -> Result<u32, String> {
    let v: u32 = s.trim().parse().map_err(|_| {
        format!("invalid byte count {s:?}: use a multiple of 4096 from 4096 to 32768")
    })?;
    if !(4096..=32768).contains(&v) || !v.is_multiple_of(4096) {
        return Err(format!(
            "--stack-bytes {v}: use a multiple of 4096 from 4096 to 32768"
        ));
    }
    Ok(v)
}

/// Parses `10`, `10s`, `2m`, `1h`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num.parse().map_err(|_| {
        format!(
            "invalid duration {s:?}: use a number with an optional unit, e.g. 10, 10s, 2m, 500ms"
        )
    })?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" | "" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {s:?}: use ms, s, m or h"
            ));
        }
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("duration must be positive (got {s:?})"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("10d").is_err());
        assert!(parse_duration("").is_err());
    }
}
