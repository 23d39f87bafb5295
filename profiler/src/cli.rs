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
    /// Run until SIGTERM, sampling in consecutive windows; serve Prometheus
    /// metrics, pprof profiles, flame graphs and the USE report over HTTP.
    Daemon(DaemonArgs),
    /// Compare two captures: the functions whose share of samples changed
    /// significantly, a differential flame graph, the other figures side
    /// by side, and rules a CI job can gate on (exit 3).
    Diff(DiffArgs),
    /// Unwind and symbolize stack copies saved by `record --save-samples`
    /// on one thread, and say how fast (the replay bench; the processes
    /// must still run).
    #[command(hide = true)]
    Replay(ReplayArgs),
}

/// Options of `profiler replay`.
#[derive(Debug, Args, Clone)]
pub struct ReplayArgs {
    /// The file `record --save-samples` wrote.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// Options of `profiler diff`.
#[derive(Debug, Args, Clone)]
pub struct DiffArgs {
    /// The capture before: a directory `profiler record -o` (or the
    /// daemon) wrote, or a folded stacks file.
    #[arg(value_name = "BEFORE")]
    pub before: PathBuf,

    /// The capture after, the same way.
    #[arg(value_name = "AFTER")]
    pub after: PathBuf,

    /// Exit 3 when this rule fails (repeatable): `NAME>10%` (the share of
    /// samples whose stack holds a frame whose name contains NAME grew by more than 10%
    /// of what it was, and significantly), `any>10%` (any function),
    /// `p99(ROUTE)>10%` (a route's p99 from requests.json, `GET /users/:id`
    /// or `/users/:id`). Without rules: the report only, exit 0.
    #[arg(long = "fail-on", value_name = "RULE")]
    pub fail_on: Vec<crate::diff::Rule>,

    /// Print the comparison as JSON (schema profiler.diff/1) instead of
    /// words.
    #[arg(long = "json")]
    pub json: bool,

    /// Directory for diff.svg (the differential flame graph) and
    /// diff.json; default: the current directory.
    #[arg(short = 'o', long = "output", value_name = "DIR", default_value = ".")]
    pub output: PathBuf,
}

/// What the root frames of the flame graph (and the labels) name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    /// The process name.
    #[default]
    Process,
    /// The container (Docker, containerd, CRI-O, Podman; the ECS name
    /// when the agent gives it), `host` for the rest, then the process.
    Container,
}

/// Options of `profiler daemon`. The shared ones are `record`'s, with the
/// defaults a host-wide daemon wants: 49 Hz, grouped by container.
#[derive(Debug, Args, Clone)]
#[command(
    mut_arg("frequency", |a| a.default_value("49")),
    mut_arg("group_by", |a| a.default_value("container"))
)]
pub struct DaemonArgs {
    /// Sampling, stack walking, grouping and diagnostics.
    #[command(flatten)]
    pub capture: CaptureOptions,

    /// Length of each window (flame graph, use.json, metric gauges).
    #[arg(long = "window", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub window: Duration,

    /// Address for HTTP (/metrics, /debug/pprof/profile, /flamegraph.svg,
    /// /use.json, /healthz). Loopback by default; another address serves
    /// every network that reaches it, so name it deliberately.
    #[arg(
        long = "listen",
        value_name = "ADDR:PORT",
        default_value = "127.0.0.1:9464"
    )]
    pub listen: std::net::SocketAddr,

    /// Write each window's stacks.folded, flamegraph.svg and use.json
    /// into a new directory under DIR.
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// With --output, keep the newest N window directories.
    #[arg(long = "retain", value_name = "N", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    pub retain: u32,

    /// Longest profile one HTTP request may ask for, in seconds.
    #[arg(long = "max-profile-seconds", value_name = "S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub max_profile_seconds: u64,

    /// Time threads off the CPU, by cause (off by default: it traces every
    /// context switch): profiler_offcpu_seconds_total, and each window's
    /// offcpu.folded/svg with --output.
    #[arg(long = "off-cpu")]
    pub off_cpu: bool,

    /// With --off-cpu, blocks shorter than this are summed per cause
    /// without their stacks.
    #[arg(long = "off-cpu-min", value_name = "DURATION", default_value = "1ms", value_parser = parse_duration)]
    pub off_cpu_min: Duration,

    /// Do not time event-loop turns (profiler_event_loop_* metrics,
    /// stalls.folded/svg).
    #[arg(long = "no-event-loops")]
    pub no_event_loops: bool,

    /// An event-loop turn at least this long is a stall.
    #[arg(long = "stall-threshold", value_name = "DURATION", default_value = "50ms", value_parser = parse_duration)]
    pub stall_threshold: Duration,

    /// Do not follow requests and outbound connections (profiler_http_*
    /// and profiler_downstream_* metrics, requests.json).
    #[arg(long = "no-requests")]
    pub no_requests: bool,

    /// The ECS agent's introspection endpoint, for task ARNs and container
    /// names (`none`: do not ask).
    #[arg(long = "ecs-agent", value_name = "ADDR:PORT|none", default_value = crate::containers::ECS_AGENT, value_parser = parse_agent)]
    pub ecs_agent: AgentAddr,
}

/// `--ecs-agent`: where to ask, or nowhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentAddr(pub Option<std::net::SocketAddr>);

/// Parses `--ecs-agent`: an address, or `none`.
pub fn parse_agent(s: &str) -> Result<AgentAddr, BadValue> {
    if s == "none" {
        return Ok(AgentAddr(None));
    }
    s.parse().map(|a| AgentAddr(Some(a))).map_err(|_| {
        BadValue(format!(
            "invalid address {s:?}: use ADDR:PORT (e.g. 127.0.0.1:51678) or none"
        ))
    })
}

/// Options of both `record` and `daemon`: the sampling rate, how stacks
/// are walked, what the root frames name, and the kernel programs'
/// diagnostics. (The daemon changes two defaults, see [`DaemonArgs`].)
#[derive(Debug, Args, Clone)]
pub struct CaptureOptions {
    /// Samples per second on each CPU.
    #[arg(
        short = 'F',
        long = "frequency",
        value_name = "HZ",
        default_value_t = 99
    )]
    pub frequency: u64,

    /// Root frames of the flame graph (and the daemon's labels): the
    /// process, or the container it runs in (then the process).
    #[arg(long = "group-by", value_enum, default_value = "process")]
    pub group_by: GroupBy,

    /// How user stacks are walked: `fp` (frame pointers, in the kernel),
    /// `dwarf` (the binaries' CFI on a copied stack, in userspace, frame
    /// pointers where no CFI covers an address), `auto` (as dwarf).
    #[arg(long = "unwind", value_enum, default_value = "auto")]
    pub unwind: crate::unwind::UnwindMode,

    /// Most bytes of user stack copied per sample for dwarf/auto
    /// unwinding: 4096 to 65536, a multiple of 4096, counted from the
    /// stack pointer (only what lies between it and the stack's top is
    /// copied; for a main thread, up to its first frame, below the
    /// environment). Deeper stacks are cut, and counted as truncated.
    #[arg(long = "stack-bytes", value_name = "BYTES", default_value_t = profiler_common::stacks::STACK_COPY_MAX as u32, value_parser = parse_stack_bytes)]
    pub stack_bytes: u32,

    /// Print the kernel programs' diagnostics (a map that filled up, a
    /// ring that overflowed, each OOM kill) as they happen. Off by
    /// default, and then compiled out of the programs by the verifier.
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,

    /// Lower the profiler's own scheduling priority to this nice value
    /// (0 to 19) once it captures: its userspace work (draining rings,
    /// unwinding) then yields to the services it watches, whose tail
    /// latency it adds to otherwise on a host with few busy CPUs (here,
    /// 2 vCPUs: a Node server's p99 from 0.6 to 3-5 ms at 0, 0.4-1.1 ms
    /// at 10). The kernel programs run as before; a profiler starved of
    /// CPU drains later and may lose events (counted). 0 keeps the
    /// priority it was started with.
    #[arg(long = "nice", value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub nice: i32,
}

/// Options of `profiler record`.
#[derive(Debug, Args, Clone)]
pub struct RecordArgs {
    /// How long to capture: 10, 10s, 2m, 1h, 500ms (default: until Ctrl-C,
    /// or until the command or every -p process exits).
    #[arg(short = 'd', long = "duration", value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Profile only this process and all its threads (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Directory for the outputs (default: a new `./profile-<UTC time>/`).
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// Sampling, stack walking, grouping and diagnostics.
    #[command(flatten)]
    pub capture: CaptureOptions,

    /// Collect only the USE signals (run queues, retransmits, OOM kills,
    /// utilization): no stacks, no flame graph, the lowest overhead.
    #[arg(long = "no-stacks")]
    pub no_stacks: bool,

    /// Most distinct stacks the kernel keeps (its count map; the stack map
    /// holds up to 16384). Past it samples are counted as lost, never
    /// silently dropped.
    #[arg(long = "max-stacks", value_name = "N", default_value_t = profiler_common::stacks::COUNTS.entries, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_stacks: u32,

    /// Also write every user stack copy received to FILE, for `profiler
    /// replay` (the replay bench: unwinding and symbolizing offline).
    #[arg(long = "save-samples", value_name = "FILE", hide = true)]
    pub save_samples: Option<PathBuf>,

    /// Do not time threads off the CPU (offcpu.folded, offcpu.svg and
    /// use.json's `offcpu` are then not written). Also off with
    /// --no-stacks.
    #[arg(long = "no-off-cpu")]
    pub no_off_cpu: bool,

    /// Off-CPU blocks shorter than this are summed per cause without their
    /// stacks (left out of offcpu.folded, kept in the totals): 1ms, 200us,
    /// 0.01 (seconds).
    #[arg(long = "off-cpu-min", value_name = "DURATION", default_value = "1ms", value_parser = parse_duration)]
    pub off_cpu_min: Duration,

    /// Do not time event-loop turns (stalls.folded, stalls.svg and
    /// use.json's `event_loops` are then not written). Also off with
    /// --no-stacks.
    #[arg(long = "no-event-loops")]
    pub no_event_loops: bool,

    /// An event-loop turn (from the return of one epoll wait to the next
    /// call) at least this long is a stall: 50ms, 0.1 (seconds).
    #[arg(long = "stall-threshold", value_name = "DURATION", default_value = "50ms", value_parser = parse_duration)]
    pub stall_threshold: Duration,

    /// Do not follow the requests of accepted connections (requests.json
    /// and the RED block are then not written). Also off with --no-stacks.
    #[arg(long = "no-requests")]
    pub no_requests: bool,

    /// Print no status while capturing (on a terminal a line updated each
    /// second; otherwise a line every 5 s, and events as they happen).
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,

    /// Start this command and profile it (and its children) until it exits.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl RecordArgs {
    /// Whether stacks are taken.
    pub fn stacks(&self) -> bool {
        !self.no_stacks
    }

    /// Whether accepted connections' requests are followed.
    pub fn requests(&self) -> bool {
        !self.no_stacks && !self.no_requests
    }

    /// Whether event-loop turns are timed.
    pub fn event_loops(&self) -> bool {
        !self.no_stacks && !self.no_event_loops
    }

    /// Whether time off the CPU is recorded.
    pub fn off_cpu(&self) -> bool {
        !self.no_stacks && !self.no_off_cpu
    }
}

/// Parses `--stack-bytes`: a multiple of 4096 from 4096 to
/// [`STACK_COPY_MAX`](profiler_common::stacks::STACK_COPY_MAX).
pub fn parse_stack_bytes(s: &str) -> Result<u32, BadValue> {
    const MAX: u32 = profiler_common::stacks::STACK_COPY_MAX as u32;
    let what = format!("use a multiple of 4096 from 4096 to {MAX}");
    let v: u32 = s
        .trim()
        .parse()
        .map_err(|_| BadValue(format!("invalid byte count {s:?}: {what}")))?;
    if !(4096..=MAX).contains(&v) || !v.is_multiple_of(4096) {
        return Err(BadValue(format!("--stack-bytes {v}: {what}")));
    }
    Ok(v)
}

/// Parses a duration: a number of seconds (`10`, `1.5`), or a number with
/// a unit as humantime reads it (`10s`, `2m`, `1h`, `500ms`, `1m 30s`).
pub fn parse_duration(s: &str) -> Result<Duration, BadValue> {
    let s = s.trim();
    let bad = |why: String| {
        BadValue(format!(
            "invalid duration {s:?} ({why}): use seconds or a number with a unit, e.g. 10, 10s, 2m, 500ms"
        ))
    };
    let positive = || BadValue(format!("duration must be positive (got {s:?})"));
    let d = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 => Duration::from_secs_f64(secs),
        Ok(_) => return Err(positive()),
        Err(_) => humantime::parse_duration(s).map_err(|e| bad(e.to_string()))?,
    };
    if d.is_zero() {
        return Err(positive());
    }
    Ok(d)
}

/// A command-line value that cannot be used, and what to use instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadValue(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["profiler", "daemon"]).unwrap();
        let Command::Daemon(d) = cli.command else {
            panic!("not daemon")
        };
        assert!(d.listen.ip().is_loopback(), "default bind is loopback");
        assert_eq!(d.listen.port(), 9464);
        assert_eq!(d.window, Duration::from_secs(60));
        assert_eq!(d.capture.group_by, GroupBy::Container);
        assert_eq!(d.capture.frequency, 49);
        assert!(d.ecs_agent.0.is_some());
        let cli = Cli::try_parse_from([
            "profiler",
            "daemon",
            "--ecs-agent",
            "none",
            "--window",
            "5s",
        ])
        .unwrap();
        let Command::Daemon(d) = cli.command else {
            panic!("not daemon")
        };
        assert_eq!(d.ecs_agent, AgentAddr(None));
        assert!(Cli::try_parse_from(["profiler", "daemon", "--ecs-agent", "x"]).is_err());
        assert!(Cli::try_parse_from(["profiler", "daemon", "--retain", "0"]).is_err());
        let cli = Cli::try_parse_from(["profiler", "record", "--group-by", "container"]).unwrap();
        let Command::Record(r) = cli.command else {
            panic!("not record")
        };
        assert_eq!(r.capture.group_by, GroupBy::Container);
        let Command::Record(r) = Cli::try_parse_from(["profiler", "record"]).unwrap().command
        else {
            panic!("not record")
        };
        assert_eq!(r.capture.frequency, 99);
        assert_eq!(r.capture.group_by, GroupBy::Process);
    }

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
        assert_eq!(parse_duration("10d").unwrap(), Duration::from_secs(864_000));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("").is_err());
    }
}
