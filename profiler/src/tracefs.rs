//! Tracepoint record layouts, read from tracefs format files at run time so
//! that the programs work whatever this kernel's layout is.

use std::fs;

use crate::preflight::TRACEFS;

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Name (without any `[N]` array suffix).
    pub name: String,
    /// Byte offset in the record.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
}

/// A tracepoint this kernel does not have (or tracefs cannot show).
#[derive(Debug, thiserror::Error)]
#[error("tracepoint {tracepoint} not available ({path}: {source})")]
pub struct TracepointMissing {
    /// `category:name`.
    pub tracepoint: String,
    /// The format file looked for.
    pub path: String,
    /// Why it could not be read.
    #[source]
    pub source: std::io::Error,
}

/// A tracepoint's format: its fields and its print format.
#[derive(Clone, Debug, Default)]
pub struct Format {
    /// Fields in record order.
    pub fields: Vec<Field>,
    /// The `print fmt:` line.
    pub print_fmt: String,
}

impl Format {
    /// Parses the text of a format file.
    pub fn parse(text: &str) -> Self {
        let mut out = Format::default();
        for line in text.lines() {
            let l = line.trim();
            if let Some(pf) = l.strip_prefix("print fmt:") {
                out.print_fmt = pf.trim().to_string();
                continue;
            }
            let Some(rest) = l.strip_prefix("field:") else {
                continue;
            };
            let mut parts = rest.split(';').map(str::trim);
            let Some(decl) = parts.next() else { continue };
            let Some(name) = decl
                .split_whitespace()
                .last()
                .and_then(|n| n.split('[').next())
            else {
                continue;
            };
            let mut offset = None;
            let mut size = None;
            for p in parts {
                if let Some(v) = p.strip_prefix("offset:") {
                    offset = v.trim().parse().ok();
                } else if let Some(v) = p.strip_prefix("size:") {
                    size = v.trim().parse().ok();
                }
            }
            if let (Some(offset), Some(size)) = (offset, size) {
                out.fields.push(Field {
                    name: name.to_string(),
                    offset,
                    size,
                });
            }
        }
        out
    }

    /// Reads `events/CATEGORY/NAME/format` under tracefs.
    pub fn read(category: &str, name: &str) -> Result<Self, TracepointMissing> {
        let path = format!("{TRACEFS}/events/{category}/{name}/format");
        fs::read_to_string(&path)
            .map(|t| Self::parse(&t))
            .map_err(|source| TracepointMissing {
                tracepoint: format!("{category}:{name}"),
                path,
                source,
            })
    }

    /// A field by name.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Offsets of the named fields, [`profiler_common::NO_FIELD`] for those
    /// this kernel's record lacks.
    pub fn offsets<const N: usize>(&self, names: &[&str; N]) -> [u32; N] {
        names.map(|n| self.offset_or_none(n))
    }

    /// Offset of a field, or [`profiler_common::NO_FIELD`].
    pub fn offset_or_none(&self, name: &str) -> u32 {
        self.field(name)
            .map_or(profiler_common::NO_FIELD, |f| f.offset)
    }
}

/// The mask that tells a runnable `prev_state` in sched_switch: the state
/// bits and the "preempted" bit (`TASK_REPORT_MAX`) are printed from
/// `prev_state & ((((TASK_REPORT) + 1) << 1) - 1)`; a runnable task (R or R+)
/// has none of the TASK_REPORT bits set. Returns TASK_REPORT_MAX - 1
/// computed from the print format, or 0xff (this kernel line's value).
pub fn switch_runnable_mask(print_fmt: &str) -> u64 {
    let parse = || -> Option<u64> {
        let start = print_fmt.find("REC->prev_state & ((((")? + "REC->prev_state & ((((".len();
        let end = start + print_fmt[start..].find(") + 1)")?;
        let mut report = 0u64;
        for tok in print_fmt[start..end].split('|') {
            let t = tok.trim();
            let t = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X"))?;
            report |= u64::from_str_radix(t, 16).ok()?;
        }
        // TASK_REPORT_MAX = (TASK_REPORT + 1) << 1 is the preempted bit;
        // the bits below it are states other than running.
        Some(((report + 1) << 1) - 1)
    };
    parse().unwrap_or(0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWITCH: &str = "name: sched_switch\nID: 1\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;\n\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;\n\nprint fmt: \"prev_state=%s%s\", (REC->prev_state & ((((0x00000000 | 0x00000001 | 0x00000002 | 0x00000004 | 0x00000008 | 0x00000010 | 0x00000020 | 0x00000040) + 1) << 1) - 1)) ? __print_flags(x) : \"R\"\n";

    #[test]
    fn parses_fields_and_arrays() {
        let f = Format::parse(SWITCH);
        assert_eq!(f.field("prev_comm").unwrap().size, 16);
        assert_eq!(f.field("prev_state").unwrap().offset, 32);
        assert_eq!(f.offset_or_none("next_pid"), 56);
        assert_eq!(f.offset_or_none("nope"), profiler_common::NO_FIELD);
        assert!(f.print_fmt.starts_with("\"prev_state"));
    }

    #[test]
    fn runnable_mask_from_print_fmt() {
        let f = Format::parse(SWITCH);
        // TASK_REPORT = 0x7f: the state bits 0x7f and TASK_REPORT_IDLE 0x80,
        // not the preempted bit 0x100.
        assert_eq!(switch_runnable_mask(&f.print_fmt), 0xff);
        assert_eq!(switch_runnable_mask("garbage"), 0xff);
        let old = "(REC->prev_state & ((((0x0000 | 0x0001 | 0x0002 | 0x0004 | 0x0008 | 0x0010 | 0x0020 | 0x0040 | 0x0080) + 1) << 1) - 1))";
        assert_eq!(switch_runnable_mask(old), 0x1ff);
    }
}
