//! The symbolize stage: addresses to frame names.
//!
//! Kernel frames come from kallsyms, user frames from each mapped file's
//! ELF symbols and DWARF (inlined functions as frames of their own,
//! Rust/C++ names demangled) through blazesym, and JIT frames from the
//! process's perf map. An address that cannot be named becomes a frame
//! that says where it is (`libfoo.so+0x1a2b`) or why it is unknown.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use blazesym::Addr;
use blazesym::symbolize::{
    Symbolized, Symbolizer as Blaze,
    source::{Elf, Source},
};

mod kallsyms;

use crate::{
    jitdump::{JitDump, JitDumpReader},
    model::{
        Cut, Frame, FrameKind, RawProfile, RawStack, RawStackPart, Side, SymbolizedStack, Unknown,
        UnknownReason,
    },
    perfmap::PerfMap,
    procmaps::{Backing, MapEntry, Normalized, basename, normalize},
    procs::{ProcessInfo, ProcessTable},
};

/// Whether `path` is the file this process runs (the same device and
/// inode as /proc/self/exe).
fn is_own_executable(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    static OWN: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    let own = OWN.get_or_init(|| {
        fs::metadata("/proc/self/exe")
            .ok()
            .map(|m| (m.dev(), m.ino()))
    });
    own.is_some_and(|own| fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == own))
}

/// Strips the `::h0123456789abcdef` hash of a demangled Rust legacy name.
fn strip_rust_hash(name: &str) -> &str {
    if let Some(idx) = name.rfind("::h") {
        let hash = &name[idx + 3..];
        if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return &name[..idx];
        }
    }
    name
}

/// The frames (outermost first) for one symbolized address.
fn frames_of(sym: &blazesym::symbolize::Sym<'_>) -> Vec<Frame> {
    let mut out = Vec::with_capacity(1 + sym.inlined.len());
    out.push(Frame::new(strip_rust_hash(&sym.name), FrameKind::User));
    for f in sym.inlined.iter() {
        out.push(Frame::new(strip_rust_hash(&f.name), FrameKind::Inlined));
    }
    out
}

/// How long kernel names, and the kallsyms table they come from, are
/// trusted (modules and BPF programs come and go); read again after.
/// Reading kallsyms costs 60 ms of CPU here (a third in the kernel), so a
/// daemon with short windows reads it once a minute, not each window.
const KERNEL_NAMES_LIFETIME: Duration = Duration::from_secs(60);

/// What an address was named, and when it was last asked for.
struct Named<T> {
    frames: T,
    used: Instant,
}

/// The user addresses of `stacks` ([`adjusted`]), per process.
fn user_addresses<'a>(
    stacks: impl IntoIterator<Item = &'a RawStack>,
) -> HashMap<u32, HashSet<u64>> {
    let mut addrs: HashMap<u32, HashSet<u64>> = HashMap::new();
    for s in stacks {
        if let Ok(u) = &s.user {
            addrs.entry(s.tgid).or_default().extend(adjusted(u));
        }
    }
    addrs
}

/// A file as it was read: device, inode, size and modification time.
type FileStamp = (u64, u64, u64, i64, i64);

fn stamp_of(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// One file's symbols: a blazesym symbolizer of its own (the file's
/// sections parsed as addresses ask for them), so that the file's parse
/// can be let go alone, and the frames it named.
struct FileSyms {
    /// None until a new address is asked for, and again once let go.
    blaze: Option<Blaze>,
    /// The file when first read: one replaced on disk is read again.
    stamp: Option<FileStamp>,
    /// The frames found, by file offset: an address named once is not
    /// looked up in the file again while it keeps being asked for.
    named: HashMap<u64, Named<Result<Vec<Frame>, Unknown>>>,
    /// The round it was last compared with the disk in.
    checked_round: u64,
    /// When it last named an address.
    used: Instant,
}

impl FileSyms {
    fn new(path: &Path, round: u64) -> Self {
        FileSyms {
            blaze: None,
            stamp: stamp_of(path),
            named: HashMap::new(),
            checked_round: round,
            used: Instant::now(),
        }
    }
}

fn new_blaze() -> Blaze {
    Blaze::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .enable_demangling(true)
        .enable_auto_reload(false)
        .build()
}

/// Where `addr` is in the code of a regular file (not a memfd): the
/// file's path in the process's view and the offset in it.
fn code_in_file(maps: &[MapEntry], addr: u64) -> Option<(&str, u64)> {
    match normalize(maps, addr) {
        Normalized::File { entry, file_offset } if entry.exec && !is_memfd(&entry.backing) => {
            match &entry.backing {
                Backing::File { path, .. } => Some((path.as_str(), file_offset)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Symbolizes addresses, caching parsed files and perf maps across calls.
pub struct Symbolizer {
    /// Parsed files by host path, each let go on its own.
    files: HashMap<PathBuf, FileSyms>,
    perf_maps: HashMap<u32, Option<PerfMap>>,
    /// Jitdumps read, per process (with the JS functions they name).
    /// Jitdumps followed, per process, and the symbolization round each
    /// was last brought up to date in (a daemon's symbolizer lives for
    /// many windows: only what the runtime appended is read again).
    jitdumps: HashMap<u32, (JitDumpReader, u64)>,
    round: u64,
    /// Function symbols of the vDSO (start, end, name), read lazily from
    /// the profiler's own copy: the same image in every process.
    vdso: Option<Vec<(u64, u64, String)>>,
    /// Kernel functions, read from kallsyms when an address not named
    /// yet is asked for.
    kernel_table: std::cell::OnceCell<Option<kallsyms::Table>>,
    /// The kernel frames found, by address.
    kernel_named: HashMap<u64, Named<Frame>>,
    /// When the kernel's names were last all let go (or the symbolizer
    /// made).
    kernel_since: Instant,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    /// A symbolizer with DWARF, inlined functions and demangling on.
    pub fn new() -> Self {
        Symbolizer {
            files: HashMap::new(),
            perf_maps: HashMap::new(),
            jitdumps: HashMap::new(),
            round: 1,
            vdso: None,
            kernel_table: std::cell::OnceCell::new(),
            kernel_named: HashMap::new(),
            kernel_since: Instant::now(),
        }
    }

    /// Lets go of every parsed file (an address not named yet parses its
    /// binary again), and of the frames of addresses not asked for within
    /// `idle`, with the files none of whose addresses were: a long-lived
    /// symbolizer holds the names of its recent stacks' addresses, not the
    /// binaries they came from. The kernel's names and its kallsyms table
    /// (4 MB here) are let go together once [`KERNEL_NAMES_LIFETIME`]
    /// old: with windows of a minute or more, at each call.
    pub fn forget_unused(&mut self, idle: Duration) {
        let now = Instant::now();
        let recent = |used: Instant| now.saturating_duration_since(used) < idle;
        self.files.retain(|_, f| {
            f.blaze = None;
            f.named.retain(|_, n| recent(n.used));
            recent(f.used)
        });
        if self.kernel_since.elapsed() >= KERNEL_NAMES_LIFETIME {
            self.kernel_table = std::cell::OnceCell::new();
            self.kernel_named.clear();
            self.kernel_since = now;
        } else {
            self.kernel_named.retain(|_, n| recent(n.used));
        }
    }

    /// Names ahead, one file after another, every user address of
    /// `stacks` in a file's code not named yet, and lets each file's
    /// parsed sections go as soon as its addresses are named (the frames
    /// are kept for [`Self::user`]): naming a capture's (a window's)
    /// stacks then holds one parsed binary at a time, not every binary
    /// they came from.
    pub fn prefetch<'a>(
        &mut self,
        stacks: impl IntoIterator<Item = &'a RawStack>,
        procs: &ProcessTable,
    ) {
        let mut by_file: HashMap<PathBuf, BTreeSet<u64>> = HashMap::new();
        for (tgid, addrs) in user_addresses(stacks) {
            let Some(process) = procs.get(tgid) else {
                continue;
            };
            for addr in addrs {
                if let Some((path, offset)) = code_in_file(&process.maps, addr) {
                    by_file
                        .entry(process.host_path(path))
                        .or_default()
                        .insert(offset);
                }
            }
        }
        for (path, offsets) in by_file {
            let offsets: Vec<u64> = offsets.into_iter().collect();
            self.file(&path, &offsets);
            if let Some(f) = self.files.get_mut(&path) {
                f.blaze = None;
            }
        }
    }

    fn vdso_symbol(&mut self, offset: u64) -> Option<String> {
        use object::{Object, ObjectSymbol};
        let syms = self.vdso.get_or_insert_with(|| {
            let Some(image) = crate::unwind::own_vdso() else {
                return Vec::new();
            };
            let Ok(file) = object::File::parse(&*image) else {
                return Vec::new();
            };
            let mut v: Vec<(u64, u64, String)> = file
                .dynamic_symbols()
                .chain(file.symbols())
                .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 0)
                .filter_map(|s| {
                    Some((
                        s.address(),
                        s.address() + s.size(),
                        s.name().ok()?.to_string(),
                    ))
                })
                .collect();
            v.sort();
            v
        });
        syms.iter()
            .find(|(a, b, _)| offset >= *a && offset < *b)
            .map(|(_, _, n)| n.clone())
    }

    /// Names kernel addresses (already adjusted to point into their call
    /// instruction). Every address gets an entry.
    pub fn kernel(&mut self, addrs: &[u64]) -> HashMap<u64, Vec<Frame>> {
        let kernel_frame = |addr: u64, name: Option<&str>| match name {
            Some(n) => Frame::new(strip_rust_hash(n), FrameKind::Kernel),
            None => unknown_kernel(addr, "no kernel function at this address"),
        };
        let now = Instant::now();
        let mut out = HashMap::with_capacity(addrs.len());
        for &addr in addrs {
            let named = self.kernel_named.entry(addr).or_insert_with(|| {
                // All of /proc/kallsyms is read (a tenth of an idle
                // capture's CPU) only when an address not named yet asks.
                let frame = match self.kernel_table.get_or_init(kallsyms::Table::load) {
                    Some(t) => kernel_frame(addr, t.name(addr)),
                    None => unknown_kernel(addr, KALLSYMS_HIDDEN),
                };
                Named {
                    frames: frame,
                    used: now,
                }
            });
            named.used = now;
            out.insert(addr, vec![named.frames.clone()]);
        }
        out
    }

    /// Names the user addresses of one process. `process` is what was read
    /// of it while it lived (None: it was never read).
    pub fn user(
        &mut self,
        process: Option<&ProcessInfo>,
        addrs: &[u64],
    ) -> HashMap<u64, Vec<Frame>> {
        let mut out: HashMap<u64, Vec<Frame>> = HashMap::with_capacity(addrs.len());
        let Some(process) = process else {
            for &a in addrs {
                out.insert(a, vec![unknown(UnknownReason::ProcessExited)]);
            }
            return out;
        };

        // Group file-backed addresses by file, so each file is parsed once.
        let mut by_file: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        for &addr in addrs {
            if let Some((path, offset)) = code_in_file(&process.maps, addr) {
                by_file.entry(path).or_default().push((addr, offset));
                continue;
            }
            match normalize(&process.maps, addr) {
                Normalized::File { entry, .. }
                | Normalized::Anonymous(entry)
                | Normalized::Special { entry, .. }
                    if !entry.exec =>
                {
                    // Anonymous memory the JIT says held code (it
                    // decommits its code space before exiting, after the
                    // samples were taken) is JIT code; else not code.
                    let jit = match entry.backing {
                        Backing::Anonymous => self.jit_frames(process, addr),
                        _ => None,
                    };
                    out.insert(addr, jit.unwrap_or_else(|| vec![not_code(entry)]));
                }
                // memfd: anonymous memory with a name, as JITs and some
                // runtimes map their code: named by the JIT's maps.
                Normalized::File { entry, .. } if is_memfd(&entry.backing) => {
                    let frame = match self.jit_frames(process, addr) {
                        Some(frames) => frames,
                        None => vec![self.jit_unknown(process)],
                    };
                    out.insert(addr, frame);
                }
                Normalized::File { .. } => {
                    unreachable!("code in a file is named by the file, above")
                }
                // JIT code is in anonymous memory; the maps read may also
                // predate the region (mapped after the last look).
                Normalized::Anonymous(_) | Normalized::Unmapped => {
                    let unmapped = matches!(normalize(&process.maps, addr), Normalized::Unmapped);
                    if let Some(frames) = self.jit_frames(process, addr) {
                        out.insert(addr, frames);
                        continue;
                    }
                    let frame = if unmapped {
                        unknown(UnknownReason::Unmapped)
                    } else {
                        self.jit_unknown(process)
                    };
                    out.insert(addr, vec![frame]);
                }
                Normalized::Special { entry, offset }
                    if entry.backing == Backing::Special("[vdso]".into())
                        && self.vdso_symbol(offset).is_some() =>
                {
                    let name = self.vdso_symbol(offset).unwrap_or_default();
                    out.insert(addr, vec![Frame::new(name, FrameKind::User)]);
                }
                Normalized::Special { entry, offset } => {
                    let u = Unknown::new(UnknownReason::NoSymbols, Side::User)
                        .at(entry.backing.to_string(), offset);
                    out.insert(addr, vec![Frame::unknown(u)]);
                }
            }
        }

        for (path, items) in by_file {
            let host = process.host_path(path);
            let offsets: Vec<u64> = items.iter().map(|(_, off)| *off).collect();
            let resolved = self.file(&host, &offsets);
            let name = basename(path);
            for ((addr, off), res) in items.into_iter().zip(resolved) {
                let frames = match res {
                    Ok(frames) => frames,
                    Err(u) => vec![Frame::unknown(u.at(name, off))],
                };
                out.insert(addr, frames);
            }
        }
        out
    }

    /// The frames of `offsets` in the file at `path`: those named before,
    /// the others by the file's own symbolizer (made on first need).
    fn file(&mut self, path: &Path, offsets: &[u64]) -> Vec<Result<Vec<Frame>, Unknown>> {
        let round = self.round;
        let f = self
            .files
            .entry(path.to_path_buf())
            .or_insert_with(|| FileSyms::new(path, round));
        if f.checked_round != round {
            f.checked_round = round;
            if stamp_of(path) != f.stamp {
                *f = FileSyms::new(path, round);
            }
        }
        let now = Instant::now();
        f.used = now;
        let missing: Vec<u64> = offsets
            .iter()
            .copied()
            .filter(|o| !f.named.contains_key(o))
            .collect();
        if !missing.is_empty() {
            let found = resolve(f.blaze.get_or_insert_with(new_blaze), path, &missing);
            for (o, frames) in missing.into_iter().zip(found) {
                f.named.insert(o, Named { frames, used: now });
            }
        }
        offsets
            .iter()
            .map(|o| match f.named.get_mut(o) {
                Some(n) => {
                    n.used = now;
                    n.frames.clone()
                }
                None => Err(Unknown::new(UnknownReason::FileUnreadable, Side::User)),
            })
            .collect()
    }

    /// The frames of JIT code at `addr`: from the jitdump first (it has
    /// source positions and inlined functions), then the perf map.
    fn jit_frames(&mut self, process: &ProcessInfo, addr: u64) -> Option<Vec<Frame>> {
        if let Some(frames) = self.jitdump(process).and_then(|d| jit_frames(d, addr)) {
            return Some(frames);
        }
        let sym = self.perf_map(process)?.lookup(addr)?;
        Some(vec![Frame::new(
            crate::model::sanitize(&sym.name),
            FrameKind::Jit,
        )])
    }

    /// The frame of JIT code that no map of the process names: whether it
    /// has a perf map or jitdump says why.
    fn jit_unknown(&mut self, process: &ProcessInfo) -> Frame {
        let has_map = self.jitdump(process).is_some() || self.perf_map(process).is_some();
        unknown(if has_map {
            UnknownReason::JitNotInMap
        } else {
            UnknownReason::JitWithoutPerfMap
        })
    }

    /// The process's jitdump (the file it maps as `jit-PID.dump`), brought
    /// up to date once per symbolization round.
    fn jitdump(&mut self, process: &ProcessInfo) -> Option<&JitDump> {
        let path = crate::jitdump::path_of(process)?;
        let round = self.round;
        let (reader, at) = self
            .jitdumps
            .entry(process.pid)
            .or_insert_with(|| (JitDumpReader::new(path.clone()), 0));
        if !reader.is_for(&path) {
            *reader = JitDumpReader::new(path);
            *at = 0;
        }
        if *at != round {
            *at = round;
            if !reader.refresh() {
                return None;
            }
        }
        Some(&reader.dump)
    }

    /// Starts a symbolization round: perf maps are read afresh, jitdumps
    /// brought up to date, and those of processes not symbolized in the
    /// last rounds dropped.
    fn new_round(&mut self) {
        self.perf_maps.clear();
        self.round += 1;
        let round = self.round;
        self.jitdumps.retain(|_, (_, at)| round - *at < 4);
    }

    fn perf_map(&mut self, process: &ProcessInfo) -> Option<&PerfMap> {
        self.perf_maps
            .entry(process.pid)
            .or_insert_with(|| {
                let path = crate::perfmap::path_of(process);
                fs::read_to_string(path).ok().map(|t| PerfMap::parse(&t))
            })
            .as_ref()
    }
}

/// Names `offsets` in the file at `path` with `blaze`.
fn resolve(blaze: &Blaze, path: &Path, offsets: &[u64]) -> Vec<Result<Vec<Frame>, Unknown>> {
    let mut elf = Elf::new(path);
    // The profiler's own frames (it samples itself on a system-wide
    // capture) are named from its symbol table alone: its DWARF, tens
    // of MB, would double the peak memory of a capture, for the
    // inlined frames of the tool rather than of what it profiles.
    elf.debug_syms = !is_own_executable(path);
    let src = Source::Elf(elf);
    match blaze.symbolize(&src, blazesym::symbolize::Input::FileOffset(offsets)) {
        Ok(results) => results
            .into_iter()
            .map(|r| match r {
                Symbolized::Sym(sym) => Ok(frames_of(&sym)),
                Symbolized::Unknown(r) => {
                    Err(Unknown::new(UnknownReason::NoSymbols, Side::User).detail(blaze_reason(r)))
                }
            })
            .collect(),
        Err(_) => {
            vec![Err(Unknown::new(UnknownReason::FileUnreadable, Side::User)); offsets.len()]
        }
    }
}

/// The frames of JIT code named by a jitdump: the code's own function,
/// then the function TurboFan inlined there, when the source position says
/// so.
fn jit_frames(dump: &JitDump, addr: u64) -> Option<Vec<Frame>> {
    let code = dump.lookup(addr)?;
    let mut frames = vec![Frame::new(
        crate::model::sanitize(&code.name),
        FrameKind::Jit,
    )];
    if let Some(name) = dump.functions().inlined_at(code, addr) {
        frames.push(Frame::new(
            crate::model::sanitize(&name),
            FrameKind::Inlined,
        ));
    }
    Some(frames)
}

/// A user frame that could not be named, named by its reason.
fn unknown(reason: UnknownReason) -> Frame {
    Frame::unknown(Unknown::new(reason, Side::User))
}

/// Whether a mapping is of a memfd (anonymous memory with a name).
fn is_memfd(backing: &Backing) -> bool {
    matches!(backing, Backing::File { path, .. } if path.starts_with("/memfd:"))
}

/// blazesym's reason for an address it could not name, in its words.
fn blaze_reason(r: blazesym::symbolize::Reason) -> &'static str {
    use blazesym::symbolize::Reason;
    match r {
        Reason::Unmapped => "address not in the process's maps",
        Reason::InvalidFileOffset => "file offset outside the file's code",
        Reason::MissingComponent => "mapping without a file",
        Reason::MissingSyms => "the file has no symbols",
        Reason::Unsupported => "unsupported kind of mapping",
        Reason::UnknownAddr => "no symbol covers the address",
        Reason::IgnoredError => "an error in the file",
        _ => "unknown",
    }
}

/// The frame of an address in memory that is not code.
fn not_code(entry: &MapEntry) -> Frame {
    let what = match &entry.backing {
        Backing::Anonymous => "anonymous memory".to_string(),
        Backing::File { path, .. } => format!("data of {}", basename(path)),
        Backing::Special(s) => s.clone(),
    };
    Frame::new(
        format!("[unknown: not code ({what}): the walk went wrong]"),
        FrameKind::Unknown(Box::new(Unknown::new(UnknownReason::NotCode, Side::User))),
    )
}

/// Why no kernel address can be named: kallsyms unreadable, or its
/// addresses hidden.
const KALLSYMS_HIDDEN: &str =
    "/proc/kallsyms shows no addresses (kptr_restrict, or not root) or cannot be read";

/// A kernel address that cannot be named, and why.
fn unknown_kernel(addr: Addr, detail: &'static str) -> Frame {
    let mut u = Unknown::new(UnknownReason::KernelUnknown, Side::Kernel).detail(detail);
    u.offset = Some(addr);
    Frame::unknown(u)
}

/// A return address points after its call: step back one byte so it
/// names the call's function and line (not for the leaf, the IP itself).
pub fn adjusted(addrs: &[u64]) -> impl Iterator<Item = u64> + '_ {
    addrs
        .iter()
        .enumerate()
        .map(|(i, &a)| if i == 0 { a } else { a.saturating_sub(1) })
}

/// The frames of every address of a set of stacks: kernel addresses, and
/// user addresses per process (keys are [`adjusted`] addresses).
#[derive(Debug, Default)]
pub struct SymbolTables {
    /// Kernel address -> frames, outermost first.
    pub kernel: HashMap<u64, Vec<Frame>>,
    /// Process -> user address -> frames, outermost first.
    pub user: HashMap<u32, HashMap<u64, Vec<Frame>>>,
}

/// Symbolizes every address of `stacks` once, with a fresh symbolizer.
pub fn symbol_tables<'a>(
    stacks: impl IntoIterator<Item = &'a RawStack> + Clone,
    procs: &ProcessTable,
) -> SymbolTables {
    symbol_tables_with(&mut Symbolizer::new(), stacks, procs)
}

/// Symbolizes every address of `stacks` once, with `sym` (whose parsed
/// files are reused; perf maps are read afresh, JIT code moves).
pub fn symbol_tables_with<'a>(
    sym: &mut Symbolizer,
    stacks: impl IntoIterator<Item = &'a RawStack> + Clone,
    procs: &ProcessTable,
) -> SymbolTables {
    sym.new_round();
    let kernel_addrs: Vec<u64> = stacks
        .clone()
        .into_iter()
        .filter_map(|s| s.kernel.as_ref().ok())
        .flat_map(|k| adjusted(k))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let kernel = sym.kernel(&kernel_addrs);
    let mut user = HashMap::new();
    for (tgid, addrs) in user_addresses(stacks) {
        let addrs: Vec<u64> = addrs.into_iter().collect();
        user.insert(tgid, sym.user(procs.get(tgid), &addrs));
    }
    SymbolTables { kernel, user }
}

/// The name of a process as shown in root frames and labels.
pub fn process_name(tgid: u32, thread: &str, procs: &ProcessTable) -> String {
    match (tgid, procs.get(tgid)) {
        (0, _) => "swapper".to_string(),
        (_, Some(p)) if !p.name.is_empty() => p.name.clone(),
        _ => thread.to_string(),
    }
}

/// Symbolizes a capture's stacks (those of `exclude` left out).
pub fn symbolize_profile(
    raw: &RawProfile,
    procs: &ProcessTable,
    exclude: Option<u32>,
) -> Vec<SymbolizedStack> {
    symbolize_profile_with(&mut Symbolizer::new(), raw, procs, exclude)
}

/// The same with `sym`, whose parsed files the caller reuses (record's
/// off-CPU and stall stacks are of the same binaries).
pub fn symbolize_profile_with(
    sym: &mut Symbolizer,
    raw: &RawProfile,
    procs: &ProcessTable,
    exclude: Option<u32>,
) -> Vec<SymbolizedStack> {
    let stacks: Vec<&RawStack> = raw
        .stacks
        .iter()
        .filter(|s| Some(s.tgid) != exclude)
        .collect();
    let tables = symbol_tables_with(sym, stacks.iter().copied(), procs);
    stacks
        .iter()
        .map(|s| symbolize_stack(s, &tables, procs))
        .collect()
}

/// One raw stack to frames, by tables made with [`symbol_tables`].
pub fn symbolize_stack(
    s: &RawStack,
    tables: &SymbolTables,
    procs: &ProcessTable,
) -> SymbolizedStack {
    let expand =
        |part: &RawStackPart, table: Option<&HashMap<u64, Vec<Frame>>>, side: Side| -> Vec<Frame> {
            match part {
                Ok(addrs) => {
                    let mut frames = Vec::new();
                    let adj: Vec<u64> = adjusted(addrs).collect();
                    for a in adj.iter().rev() {
                        if let Some(fs) = table.and_then(|t| t.get(a)) {
                            frames.extend(fs.iter().cloned());
                        }
                    }
                    frames
                }
                // -EFAULT: no stack of this kind (kernel thread, or a sample in
                // user mode); anything else was dropped.
                Err(e) if *e == -libc::EFAULT => Vec::new(),
                Err(_) => vec![Frame::unknown(Unknown::new(
                    UnknownReason::StackDropped,
                    side,
                ))],
            }
        };
    // A walk that reached an address in no mapping, or not in code, went
    // wrong before it: the frames past it (kernel frame-pointer walks go
    // on) are garbage. Keep that one frame, which says so, and stop.
    let user_table = tables.user.get(&s.tgid);
    let user_part: RawStackPart = match &s.user {
        Ok(addrs) => {
            let bad = |a: u64| {
                user_table.and_then(|t| t.get(&a)).is_some_and(|fs| {
                    fs.iter().any(|f| {
                        f.unknown_info().is_some_and(|u| {
                            matches!(u.reason, UnknownReason::Unmapped | UnknownReason::NotCode)
                        })
                    })
                })
            };
            let keep = adjusted(addrs).position(bad).map_or(addrs.len(), |i| i + 1);
            Ok(addrs[..keep].to_vec())
        }
        Err(e) => Err(*e),
    };
    let mut user_frames = expand(&user_part, user_table, Side::User);
    let marker = match s.user_cut {
        Some(Cut::Window) => Some(UnknownReason::Truncated),
        Some(Cut::Lost) => Some(UnknownReason::UnwindLost),
        // The last frame itself says where the walk went wrong.
        Some(Cut::BadAddress) | None => None,
    };
    if let Some(reason) = marker {
        user_frames.insert(0, unknown(reason));
    }
    SymbolizedStack {
        process: process_name(s.tgid, &s.thread, procs),
        group: None,
        tgid: s.tgid,
        user: user_frames,
        kernel: expand(&s.kernel, Some(&tables.kernel), Side::Kernel),
        count: s.count,
    }
}

#[cfg(test)]
mod tests;
