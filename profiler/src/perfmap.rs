//! Parsing JIT perf maps (`/tmp/perf-PID.map`, written by Node.js with
//! `--perf-basic-prof`, the JVM with perf-map-agent, and others).
//!
//! Format: one symbol a line, `START SIZE NAME`, START and SIZE in hex
//! (with or without `0x`), NAME the rest of the line (it may hold spaces).
//! A JIT appends as it compiles, so an address range can be named again
//! later (code moved or recompiled, memory reused): a line replaces every
//! earlier line whose range it overlaps ([`CodeRanges`]).

use std::{collections::BTreeMap, path::PathBuf};

/// Code ranges in the order a JIT announced them. A range announced later
/// replaces every earlier one it overlaps: the JIT reused that memory, so
/// the earlier code is gone, whichever of the two starts first (V8 puts
/// new optimized code over several dead smaller pieces, and small new
/// pieces inside a dead large one). Looking up the nearest start instead
/// names an address after dead code whenever a newer range starts before
/// it.
#[derive(Clone, Debug)]
pub struct CodeRanges<T> {
    /// start -> (end, value); the ranges are disjoint.
    map: BTreeMap<u64, (u64, T)>,
}

impl<T> Default for CodeRanges<T> {
    fn default() -> Self {
        CodeRanges {
            map: BTreeMap::new(),
        }
    }
}

impl<T> CodeRanges<T> {
    /// Adds `[start, end)`, removing what it overlaps.
    pub fn insert(&mut self, start: u64, end: u64, value: T) {
        let overlapped: Vec<u64> = self
            .map
            .range(..end.max(start + 1))
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapped {
            self.map.remove(&s);
        }
        self.map.insert(start, (end, value));
    }

    /// Removes the range starting at `start`, if any.
    pub fn remove(&mut self, start: u64) -> Option<(u64, T)> {
        self.map.remove(&start)
    }

    /// The value whose range holds `addr`.
    pub fn get(&self, addr: u64) -> Option<&T> {
        let (_, (end, v)) = self.map.range(..=addr).next_back()?;
        (addr < *end).then_some(v)
    }

    /// The values, by address.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.map.values().map(|(_, v)| v)
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// One symbol of a perf map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PerfMapSymbol {
    /// First address of the code.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Name as the runtime wrote it.
    pub name: String,
}

/// A parsed perf map, ready for look-ups.
#[derive(Clone, Debug, Default)]
pub struct PerfMap {
    /// The live symbols: later lines replace the earlier ones they overlap.
    symbols: CodeRanges<PerfMapSymbol>,
    /// Lines that did not parse.
    pub bad_lines: usize,
}

fn hex(s: &str) -> Option<u64> {
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(s, 16).ok()
}

impl PerfMap {
    /// Parses the text of a perf map; malformed lines are counted in
    /// [`PerfMap::bad_lines`] and skipped.
    pub fn parse(text: &str) -> Self {
        let mut symbols = CodeRanges::default();
        let mut bad_lines = 0;
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let mut parts = line.splitn(3, ' ');
            let (Some(start), Some(size), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                bad_lines += 1;
                continue;
            };
            let (Some(start), Some(size)) = (hex(start), hex(size)) else {
                bad_lines += 1;
                continue;
            };
            let name = name.trim();
            if name.is_empty() || size == 0 || start.checked_add(size).is_none() {
                bad_lines += 1;
                continue;
            }
            symbols.insert(
                start,
                start + size,
                PerfMapSymbol {
                    start,
                    size,
                    name: name.to_string(),
                },
            );
        }
        PerfMap { symbols, bad_lines }
    }

    /// The symbol covering `addr`, if any.
    pub fn lookup(&self, addr: u64) -> Option<&PerfMapSymbol> {
        self.symbols.get(addr)
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// True when no symbol parsed.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }
}

/// Where a process's perf map is, as seen from the host.
pub fn path_of(process: &crate::procs::ProcessInfo) -> PathBuf {
    process.host_path(&format!("/tmp/perf-{}.map", process.ns_pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_style_lines() {
        let text = "\
3ef414c0 1a0 Builtin:ArgumentsAdaptorTrampoline
0x7f1c3a6c2c40 58 LazyCompile:*hotLoop /srv/app/index.js:12:17
7f1c3a6c3000 20 JS:~<anonymous> node:internal/main:1:1
";
        let map = PerfMap::parse(text);
        assert_eq!(map.len(), 3);
        assert_eq!(map.bad_lines, 0);
        assert_eq!(
            map.lookup(0x7f1c3a6c2c41).unwrap().name,
            "LazyCompile:*hotLoop /srv/app/index.js:12:17"
        );
        assert_eq!(
            map.lookup(0x3ef414c0).unwrap().name,
            "Builtin:ArgumentsAdaptorTrampoline"
        );
        assert!(map.lookup(0x3ef414c0 + 0x1a0).is_none());
        assert!(map.lookup(0x10).is_none());
    }

    #[test]
    fn the_last_line_for_an_address_wins() {
        let text = "1000 100 old\n1000 80 new\n";
        let map = PerfMap::parse(text);
        assert_eq!(map.len(), 1);
        assert_eq!(map.lookup(0x1010).unwrap().name, "new");
        assert!(map.lookup(0x1090).is_none());
    }

    /// A later range replaces the earlier ones it overlaps, whichever
    /// starts first: as V8 wrote it, optimized code (`*parserOnHeadersComplete`,
    /// 0x1a00 bytes) laid over an older interpreter trampoline starting
    /// inside it; the nearest start named 240 of its samples after the
    /// dead trampoline.
    #[test]
    fn later_ranges_replace_what_they_overlap() {
        let text = "1100 10 small\n1000 1000 big\n";
        let map = PerfMap::parse(text);
        assert_eq!(map.lookup(0x1105).unwrap().name, "big");
        assert_eq!(map.lookup(0x1200).unwrap().name, "big");
        let text = "1000 1000 big\n1100 10 small\n";
        let map = PerfMap::parse(text);
        assert_eq!(map.lookup(0x1105).unwrap().name, "small");
        assert!(
            map.lookup(0x1200).is_none(),
            "the big one's memory was reused"
        );
        assert!(map.lookup(0x1000).is_none());
        let map = PerfMap::parse("1000 100 a\n1100 100 b\n1080 100 c\n2000 10 d\n");
        assert_eq!(map.len(), 2);
        assert_eq!(map.lookup(0x1090).unwrap().name, "c");
        assert!(map.lookup(0x1190).is_none());
        assert_eq!(map.lookup(0x2000).unwrap().name, "d");
    }

    #[test]
    fn malformed_lines_are_counted_and_skipped() {
        let text = "zzzz 10 name\n1000 10\n1000 zz name\n2000 0 empty\nffffffffffffffff 10 wraps\n3000 10 ok\n\n";
        let map = PerfMap::parse(text);
        assert_eq!(map.bad_lines, 5);
        assert_eq!(map.len(), 1);
        assert_eq!(map.lookup(0x3000).unwrap().name, "ok");
    }
}
