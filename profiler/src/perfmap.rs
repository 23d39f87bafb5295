//! Parsing JIT perf maps (`/tmp/perf-PID.map`, written by Node.js with
//! `--perf-basic-prof`, the JVM with perf-map-agent, and others).
//!
//! Format: one symbol a line, `START SIZE NAME`, START and SIZE in hex
//! (with or without `0x`), NAME the rest of the line (it may hold spaces).
//! A JIT appends as it compiles, so an address range can be named again
//! later (code moved or recompiled): the last line covering it wins.

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
    /// Sorted by start; where starts are equal only the last written is kept.
    symbols: Vec<PerfMapSymbol>,
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
        let mut symbols: Vec<(usize, PerfMapSymbol)> = Vec::new();
        let mut bad_lines = 0;
        for (order, line) in text.lines().enumerate() {
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
            symbols.push((
                order,
                PerfMapSymbol {
                    start,
                    size,
                    name: name.to_string(),
                },
            ));
        }
        // Newest last for equal starts, then keep only the newest.
        symbols.sort_by_key(|(order, s)| (s.start, *order));
        let mut out: Vec<PerfMapSymbol> = Vec::with_capacity(symbols.len());
        for (_, s) in symbols {
            match out.last_mut() {
                Some(last) if last.start == s.start => *last = s,
                _ => out.push(s),
            }
        }
        PerfMap {
            symbols: out,
            bad_lines,
        }
    }

    /// The symbol covering `addr`, if any.
    pub fn lookup(&self, addr: u64) -> Option<&PerfMapSymbol> {
        let idx = self.symbols.partition_point(|s| s.start <= addr);
        // Ranges can overlap (recompiled code): look back a few entries for
        // one that covers the address.
        self.symbols[..idx]
            .iter()
            .rev()
            .take(8)
            .find(|s| addr < s.start + s.size)
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

    #[test]
    fn overlapping_ranges_find_the_covering_symbol() {
        let text = "1000 1000 big\n1100 10 small\n";
        let map = PerfMap::parse(text);
        assert_eq!(map.lookup(0x1105).unwrap().name, "small");
        assert_eq!(map.lookup(0x1200).unwrap().name, "big");
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
