//! Frames as the symbolize stage names them, and the stacks and folded
//! lines made of them.

use std::{collections::BTreeMap, fmt};

/// Why a frame could not be named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnknownReason {
    /// The file has no symbol covering the address (stripped, or not code).
    NoSymbols,
    /// The file could not be opened or parsed.
    FileUnreadable,
    /// Anonymous executable memory (or a `memfd:` mapping), and the process
    /// has no perf map or jitdump (JIT code of a runtime not told to write
    /// one).
    JitWithoutPerfMap,
    /// Anonymous executable memory that the process's perf map or jitdump
    /// does not cover (code compiled before it was started, or since it
    /// was read; a runtime's own stubs).
    JitNotInMap,
    /// Memory that is not code (heap, stack, a file's data): a return
    /// address there means the walk had already gone wrong.
    NotCode,
    /// The address is in no mapping of the process.
    Unmapped,
    /// The process was gone before its memory maps could be read.
    ProcessExited,
    /// The stack walk was dropped (stack map full or hash collision).
    StackDropped,
    /// The kernel address is not in kallsyms.
    KernelUnknown,
    /// The unwind needed stack past the copied window: the outer frames
    /// are missing.
    Truncated,
    /// The unwind met a frame with no rule to go on (no CFI, no usable
    /// frame pointer): the outer frames are missing.
    UnwindLost,
}

impl UnknownReason {
    /// A short name, used in frame names and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            UnknownReason::NoSymbols => "no symbols",
            UnknownReason::FileUnreadable => "file unreadable",
            UnknownReason::JitWithoutPerfMap => "JIT code without a perf map",
            UnknownReason::JitNotInMap => "JIT code missing from the perf map",
            UnknownReason::NotCode => "not code: the walk went wrong",
            UnknownReason::Unmapped => "unmapped address",
            UnknownReason::ProcessExited => "process exited before it was read",
            UnknownReason::StackDropped => "stack dropped",
            UnknownReason::KernelUnknown => "not in kallsyms",
            UnknownReason::Truncated => "truncated stack",
            UnknownReason::UnwindLost => "unwinding stopped",
        }
    }
}

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which stack a frame is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// The user stack.
    User,
    /// The kernel stack.
    Kernel,
}

/// A frame that could not be named: why, on which stack, and where it is
/// when that is known.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Unknown {
    /// Why it has no name.
    pub reason: UnknownReason,
    /// Kernel or user.
    pub side: Side,
    /// The file (its base name) or special mapping (`[vdso]`) it is in.
    pub file: Option<String>,
    /// Offset in that file (or mapping).
    pub offset: Option<u64>,
    /// The symbolizer's own words, where it gave a reason.
    pub detail: Option<&'static str>,
}

impl Unknown {
    /// An unknown frame known only by its reason.
    pub fn new(reason: UnknownReason, side: Side) -> Self {
        Unknown {
            reason,
            side,
            file: None,
            offset: None,
            detail: None,
        }
    }

    /// Where it is, with the file and offset.
    pub fn at(mut self, file: impl Into<String>, offset: u64) -> Self {
        self.file = Some(file.into());
        self.offset = Some(offset);
        self
    }

    /// With the symbolizer's reason.
    pub fn detail(mut self, detail: &'static str) -> Self {
        self.detail = Some(detail);
        self
    }
}

/// What kind of code a frame is in; decides its annotation when folded.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Native user code.
    User,
    /// A function inlined into its caller (folded with `_[i]`).
    Inlined,
    /// JIT-compiled code named by a perf map (folded with `_[j]`).
    Jit,
    /// Kernel code (folded with `_[k]`).
    Kernel,
    /// A frame that could not be named (folded with `_[k]` on the kernel
    /// side). Boxed: the rare case keeps every frame small (a frame is
    /// copied into each stack it is in).
    Unknown(Box<Unknown>),
}

impl FrameKind {
    /// Whether the frame is on the kernel stack.
    pub fn is_kernel(&self) -> bool {
        match self {
            FrameKind::Kernel => true,
            FrameKind::Unknown(u) => u.side == Side::Kernel,
            _ => false,
        }
    }

    /// The unknown frame's description, if it is one.
    pub fn unknown(&self) -> Option<&Unknown> {
        match self {
            FrameKind::Unknown(u) => Some(u),
            _ => None,
        }
    }
}

/// One frame of a symbolized stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Function name, or where the frame is when it has none; shared by
    /// every stack the frame is in.
    pub name: std::sync::Arc<str>,
    /// What kind of code it is.
    pub kind: FrameKind,
}

impl Frame {
    /// A frame.
    pub fn new(name: impl Into<std::sync::Arc<str>>, kind: FrameKind) -> Self {
        Frame {
            name: name.into(),
            kind,
        }
    }

    /// An unknown frame, named after where it is (`libfoo.so+0x1a2b`)
    /// when that is known, else after its reason.
    pub fn unknown(u: Unknown) -> Self {
        let name = match (&u.file, u.offset, u.side) {
            (Some(file), Some(off), _) => format!("{file}+{off:#x}"),
            (_, Some(addr), Side::Kernel) => format!("[unknown kernel {addr:#x}]"),
            _ => format!("[unknown: {}]", u.reason),
        };
        Frame::new(name, FrameKind::Unknown(Box::new(u)))
    }

    /// The unknown frame's description, if it is one.
    pub fn unknown_info(&self) -> Option<&Unknown> {
        self.kind.unknown()
    }
}

/// A frame name as it may appear in `;`-separated folded lines: no `;`,
/// no newline.
pub fn sanitize(name: &str) -> String {
    name.replace(';', ":").replace(['\n', '\r'], " ")
}

/// One symbolized stack and how often it was sampled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolizedStack {
    /// Root frame: the process name.
    pub process: String,
    /// A frame above the process (`--group-by container`): the container,
    /// or `host`.
    pub group: Option<String>,
    /// Thread-group id (0: idle).
    pub tgid: u32,
    /// User frames, outermost first.
    pub user: Vec<Frame>,
    /// Kernel frames, outermost first.
    pub kernel: Vec<Frame>,
    /// Samples.
    pub count: u64,
}

/// Folded stacks: line (without count) to count, sorted so that output is
/// deterministic.
pub type Folded = BTreeMap<String, u64>;
