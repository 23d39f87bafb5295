//! The `profiler` command: a thin shell over the library.

use std::process::ExitCode;

use clap::Parser;
use profiler::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Record(args) => profiler::record::run(&args).map(|outcome| {
            match outcome.command_status.and_then(|s| s.code()) {
                // Pass on the profiled command's failure, like `time` does.
                Some(code) if code != 0 => ExitCode::from(code.clamp(1, 255) as u8),
                _ => ExitCode::SUCCESS,
            }
        }),
        Command::Daemon(args) => profiler::daemon::run(&args).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("profiler: error: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            eprintln!("  caused by: {s}");
            source = s.source();
        }
        ExitCode::from(if e.is_usage() { 2 } else { 1 })
    })
}
