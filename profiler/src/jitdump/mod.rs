//! Reading jitdump files (`jit-PID.dump`, the format `perf inject --jit`
//! reads), written by Node.js/V8 with `--perf-prof`, and by the JVM and
//! .NET with their agents.
//!
//! A runtime maps the file into its own memory (that is how perf, and we,
//! find it: a mapping whose name is `jit-PID.dump`) and appends records as
//! it compiles. The records we use:
//!
//! - code load (0): address, size and name of a piece of JIT code;
//! - debug info (2), written just before the load it belongs to: for
//!   address ranges of the code, the source file, line and column. V8
//!   writes addresses 0x40 (an ELF header, where `perf inject` places the
//!   code) past the code's real address, and for code where TurboFan
//!   inlined other functions, the position in the innermost inlined
//!   function (its own file and line);
//! - unwinding info (4), just before its load: `.eh_frame` (CIE + FDE)
//!   followed by an `.eh_frame_hdr`, describing the code's frames
//!   (`--perf-prof-unwinding-info`);
//! - code move (1): code moved to another address.
//!
//! The file can end in a partly written record (the runtime is still
//! writing): parsing stops there, and [`JitDumpParser::feed`] picks up
//! where it stopped when more bytes come.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use crate::perfmap::CodeRanges;

/// `JiTD`, as written by a little-endian runtime.
const MAGIC: u32 = 0x4A69_5444;
/// What V8 adds to each debug-info address (an ELF header's size).
pub const V8_DEBUG_ADDR_BIAS: u64 = 0x40;
const RECORD_HEADER: usize = 16;
const LOAD: u32 = 0;
const MOVE: u32 = 1;
const DEBUG_INFO: u32 = 2;
const UNWINDING_INFO: u32 = 4;

/// One source position of JIT code: from `offset` (bytes from the code's
/// start) to the next entry's, the code came from `file`:`line`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineEntry {
    /// Offset from the code's start.
    pub offset: u64,
    /// 1-based line.
    pub line: u32,
    /// 1-based column (V8), or the discriminator other runtimes write.
    pub column: u32,
    /// Source file (script name or URL).
    pub file: Arc<str>,
}

/// One piece of JIT code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JitCode {
    /// First address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Name as the runtime wrote it (V8: `JS:*name file:line:col`,
    /// `Builtin:Name`, `RegExp:pattern`...).
    pub name: String,
    /// Source positions, sorted by offset (empty without debug info).
    pub lines: Vec<LineEntry>,
    /// `.eh_frame` for the code, when the runtime wrote unwinding info.
    pub eh_frame: Option<Arc<[u8]>>,
}

impl JitCode {
    /// The source position of the instruction at `addr`.
    pub fn line_at(&self, addr: u64) -> Option<&LineEntry> {
        let off = addr.checked_sub(self.start)?;
        let i = self.lines.partition_point(|l| l.offset <= off);
        i.checked_sub(1).map(|i| &self.lines[i])
    }
}

/// Why a file is not a jitdump we can read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JitDumpError {
    /// Shorter than its header.
    #[error("shorter than a jitdump header")]
    Short,
    /// Not `JiTD` (or a big-endian runtime's).
    #[error("not a jitdump (magic {0:#x})")]
    Magic(u32),
}

/// Incremental parser: bytes in, code records out.
#[derive(Debug, Default)]
pub struct JitDumpParser {
    /// Bytes of a record not complete yet (and the header, at first).
    pending: Vec<u8>,
    header_done: bool,
    debug: Option<(u64, Vec<LineEntry>)>,
    unwind: Option<Arc<[u8]>>,
    /// Bytes consumed so far (whole records and the header).
    pub consumed: u64,
    /// Records that did not parse (skipped).
    pub bad_records: u64,
}

/// What a record did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Code loaded.
    Load(JitCode),
    /// Code moved: (old start, new start, size).
    Move(u64, u64, u64),
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A NUL-terminated string at `at`, and the offset past its NUL.
fn cstr_at(b: &[u8], at: usize) -> Option<(&str, usize)> {
    let rest = b.get(at..)?;
    let len = rest.iter().position(|&c| c == 0)?;
    Some((std::str::from_utf8(&rest[..len]).ok()?, at + len + 1))
}

impl JitDumpParser {
    /// Parses what `bytes` completes; records cut at the end wait for the
    /// next call.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Event>, JitDumpError> {
        self.pending.extend_from_slice(bytes);
        let buf = std::mem::take(&mut self.pending);
        let mut at = 0usize;
        if !self.header_done {
            if buf.len() < 40 {
                self.pending = buf;
                return Ok(Vec::new());
            }
            let magic = u32_at(&buf, 0).ok_or(JitDumpError::Short)?;
            if magic != MAGIC {
                return Err(JitDumpError::Magic(magic));
            }
            let size = u32_at(&buf, 8).unwrap_or(40).max(40) as usize;
            if buf.len() < size {
                self.pending = buf;
                return Ok(Vec::new());
            }
            at = size;
            self.header_done = true;
        }
        let mut events = Vec::new();
        while let (Some(id), Some(size)) = (u32_at(&buf, at), u32_at(&buf, at + 4)) {
            let size = size as usize;
            if size < RECORD_HEADER {
                // A corrupt length: nothing after it can be framed.
                self.bad_records += 1;
                at = buf.len();
                break;
            }
            let Some(rec) = buf.get(at..at + size) else {
                break; // cut: the runtime is still writing it
            };
            if self.record(id, rec, &mut events).is_none() {
                self.bad_records += 1;
            }
            at += size;
        }
        self.consumed += at as u64;
        self.pending = buf[at.min(buf.len())..].to_vec();
        Ok(events)
    }

    fn record(&mut self, id: u32, r: &[u8], events: &mut Vec<Event>) -> Option<()> {
        let body = RECORD_HEADER;
        match id {
            LOAD => {
                let code_addr = u64_at(r, body + 16)?;
                let size = u64_at(r, body + 24)?;
                let (name, _) = cstr_at(r, body + 40)?;
                let lines = match self.debug.take() {
                    Some((addr, lines)) if addr == code_addr => lines,
                    _ => Vec::new(),
                };
                events.push(Event::Load(JitCode {
                    start: code_addr,
                    size,
                    name: name.to_string(),
                    lines,
                    eh_frame: self.unwind.take(),
                }));
            }
            MOVE => {
                let old = u64_at(r, body + 16)?;
                let new = u64_at(r, body + 24)?;
                let size = u64_at(r, body + 32)?;
                events.push(Event::Move(old, new, size));
            }
            DEBUG_INFO => {
                let code_addr = u64_at(r, body)?;
                let n = u64_at(r, body + 8)?;
                let mut at = body + 16;
                let mut files: HashMap<&str, Arc<str>> = HashMap::new();
                let mut raw = Vec::with_capacity(n.min(4096) as usize);
                let mut prev: Option<Arc<str>> = None;
                for _ in 0..n {
                    let addr = u64_at(r, at)?;
                    let line = u32_at(r, at + 8)?;
                    let column = u32_at(r, at + 12)?;
                    // A name of one byte 0xff: the same file as the entry
                    // before (the jitdump specification's shorthand).
                    let file = if r.get(at + 16..at + 18) == Some(&[0xff, 0][..]) {
                        at += 18;
                        prev.clone()?
                    } else {
                        let (file, next) = cstr_at(r, at + 16)?;
                        at = next;
                        files.entry(file).or_insert_with(|| Arc::from(file)).clone()
                    };
                    prev = Some(file.clone());
                    raw.push((addr, line, column, file));
                }
                // V8 writes each address an ELF header's size past the
                // code (where perf inject puts it); others write it as is.
                let bias = if raw
                    .first()
                    .is_some_and(|e| e.0 >= code_addr + V8_DEBUG_ADDR_BIAS)
                {
                    V8_DEBUG_ADDR_BIAS
                } else {
                    0
                };
                let mut lines: Vec<LineEntry> = raw
                    .into_iter()
                    .filter_map(|(addr, line, column, file)| {
                        Some(LineEntry {
                            offset: addr.checked_sub(code_addr + bias)?,
                            line,
                            column,
                            file,
                        })
                    })
                    .collect();
                lines.sort_by_key(|l| l.offset);
                self.debug = Some((code_addr, lines));
            }
            UNWINDING_INFO => {
                let unwinding_size = u64_at(r, body)? as usize;
                let hdr_size = u64_at(r, body + 8)? as usize;
                let mapped_size = u64_at(r, body + 16)?;
                let data = r.get(body + 24..body + 24 + unwinding_size)?;
                // mapped_size 0: V8 wrote an empty table (no info).
                self.unwind = (mapped_size > 0 && unwinding_size > hdr_size)
                    .then(|| Arc::from(&data[..unwinding_size - hdr_size]));
            }
            _ => {} // close (3) and records of later versions
        }
        Some(())
    }
}

/// The code of a jitdump, ready for look-ups.
#[derive(Clone, Debug, Default)]
pub struct JitDump {
    /// The live code: a later load replaces the earlier ones it overlaps.
    codes: CodeRanges<JitCode>,
    /// The JS functions every load named.
    functions: JsFunctions,
    /// Records that did not parse.
    pub bad_records: u64,
}

impl JitDump {
    /// Parses a whole file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, JitDumpError> {
        let mut p = JitDumpParser::default();
        let events = p.feed(bytes)?;
        let mut d = JitDump::default();
        d.apply(events);
        d.bad_records = p.bad_records;
        Ok(d)
    }

    /// Applies parsed records in order.
    pub fn apply(&mut self, events: Vec<Event>) {
        for e in events {
            match e {
                Event::Load(mut c) => {
                    self.functions.note(&c);
                    // Source positions are looked up only in optimized
                    // code (TurboFan, Maglev: the tiers that inline); the
                    // rest were noted above and need not be kept.
                    if !V8Name::parse(&c.name).is_some_and(|n| matches!(n.tier, Some('*' | '+'))) {
                        c.lines = Vec::new();
                    }
                    let end = c.start.saturating_add(c.size.max(1));
                    self.codes.insert(c.start, end, c);
                }
                Event::Move(old, new, size) => {
                    if let Some((_, mut c)) = self.codes.remove(old) {
                        c.start = new;
                        c.size = size;
                        self.codes.insert(new, new.saturating_add(size.max(1)), c);
                    }
                }
            }
        }
        self.functions.seal();
    }

    /// The JS functions it names, for telling inlined code apart.
    pub fn functions(&self) -> &JsFunctions {
        &self.functions
    }

    /// The code holding `addr`.
    pub fn lookup(&self, addr: u64) -> Option<&JitCode> {
        self.codes.get(addr)
    }

    /// Every live piece of code, by address.
    pub fn codes(&self) -> impl Iterator<Item = &JitCode> {
        self.codes.values()
    }

    /// Number of live pieces of code.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    /// True when no code was loaded.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }
}

/// A jitdump file followed as the runtime appends to it: each
/// [`JitDumpFollower::read_new`] parses only the bytes written since the
/// last, in chunks of 1 MiB. The symbolizer ([`JitDumpReader`]) and the
/// unwinder's JIT CFI (`jitcfi::JitCfi`) each follow one.
#[derive(Debug)]
pub struct JitDumpFollower {
    path: std::path::PathBuf,
    parser: JitDumpParser,
    read_to: u64,
    /// Not a jitdump: not read again.
    broken: bool,
}

impl JitDumpFollower {
    /// For the file at `path`, nothing read yet.
    pub fn new(path: std::path::PathBuf) -> Self {
        JitDumpFollower {
            path,
            parser: JitDumpParser::default(),
            read_to: 0,
            broken: false,
        }
    }

    /// Whether this follows the file at `path`.
    pub fn is_for(&self, path: &std::path::Path) -> bool {
        self.path == path
    }

    /// The records completed since the last call, reading at most `max`
    /// bytes (a long-lived runtime's dump holds every piece of code it
    /// compiled, machine code included: hundreds of MB); None when the
    /// file is not a jitdump.
    pub fn read_new(&mut self, max: u64) -> Option<Vec<Event>> {
        use std::io::{Read, Seek, SeekFrom};
        if self.broken {
            return None;
        }
        let mut events = Vec::new();
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Some(events);
        };
        if file.seek(SeekFrom::Start(self.read_to)).is_err() {
            return Some(events);
        }
        let mut chunk = vec![0u8; 1 << 20];
        let mut left = max;
        while left > 0 {
            let want = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match file.read(&mut chunk[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            self.read_to += n as u64;
            left -= n as u64;
            match self.parser.feed(&chunk[..n]) {
                Ok(e) => events.extend(e),
                Err(_) => {
                    self.broken = true;
                    return None;
                }
            }
        }
        Some(events)
    }

    /// Whether any of the file was read (it exists and was readable).
    pub fn has_read(&self) -> bool {
        self.read_to > 0
    }

    /// Records that did not parse so far.
    pub fn bad_records(&self) -> u64 {
        self.parser.bad_records
    }
}

/// A jitdump followed for symbolization: what was read so far, as a
/// [`JitDump`].
#[derive(Debug)]
pub struct JitDumpReader {
    follower: JitDumpFollower,
    /// What was read so far.
    pub dump: JitDump,
}

impl JitDumpReader {
    /// For the file at `path`, nothing read yet.
    pub fn new(path: std::path::PathBuf) -> Self {
        JitDumpReader {
            follower: JitDumpFollower::new(path),
            dump: JitDump::default(),
        }
    }

    /// Whether this follows the file at `path`.
    pub fn is_for(&self, path: &std::path::Path) -> bool {
        self.follower.is_for(path)
    }

    /// Reads and applies all that was appended since the last call; false
    /// when the file is not a jitdump, or was never readable.
    pub fn refresh(&mut self) -> bool {
        let Some(events) = self.follower.read_new(u64::MAX) else {
            return false;
        };
        self.dump.apply(events);
        self.dump.bad_records = self.follower.bad_records();
        self.follower.has_read()
    }
}

/// A V8 code name split up: `JS:*name file:line:col` (kind `JS`, tier
/// `*`). Tiers: `~` interpreted, `^` baseline (Sparkplug), `+` Maglev,
/// `*` TurboFan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V8Name<'a> {
    /// `JS`, `Eval`, `Script`, `Function`...
    pub kind: &'a str,
    /// The tier mark, if any.
    pub tier: Option<char>,
    /// The function's name (empty: anonymous).
    pub function: &'a str,
    /// Its script.
    pub file: &'a str,
    /// Where the function starts (1-based line and column).
    pub line: u32,
    /// Column of its start.
    pub column: u32,
}

impl<'a> V8Name<'a> {
    /// Parses a V8 code name of a JS function; None for builtins, stubs,
    /// regular expressions.
    pub fn parse(name: &'a str) -> Option<Self> {
        let (kind, rest) = name.split_once(':')?;
        if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_alphabetic()) {
            return None;
        }
        let (tier, rest) = match rest.chars().next() {
            Some(c @ ('~' | '^' | '+' | '*')) => (Some(c), &rest[1..]),
            _ => (None, rest),
        };
        let (function, place) = rest.rsplit_once(' ')?;
        let (file_line, column) = place.rsplit_once(':')?;
        let (file, line) = file_line.rsplit_once(':')?;
        Some(V8Name {
            kind,
            tier,
            function,
            file,
            line: line.parse().ok()?,
            column: column.parse().ok()?,
        })
    }

    /// The name without its tier mark: the same function whichever tier
    /// ran it (`JS:name file:line:col`).
    pub fn untiered(&self) -> String {
        format!(
            "{}:{} {}:{}:{}",
            self.kind, self.function, self.file, self.line, self.column
        )
    }
}

/// A function's start, the furthest position known to be its own, and its
/// untiered name.
type Extent = ((u32, u32), (u32, u32), String);

/// The JS functions a jitdump names, per script, with where each ends as
/// far as their baseline code shows (Sparkplug code inlines nothing, so
/// every source position of it is the function's own): used to tell which
/// function an inlined source position of TurboFan code belongs to.
#[derive(Clone, Debug, Default)]
pub struct JsFunctions {
    /// Untiered name -> (script, start).
    starts: HashMap<String, (Arc<str>, (u32, u32))>,
    /// Untiered name -> furthest own position of its baseline code.
    ends: HashMap<String, (u32, u32)>,
    /// Script -> (start, end, untiered name), sorted by start (built by
    /// [`JsFunctions::seal`]).
    by_file: HashMap<Arc<str>, Vec<Extent>>,
    /// Source position (line, column) -> the functions whose baseline code
    /// has that exact position: the positions of a function's bytecode,
    /// which TurboFan code inlining it carries too.
    positions: HashMap<(u32, u32), Vec<Arc<str>>>,
}

impl JsFunctions {
    /// Notes a piece of code (every load, live or since replaced: the
    /// extent of a function stays known after its baseline code is gone).
    pub fn note(&mut self, c: &JitCode) {
        // JS functions only: not scripts, evals, or the synthetic
        // class-field initializers, whose positions span a whole file or
        // class body around the functions inside them.
        let Some(n) =
            V8Name::parse(&c.name).filter(|n| n.kind == "JS" && !n.function.starts_with('<'))
        else {
            return;
        };
        let key = n.untiered();
        let start = (n.line, n.column);
        if n.tier == Some('^') {
            let name: Arc<str> = Arc::from(key.as_str());
            for l in c.lines.iter().filter(|l| &*l.file == n.file) {
                let e = self.ends.entry(key.clone()).or_insert(start);
                *e = (*e).max((l.line, l.column));
                let at = self.positions.entry((l.line, l.column)).or_default();
                if !at.contains(&name) && at.len() < 8 {
                    at.push(name.clone());
                }
            }
        }
        self.starts
            .entry(key)
            .or_insert_with(|| (Arc::from(n.file), start));
    }

    /// Builds the index the look-ups use, from what was noted.
    pub fn seal(&mut self) {
        let mut by_file: HashMap<Arc<str>, Vec<_>> = HashMap::new();
        for (name, (file, start)) in &self.starts {
            let end = self.ends.get(name).copied().unwrap_or(*start);
            by_file
                .entry(file.clone())
                .or_default()
                .push((*start, end, name.clone()));
        }
        for v in by_file.values_mut() {
            v.sort();
        }
        self.by_file = by_file;
    }

    /// The innermost function of `file` whose known extent spans
    /// `line`:`column`.
    pub fn at(&self, file: &str, line: u32, column: u32) -> Option<&str> {
        let fns = self.by_file.get(file)?;
        let pos = (line, column);
        let i = fns.partition_point(|(start, _, _)| *start <= pos);
        fns[..i]
            .iter()
            .rev()
            .find(|(start, end, _)| end > start && pos <= *end)
            .map(|(_, _, n)| n.as_str())
    }

    /// The function TurboFan inlined at `addr` of `code`, when its source
    /// position says so (None: the code's own function, or not known).
    ///
    /// V8 (Node 18-22) writes the innermost inlined function's line and
    /// column but the script name of the code's own function, so the
    /// script cannot be trusted: a position is first looked up exactly
    /// among the positions of every function's baseline code (whatever its
    /// script; among several, the one in the code's own script), then by
    /// extent in the code's own script. A position found neither way is
    /// left to the code's own function.
    pub fn inlined_at(&self, code: &JitCode, addr: u64) -> Option<String> {
        let own = V8Name::parse(&code.name)?;
        let l = code.line_at(addr)?;
        let own_key = own.untiered();
        let pos = (l.line, l.column);
        if let Some(names) = self.positions.get(&pos) {
            if names.iter().any(|n| **n == *own_key) {
                return None;
            }
            let in_own_file = |n: &&Arc<str>| V8Name::parse(n).is_some_and(|v| v.file == own.file);
            let pick = match names.len() {
                1 => names.first(),
                _ => {
                    let mut same = names.iter().filter(in_own_file);
                    match (same.next(), same.next()) {
                        (Some(n), None) => Some(n),
                        _ => None,
                    }
                }
            };
            return pick.map(|n| n.to_string());
        }
        match self.at(&l.file, l.line, l.column) {
            Some(f) if f != own_key => Some(f.to_string()),
            _ => None,
        }
    }
}

/// Where a process's jitdump is, as seen from the host: the runtime maps
/// it (that is how perf finds it too), wherever it wrote it.
pub fn path_of(process: &crate::procs::ProcessInfo) -> Option<PathBuf> {
    process.maps.iter().find_map(|m| match &m.backing {
        crate::procmaps::Backing::File { path, .. } if is_jitdump_path(path) => {
            Some(process.host_path(path))
        }
        _ => None,
    })
}

/// Whether a mapped file's path names a jitdump (`.../jit-PID.dump`).
pub fn is_jitdump_path(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.strip_prefix("jit-")
        .and_then(|r| r.strip_suffix(".dump"))
        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
pub(crate) mod tests;
