//! The `profiler` command: a thin shell over the library.

use std::{error::Error, process::ExitCode};

use clap::Parser;
use profiler::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Record(args) => match profiler::record::run(&args) {
            Ok(outcome) => match outcome.command_status.and_then(|s| s.code()) {
                // Pass on the profiled command's failure, like `time` does.
                Some(code) if code != 0 => ExitCode::from(code.clamp(1, 255) as u8),
                _ => ExitCode::SUCCESS,
            },
            Err(e) => fail(&e, e.is_usage()),
        },
        Command::Daemon(args) => match profiler::daemon::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e, e.is_usage()),
        },
        Command::Diff(args) => match profiler::diff::run(&args) {
            Ok(false) => ExitCode::SUCCESS,
            // A rule failed: what a CI job gates on.
            Ok(true) => ExitCode::from(3),
            Err(e) => fail(&e, e.is_usage()),
        },
        Command::Replay(args) => match profiler::replay::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e, e.is_usage()),
        },
    }
}

/// Prints an error and its causes; exit code 2 for bad input, 1 else.
fn fail(e: &dyn Error, usage: bool) -> ExitCode {
    eprintln!("profiler: error: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
    ExitCode::from(if usage { 2 } else { 1 })
}
