//! The symbolization report: how much of the profile is fully named, and
//! for the rest, why frames are unknown and what to do about each cause.
//! Printed by `record` and written to `symbols.json`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::{
    fold::SymbolizedStack,
    symbolize::{FrameKind, UnknownReason},
};

/// One cause of unknown frames.
#[derive(Clone, Debug, Serialize)]
pub struct Cause {
    /// Short name of the cause.
    pub reason: String,
    /// Samples with at least one frame of this cause.
    pub samples: u64,
    /// Their share of all samples, 0..1.
    pub share: f64,
    /// Where it happened: files, or processes.
    pub examples: Vec<String>,
    /// What to do about it.
    pub advice: String,
}

/// symbols.json.
#[derive(Clone, Debug, Serialize)]
pub struct SymbolReport {
    /// Samples in the profile.
    pub samples: u64,
    /// Samples whose every frame is named.
    pub fully_named_samples: u64,
    /// Their share, 0..1.
    pub fully_named_share: f64,
    /// Causes of unknown frames, most samples first.
    pub causes: Vec<Cause>,
}

fn advice(r: Option<UnknownReason>) -> &'static str {
    match r {
        Some(UnknownReason::NoSymbols) => {
            "the file has no symbol for these addresses (stripped): install its debug symbols (Debian: the -dbgsym package) or build without -s/strip; frames show file+offset meanwhile"
        }
        Some(UnknownReason::FileUnreadable) => {
            "the mapped file could not be opened: deleted or replaced on disk, or in a container whose files were gone; keep the process and its container running until the capture ends"
        }
        Some(UnknownReason::JitWithoutPerfMap) => {
            "JIT code with no /tmp/perf-PID.map naming it: start Node.js with --perf-basic-prof --interpreted-frames-native-stack (JVM: -XX:+PreserveFramePointer with perf-map-agent)"
        }
        Some(UnknownReason::JitNotInMap) => {
            "JIT code that the process's perf map or jitdump does not cover: code compiled before the runtime started writing it, or a runtime's own stubs; with Node.js, code compiled before --perf-basic-prof/--perf-prof took effect"
        }
        Some(UnknownReason::Unmapped) => {
            "a return address in no mapping: the walk had gone wrong before it (a frame pointer that was not one, in code built without frame pointers); the walk stops there. Use --unwind auto (the default) for CFI unwinding"
        }
        Some(UnknownReason::NotCode) => {
            "a return address in the heap, a stack or a file's data: not code, so the walk had gone wrong before it (a frame that neither CFI nor a frame pointer describes); the walk stops there. Not a missing-symbols problem"
        }
        Some(UnknownReason::ProcessExited) => {
            "the process exited before its memory maps could be read (it lived only milliseconds, or its announcement was lost)"
        }
        Some(UnknownReason::StackDropped) => {
            "the kernel's stack map was full or two stacks collided in it; fewer distinct stacks (lower -F, shorter -d) lose fewer"
        }
        Some(UnknownReason::Truncated) => {
            "the stack is deeper than the copied window: raise --stack-bytes (at most 65536); the outer frames are missing"
        }
        Some(UnknownReason::UnwindLost) => {
            "a frame that neither CFI nor a frame pointer describes (hand-written assembly, code built without unwind tables or frame pointers, or a sample in a process start-up): the outer frames are missing"
        }
        Some(UnknownReason::KernelUnknown) | None => {
            "kernel addresses not in /proc/kallsyms: run as root (kernel.kptr_restrict hides them from others)"
        }
    }
}

/// Builds the report of symbolized stacks.
pub fn build(stacks: &[SymbolizedStack]) -> SymbolReport {
    let mut samples = 0;
    let mut named = 0;
    // reason name -> (samples, examples, reason)
    let mut causes: BTreeMap<&'static str, (u64, BTreeSet<String>, Option<UnknownReason>)> =
        BTreeMap::new();
    for s in stacks {
        samples += s.count;
        let mut seen: BTreeSet<&'static str> = BTreeSet::new();
        for f in s.user.iter().chain(&s.kernel) {
            let reason = match f.kind {
                FrameKind::Unknown(r) => Some(r),
                FrameKind::KernelUnknown => None,
                _ => continue,
            };
            let key = reason.map_or("kernel address not in kallsyms", UnknownReason::as_str);
            let entry = causes
                .entry(key)
                .or_insert_with(|| (0, BTreeSet::new(), reason));
            if seen.insert(key) {
                entry.0 += s.count;
            }
            let example = match reason {
                Some(UnknownReason::NoSymbols | UnknownReason::FileUnreadable) => f
                    .name
                    .rsplit_once("+0x")
                    .map_or(f.name.as_str(), |(file, _)| file)
                    .to_string(),
                _ => s.process.clone(),
            };
            if entry.1.len() < 5 {
                entry.1.insert(example);
            }
        }
        if seen.is_empty() {
            named += s.count;
        }
    }
    let share = |n: u64| {
        if samples == 0 {
            0.0
        } else {
            n as f64 / samples as f64
        }
    };
    let mut causes: Vec<Cause> = causes
        .into_iter()
        .map(|(name, (n, ex, r))| Cause {
            reason: name.to_string(),
            samples: n,
            share: share(n),
            examples: ex.into_iter().collect(),
            advice: advice(r).to_string(),
        })
        .collect();
    causes.sort_by(|a, b| b.samples.cmp(&a.samples).then(a.reason.cmp(&b.reason)));
    SymbolReport {
        samples,
        fully_named_samples: named,
        fully_named_share: share(named),
        causes,
    }
}

/// The few lines `record` prints.
pub fn render(r: &SymbolReport) -> String {
    let mut out = format!(
        "symbols: {:.1}% of {} samples have every frame named\n",
        r.fully_named_share * 100.0,
        r.samples
    );
    for c in r.causes.iter().take(4) {
        out.push_str(&format!(
            "  {:.1}% with {} ({}): {}\n",
            c.share * 100.0,
            c.reason,
            c.examples.join(", "),
            c.advice
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symbolize::Frame;

    fn f(name: &str, kind: FrameKind) -> Frame {
        Frame {
            name: name.into(),
            kind,
        }
    }

    #[test]
    fn shares_and_causes() {
        let stacks = vec![
            SymbolizedStack {
                group: None,
                tgid: 1,
                process: "a".into(),
                user: vec![f("main", FrameKind::User)],
                kernel: vec![],
                count: 6,
            },
            SymbolizedStack {
                group: None,
                tgid: 1,
                process: "a".into(),
                user: vec![
                    f("libx.so+0x10", FrameKind::Unknown(UnknownReason::NoSymbols)),
                    f("libx.so+0x20", FrameKind::Unknown(UnknownReason::NoSymbols)),
                ],
                kernel: vec![],
                count: 3,
            },
            SymbolizedStack {
                group: None,
                tgid: 1,
                process: "node".into(),
                user: vec![f(
                    "[unknown: JIT code without a perf map]",
                    FrameKind::Unknown(UnknownReason::JitWithoutPerfMap),
                )],
                kernel: vec![f("[unknown kernel 0x1]", FrameKind::KernelUnknown)],
                count: 1,
            },
        ];
        let r = build(&stacks);
        assert_eq!((r.samples, r.fully_named_samples), (10, 6));
        assert_eq!(r.causes[0].reason, "no symbols");
        assert_eq!(r.causes[0].samples, 3, "a stack counts once per cause");
        assert_eq!(r.causes[0].examples, vec!["libx.so".to_string()]);
        let jit = r
            .causes
            .iter()
            .find(|c| c.reason == "JIT code without a perf map")
            .unwrap();
        assert!(jit.advice.contains("--perf-basic-prof"));
        assert_eq!(jit.examples, vec!["node".to_string()]);
        assert!(render(&r).contains("60.0% of 10 samples"));
    }
}
