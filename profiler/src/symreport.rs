//! The symbolization report: how much of the profile is fully named, and
//! for the rest, why frames are unknown and what to do about each cause.
//! Printed by `record` and written to `symbols.json`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::model::{Side, SymbolizedStack, Unknown, UnknownReason};

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
    /// The symbolizer's own reasons, where it gave any.
    pub symbolizer: Vec<String>,
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

fn advice(u: &Unknown) -> &'static str {
    match u.reason {
        UnknownReason::NoSymbols => {
            "the file has no symbol for these addresses (stripped): install its debug symbols (Debian: the -dbgsym package) or build without -s/strip; frames show file+offset meanwhile"
        }
        UnknownReason::FileUnreadable => {
            "the mapped file could not be opened: deleted or replaced on disk, or in a container whose files were gone; keep the process and its container running until the capture ends"
        }
        UnknownReason::JitWithoutPerfMap => {
            "JIT code (anonymous executable memory, or a memfd: mapping) with no /tmp/perf-PID.map or jitdump naming it: start Node.js with --perf-basic-prof --interpreted-frames-native-stack (JVM: -XX:+PreserveFramePointer with perf-map-agent)"
        }
        UnknownReason::JitNotInMap => {
            "JIT code that the process's perf map or jitdump does not cover: code compiled before the runtime started writing it, or a runtime's own stubs; with Node.js, code compiled before --perf-basic-prof/--perf-prof took effect"
        }
        UnknownReason::Unmapped => {
            "a return address in no mapping: the walk had gone wrong before it (a frame pointer that was not one, in code built without frame pointers); the walk stops there. Use --unwind auto (the default) for CFI unwinding"
        }
        UnknownReason::NotCode => {
            "a return address in the heap, a stack or a file's data: not code, so the walk had gone wrong before it (a frame that neither CFI nor a frame pointer describes); the walk stops there. Not a missing-symbols problem"
        }
        UnknownReason::ProcessExited => {
            "the process exited before its memory maps could be read (it lived only milliseconds, or its announcement was lost)"
        }
        UnknownReason::StackDropped => {
            if u.side == Side::Kernel {
                "the kernel stack was not recorded: the kernel's stack map was full or two stacks collided in it; a bigger --max-stacks (or fewer distinct stacks: lower -F, shorter -d) loses fewer"
            } else {
                "the user stack was not recorded: the kernel's stack map was full or two stacks collided in it; a bigger --max-stacks (or fewer distinct stacks: lower -F, shorter -d) loses fewer"
            }
        }
        UnknownReason::Truncated => {
            "the stack is deeper than the copied window: raise --stack-bytes (at most 65536); the outer frames are missing"
        }
        UnknownReason::UnwindLost => {
            "a frame that neither CFI nor a frame pointer describes (hand-written assembly, code built without unwind tables or frame pointers, or a sample in a process start-up): the outer frames are missing"
        }
        UnknownReason::KernelUnknown => {
            "kernel addresses not in /proc/kallsyms: run as root (kernel.kptr_restrict hides them from others)"
        }
    }
}

/// The name a cause is reported under.
fn cause_name(u: &Unknown) -> &'static str {
    match (u.side, u.reason) {
        (Side::Kernel, UnknownReason::KernelUnknown) => "kernel address not in kallsyms",
        (Side::Kernel, UnknownReason::StackDropped) => "kernel stack dropped",
        (Side::User, UnknownReason::StackDropped) => "user stack dropped",
        (_, r) => r.as_str(),
    }
}

/// Builds the report of symbolized stacks.
pub fn build(stacks: &[SymbolizedStack]) -> SymbolReport {
    let mut samples = 0;
    let mut named = 0;
    // cause -> (samples, examples, an unknown frame of it, symbolizer reasons)
    type Entry<'a> = (u64, BTreeSet<String>, &'a Unknown, BTreeSet<&'static str>);
    let mut causes: BTreeMap<&'static str, Entry<'_>> = BTreeMap::new();
    for s in stacks {
        samples += s.count;
        let mut seen: BTreeSet<&'static str> = BTreeSet::new();
        for u in s
            .user
            .iter()
            .chain(&s.kernel)
            .filter_map(|f| f.unknown_info())
        {
            let key = cause_name(u);
            let entry = causes
                .entry(key)
                .or_insert_with(|| (0, BTreeSet::new(), u, BTreeSet::new()));
            if seen.insert(key) {
                entry.0 += s.count;
            }
            // Where it is: the file when known (a kernel address is not a
            // place worth listing), else the process.
            let example = match (&u.file, u.side) {
                (Some(file), Side::User) => file.clone(),
                _ => s.process.clone(),
            };
            if entry.1.len() < 5 {
                entry.1.insert(example);
            }
            if let Some(d) = u.detail {
                entry.3.insert(d);
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
        .map(|(name, (n, ex, u, details))| Cause {
            reason: name.to_string(),
            samples: n,
            share: share(n),
            examples: ex.into_iter().collect(),
            advice: advice(u).to_string(),
            symbolizer: details.into_iter().map(str::to_string).collect(),
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
    use crate::model::{Frame, FrameKind};

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
                    Frame::unknown(
                        Unknown::new(UnknownReason::NoSymbols, Side::User).at("libx.so", 0x10),
                    ),
                    Frame::unknown(
                        Unknown::new(UnknownReason::NoSymbols, Side::User).at("libx.so", 0x20),
                    ),
                ],
                kernel: vec![],
                count: 3,
            },
            SymbolizedStack {
                group: None,
                tgid: 1,
                process: "node".into(),
                user: vec![Frame::unknown(Unknown::new(
                    UnknownReason::JitWithoutPerfMap,
                    Side::User,
                ))],
                kernel: vec![Frame::unknown(Unknown {
                    offset: Some(1),
                    ..Unknown::new(UnknownReason::KernelUnknown, Side::Kernel)
                })],
                count: 1,
            },
            SymbolizedStack {
                group: None,
                tgid: 1,
                process: "b".into(),
                user: vec![f("main", FrameKind::User)],
                kernel: vec![Frame::unknown(Unknown::new(
                    UnknownReason::StackDropped,
                    Side::Kernel,
                ))],
                count: 2,
            },
        ];
        let r = build(&stacks);
        assert_eq!((r.samples, r.fully_named_samples), (12, 6));
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
        assert!(render(&r).contains("50.0% of 12 samples"));
        // A kernel stack the stack map dropped is not a kallsyms problem.
        let dropped = r
            .causes
            .iter()
            .find(|c| c.reason == "kernel stack dropped")
            .unwrap();
        assert_eq!(dropped.samples, 2);
        assert!(!dropped.advice.contains("kallsyms"), "{}", dropped.advice);
        let kallsyms = r
            .causes
            .iter()
            .find(|c| c.reason == "kernel address not in kallsyms")
            .unwrap();
        assert_eq!(kallsyms.samples, 1);
    }
}
