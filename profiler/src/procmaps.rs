//! Parsing `/proc/PID/maps` and turning a process's virtual addresses into
//! (file, file offset) pairs: the "normalize" stage.

use std::fmt;

/// What backs a mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A file, by its path as the process sees it (inside its mount
    /// namespace). `deleted` when the kernel marked it `(deleted)`.
    File {
        /// Absolute path in the process's mount namespace.
        path: String,
        /// The file was unlinked or replaced since it was mapped.
        deleted: bool,
    },
    /// A kernel-named region such as `[vdso]`, `[heap]`, `[stack]`.
    Special(String),
    /// Anonymous memory (JIT code lives here).
    Anonymous,
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// First address of the mapping.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Mapped with execute permission.
    pub exec: bool,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// Inode of the file (0 for anonymous memory).
    pub inode: u64,
    /// What backs it.
    pub backing: Backing,
}

/// A malformed maps line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed /proc/PID/maps line {line_no}: {reason}: {line:?}")]
pub struct MapsParseError {
    /// 1-based line number.
    pub line_no: usize,
    /// What was wrong.
    pub reason: &'static str,
    /// The line, as read.
    pub line: String,
}

/// Parses the text of a `/proc/PID/maps` file. Malformed lines are returned
/// as errors beside the entries that parsed, so one bad line does not lose
/// the rest.
pub fn parse_maps(text: &str) -> (Vec<MapEntry>, Vec<MapsParseError>) {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(e) => entries.push(e),
            Err(reason) => errors.push(MapsParseError {
                line_no: i + 1,
                reason,
                line: line.to_string(),
            }),
        }
    }
    entries.sort_by_key(|e| e.start);
    (entries, errors)
}

fn parse_line(line: &str) -> Result<MapEntry, &'static str> {
    // address perms offset dev inode [pathname]; the pathname may hold spaces.
    let mut rest = line;
    let mut field = || -> Result<&str, &'static str> {
        let t = rest.trim_start();
        let end = t.find(' ').unwrap_or(t.len());
        let (f, r) = t.split_at(end);
        rest = r;
        if f.is_empty() {
            Err("missing field")
        } else {
            Ok(f)
        }
    };
    let range = field()?;
    let perms = field()?;
    let offset = field()?;
    let _dev = field()?;
    let inode = field()?;
    let path = rest.trim_start();

    let (start, end) = range.split_once('-').ok_or("address range without '-'")?;
    let start = u64::from_str_radix(start, 16).map_err(|_| "bad start address")?;
    let end = u64::from_str_radix(end, 16).map_err(|_| "bad end address")?;
    if end <= start {
        return Err("empty or inverted address range");
    }
    if perms.len() != 4 {
        return Err("permissions are not 4 characters");
    }
    let exec = perms.as_bytes()[2] == b'x';
    let offset = u64::from_str_radix(offset, 16).map_err(|_| "bad offset")?;
    let inode = inode.parse::<u64>().map_err(|_| "bad inode")?;
    let backing = if path.is_empty() {
        Backing::Anonymous
    } else if path.starts_with('[') {
        Backing::Special(path.to_string())
    } else if let Some(p) = path.strip_suffix(" (deleted)") {
        Backing::File {
            path: p.to_string(),
            deleted: true,
        }
    } else if path.starts_with('/') {
        Backing::File {
            path: path.to_string(),
            deleted: false,
        }
    } else {
        // e.g. "anon_inode:..." or "/memfd:..." variants: named anonymous.
        Backing::Special(path.to_string())
    };
    Ok(MapEntry {
        start,
        end,
        exec,
        offset,
        inode,
        backing,
    })
}

/// Where a user address lands once normalized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Normalized<'a> {
    /// In a file-backed mapping, at this offset of the file.
    File {
        /// The mapping.
        entry: &'a MapEntry,
        /// Offset of the address in the file.
        file_offset: u64,
    },
    /// In anonymous memory (JIT code, if anything).
    Anonymous(&'a MapEntry),
    /// In a special region (`[vdso]` and the like), at this offset from its start.
    Special {
        /// The mapping.
        entry: &'a MapEntry,
        /// Offset from the mapping's start.
        offset: u64,
    },
    /// In no mapping at all.
    Unmapped,
}

/// Finds the mapping of `addr` in `maps` (sorted by start, as
/// [`parse_maps`] returns them).
pub fn normalize(maps: &[MapEntry], addr: u64) -> Normalized<'_> {
    let idx = maps.partition_point(|e| e.start <= addr);
    let Some(entry) = idx.checked_sub(1).map(|i| &maps[i]) else {
        return Normalized::Unmapped;
    };
    if addr >= entry.end {
        return Normalized::Unmapped;
    }
    match &entry.backing {
        Backing::File { .. } => Normalized::File {
            entry,
            file_offset: addr - entry.start + entry.offset,
        },
        Backing::Anonymous => Normalized::Anonymous(entry),
        Backing::Special(_) => Normalized::Special {
            entry,
            offset: addr - entry.start,
        },
    }
}

/// Short display name of a file path: its last component.
pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backing::File { path, .. } => f.write_str(path),
            Backing::Special(s) => f.write_str(s),
            Backing::Anonymous => f.write_str("[anon]"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1311 /usr/bin/cat
55d0c0a02000-55d0c0a07000 r-xp 00002000 fd:01 1311 /usr/bin/cat
7f00aa000000-7f00aa100000 rwxp 00000000 00:00 0 
7f00ab000000-7f00ab022000 r-xp 00028000 fd:01 2222                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f00ac000000-7f00ac001000 r-xp 00001000 fd:01 3333 /opt/my app/lib foo.so (deleted)
7ffc1a1f0000-7ffc1a1f2000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_every_kind_of_line() {
        let (maps, errors) = parse_maps(SAMPLE);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(maps.len(), 7);
        assert_eq!(maps[1].offset, 0x2000);
        assert!(maps[1].exec);
        assert!(!maps[0].exec);
        assert_eq!(maps[2].backing, Backing::Anonymous);
        assert_eq!(
            maps[3].backing,
            Backing::File {
                path: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
                deleted: false
            }
        );
        assert_eq!(
            maps[4].backing,
            Backing::File {
                path: "/opt/my app/lib foo.so".into(),
                deleted: true
            }
        );
        assert_eq!(maps[5].backing, Backing::Special("[vdso]".into()));
        assert_eq!(maps[6].end, 0xffffffffff601000);
    }

    #[test]
    fn bad_lines_are_reported_and_the_rest_kept() {
        // The last line was found by `cargo xtask fuzz` (an empty range).
        let text = "zz-10 r-xp 0 fd:01 1 /a\n1000-2000 r-xp 0 fd:01 1 /b\n2000-1000 r-xp 0 0 1\n3000-4000 rx 0 0:0 1 /c\n5000-6000 r-xp\n7-7 \u{15}\u{15}\u{15}\u{15} 3 # 3 AAAA\n";
        let (maps, errors) = parse_maps(text);
        assert_eq!(maps.len(), 1);
        assert_eq!(errors.len(), 5);
        assert_eq!(errors[0].line_no, 1);
        assert_eq!(errors[0].reason, "bad start address");
        assert_eq!(errors[1].reason, "empty or inverted address range");
        assert_eq!(errors[2].reason, "permissions are not 4 characters");
        assert_eq!(errors[3].reason, "missing field");
        assert_eq!(errors[4].reason, "empty or inverted address range");
    }

    #[test]
    fn normalizes_to_file_offsets() {
        let (maps, _) = parse_maps(SAMPLE);
        match normalize(&maps, 0x55d0c0a02010) {
            Normalized::File { entry, file_offset } => {
                assert_eq!(file_offset, 0x2010);
                assert_eq!(entry.inode, 1311);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            normalize(&maps, 0x7f00aa000010),
            Normalized::Anonymous(_)
        ));
        assert!(matches!(
            normalize(&maps, 0x7ffc1a1f0100),
            Normalized::Special { offset: 0x100, .. }
        ));
        assert_eq!(normalize(&maps, 0x10), Normalized::Unmapped);
        assert_eq!(normalize(&maps, 0x55d0c0a07000), Normalized::Unmapped);
    }
}
