//! `profiler replay FILE`: the user stack copies `record --save-samples`
//! wrote, unwound and symbolized again on this thread, timed. It
//! measures our userspace per sample (the CFI unwinder, the symbolizer),
//! not the kernel: the replay bench (`cargo xtask bench replay`) and the
//! README's cost model use it. The processes must still run (their maps
//! are read live, their files opened as during a capture).

use std::{io::Read, path::Path, time::Instant};

use profiler_common::stacks::{SAMPLE_HEADER_BYTES, StackSample};
use serde::Serialize;

use crate::{
    model::RawProfile,
    procs::ProcessTable,
    symbolize::{Symbolizer, symbolize_profile_with},
    unwind::UserUnwinder,
};

/// What one replay measured.
#[derive(Debug, Serialize)]
pub struct Replay {
    /// Samples replayed.
    pub samples: u64,
    /// Bytes of stack they carried.
    pub stack_bytes: u64,
    /// Distinct stacks unwound.
    pub stacks: usize,
    /// CPU seconds of this thread unwinding (maps and CFI read included).
    pub unwind_cpu_s: f64,
    /// CPU seconds symbolizing the distinct stacks (files parsed included).
    pub symbolize_cpu_s: f64,
    /// Samples unwound per CPU second.
    pub unwound_per_cpu_s: f64,
    /// Samples unwound and symbolized per CPU second.
    pub per_cpu_s: f64,
    /// Wall seconds of both.
    pub wall_s: f64,
}

/// CPU time of the calling thread, seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Errors of a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a file of `record --save-samples` (a record of {len} bytes at byte {at})"
    )]
    Format { path: String, len: usize, at: usize },
}

impl ReplayError {
    /// Bad input rather than a failure of ours.
    pub fn is_usage(&self) -> bool {
        true
    }
}

/// Replays `path`.
pub fn replay(path: &Path) -> Result<Replay, ReplayError> {
    let name = path.display().to_string();
    let mut data = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|source| ReplayError::Read {
            path: name.clone(),
            source,
        })?;
    // SAFETY: StackSample is plain integers and bytes; all zeroes is a
    // valid value.
    let mut sample: Box<StackSample> = unsafe { Box::new_zeroed().assume_init() };
    let mut procs = ProcessTable::new();
    let mut unwinder = UserUnwinder::new();
    let (mut samples, mut bytes) = (0u64, 0u64);
    let wall = Instant::now();
    let cpu0 = thread_cpu_s();
    let mut at = 0;
    while at < data.len() {
        let len = data
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
            .unwrap_or(usize::MAX);
        let record = data.get(at + 4..at.saturating_add(4).saturating_add(len));
        let Some(record) = record.filter(|r| {
            r.len() >= SAMPLE_HEADER_BYTES && r.len() <= std::mem::size_of::<StackSample>()
        }) else {
            return Err(ReplayError::Format {
                path: name,
                len,
                at,
            });
        };
        crate::capture::read_record(&mut sample, record);
        bytes += u64::from(sample.len);
        samples += 1;
        unwinder.add(&sample, &mut procs);
        at += 4 + len;
    }
    let cpu1 = thread_cpu_s();
    let (window, _) = unwinder.take_window();
    let mut raw = RawProfile::default();
    for (key, count) in window.stacks {
        // The kernel's stack map is gone: user frames only.
        raw.stacks.push(key.into_raw(Ok(Vec::new()), count));
    }
    let mut sym = Symbolizer::new();
    let symbolized = symbolize_profile_with(&mut sym, &raw, &procs, None);
    let cpu2 = thread_cpu_s();
    let stacks = symbolized.len();
    std::mem::forget(symbolized);
    let (unwind, symbolize) = (cpu1 - cpu0, cpu2 - cpu1);
    Ok(Replay {
        samples,
        stack_bytes: bytes,
        stacks,
        unwind_cpu_s: unwind,
        symbolize_cpu_s: symbolize,
        unwound_per_cpu_s: samples as f64 / unwind.max(1e-9),
        per_cpu_s: samples as f64 / (unwind + symbolize).max(1e-9),
        wall_s: wall.elapsed().as_secs_f64(),
    })
}

/// `profiler replay`: prints the measure as one JSON line.
pub fn run(args: &crate::cli::ReplayArgs) -> Result<(), ReplayError> {
    let r = replay(&args.file)?;
    println!(
        "{}",
        serde_json::to_string(&r).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_samples_is_refused() {
        let dir = std::env::temp_dir().join(format!("replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad");
        std::fs::write(&f, b"\xff\xff\xff\x00garbage").unwrap();
        let e = replay(&f).unwrap_err();
        assert!(matches!(e, ReplayError::Format { at: 0, .. }), "{e}");
        assert!(e.to_string().contains("record --save-samples"), "{e}");
        std::fs::write(&f, b"").unwrap();
        assert_eq!(replay(&f).unwrap().samples, 0);
        assert!(matches!(
            replay(&dir.join("missing")),
            Err(ReplayError::Read { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
