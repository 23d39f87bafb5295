//! The fold stage: symbolized stacks to folded lines
//! (`process;outer;...;leaf COUNT`), the input of every flame graph tool.

use std::io;

pub use crate::model::sanitize;
pub use crate::model::{Folded, SymbolizedStack};
use crate::model::{Frame, FrameKind};

/// The name of a frame as folded: annotated `_[k]` (kernel), `_[i]`
/// (inlined) or `_[j]` (JIT), the annotations flame graph tools colour by.
pub fn folded_name(frame: &Frame) -> String {
    let name = sanitize(&frame.name);
    match &frame.kind {
        k if k.is_kernel() => format!("{name}_[k]"),
        FrameKind::Inlined => format!("{name}_[i]"),
        FrameKind::Jit => format!("{name}_[j]"),
        _ => name,
    }
}

/// Folds stacks; identical lines add up.
pub fn fold<'a>(stacks: impl IntoIterator<Item = &'a SymbolizedStack>) -> Folded {
    let mut out = Folded::new();
    for s in stacks {
        *out.entry(line(s)).or_default() += s.count;
    }
    out
}

/// One stack's folded line, without its count.
pub fn line(s: &SymbolizedStack) -> String {
    let mut line = String::new();
    if let Some(g) = &s.group {
        line.push_str(&sanitize(g));
        line.push(';');
    }
    let process = sanitize(&s.process);
    line.push_str(if process.is_empty() {
        "[unknown]"
    } else {
        &process
    });
    for f in s.user.iter().chain(&s.kernel) {
        line.push(';');
        line.push_str(&folded_name(f));
    }
    line
}

/// Writes folded stacks, one `frames COUNT` line each.
pub fn write_folded(folded: &Folded, mut w: impl io::Write) -> io::Result<()> {
    for (line, count) in folded {
        writeln!(w, "{line} {count}")?;
    }
    Ok(())
}

/// Total samples of folded stacks.
pub fn total(folded: &Folded) -> u64 {
    folded.values().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Side, Unknown, UnknownReason};

    fn f(name: &str, kind: FrameKind) -> Frame {
        Frame {
            name: name.into(),
            kind,
        }
    }

    /// Golden test: re-bless with `BLESS=1 cargo test -p profiler fold`.
    #[test]
    fn golden_folded_output() {
        let stacks = vec![
            SymbolizedStack {
                group: None,
                tgid: 1,
                process: "app".into(),
                user: vec![
                    f("main", FrameKind::User),
                    f("run", FrameKind::User),
                    f("helper", FrameKind::Inlined),
                ],
                kernel: vec![],
                count: 7,
            },
            SymbolizedStack {
                group: None,
                tgid: 1,
                process: "app".into(),
                user: vec![
                    f("main", FrameKind::User),
                    f("run", FrameKind::User),
                    f("helper", FrameKind::Inlined),
                ],
                kernel: vec![],
                count: 3,
            },
            SymbolizedStack {
                group: None,
                tgid: 1,
                process: "node".into(),
                user: vec![
                    f("node::Start", FrameKind::User),
                    f("LazyCompile:*hot;loop /a.js:1:1", FrameKind::Jit),
                ],
                kernel: vec![
                    f("asm_sysvec_apic_timer_interrupt", FrameKind::Kernel),
                    Frame::unknown(Unknown {
                        offset: Some(0xffffffff81000000),
                        ..Unknown::new(UnknownReason::KernelUnknown, Side::Kernel)
                    }),
                ],
                count: 2,
            },
            SymbolizedStack {
                group: None,
                tgid: 1,
                process: "swapper".into(),
                user: vec![],
                kernel: vec![
                    f("do_idle", FrameKind::Kernel),
                    f("default_idle", FrameKind::Kernel),
                ],
                count: 40,
            },
            SymbolizedStack {
                group: None,
                tgid: 1,
                process: "stripped".into(),
                user: vec![
                    Frame::unknown(
                        Unknown::new(UnknownReason::NoSymbols, Side::User).at("libfoo.so", 0x1a2b),
                    ),
                    Frame::unknown(Unknown::new(UnknownReason::JitWithoutPerfMap, Side::User)),
                ],
                kernel: vec![],
                count: 1,
            },
        ];
        let mut stacks = stacks;
        let mut grouped = stacks[0].clone();
        grouped.group = Some("docker:3f1a2b4c5d6e".into());
        stacks.push(grouped);
        let folded = fold(&stacks);
        assert_eq!(total(&folded), 60);
        let mut out = Vec::new();
        write_folded(&folded, &mut out).unwrap();
        crate::golden::check("fold.folded", &out);
    }
}
