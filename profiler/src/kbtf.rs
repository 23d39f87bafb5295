//! Kernel struct offsets from the kernel's own BTF, for the fields the
//! programs read directly (run-queue depth). Field names change between
//! kernel versions; every candidate is tried, and when none fits the
//! signal is reported unavailable with the names that were tried.

use std::collections::HashMap;

/// Where the kernel's BTF is.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// BTF kinds this reader looks into (include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// One type of the BTF: what the member look-ups need.
#[derive(Clone, Copy, Debug)]
struct TypeInfo {
    kind: u32,
    name_off: u32,
    /// Size (INT, STRUCT, UNION) or referenced type id (modifiers).
    size_or_type: u32,
    /// Members: byte offset of the first `btf_member` in the data.
    members_at: usize,
    vlen: u32,
    kind_flag: bool,
}

/// A small reader of the kernel's BTF: one pass over the type section,
/// no per-type allocation (the whole vmlinux BTF holds ~100k types), then
/// member look-ups by struct name.
pub struct Btf {
    data: Vec<u8>,
    strings_at: usize,
    strings_len: usize,
    /// Index `id - 1`.
    types: Vec<TypeInfo>,
    /// Struct/union name -> type ids.
    by_name: HashMap<String, Vec<u32>>,
}

/// Why BTF could not give what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The kernel's BTF file could not be read.
    #[error("kernel BTF unreadable ({VMLINUX_BTF}: {0}); needs CONFIG_DEBUG_INFO_BTF")]
    Unreadable(#[source] std::io::Error),
    /// The bytes are not BTF this parser understands.
    #[error("BTF unparsable: {0}")]
    Malformed(String),
    /// A struct lacks a member the programs read.
    #[error("struct {strukt} has no member {member}{note}")]
    NoMember {
        /// The struct.
        strukt: &'static str,
        /// The member.
        member: &'static str,
        /// Why a kernel may lack it.
        note: &'static str,
    },
    /// A count field is not the 4-byte integer the programs read.
    #[error("cfs_rq.{field} is {size} bytes, expected a 4-byte count")]
    BadSize {
        /// The field.
        field: &'static str,
        /// Its size.
        size: u32,
    },
    /// No run-queue count field this profiler knows.
    #[error("struct cfs_rq has none of the fields {}", COUNT_FIELDS.join(", "))]
    NoCountField,
}

/// A member found: its byte offset and its type id.
pub type Member = (u32, u32);

impl Btf {
    /// Parses raw BTF (the bytes of /sys/kernel/btf/vmlinux).
    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let bad = |what: String| BtfError::Malformed(what);
        let short = || BtfError::Malformed("short BTF header".into());
        let u32_at = |d: &[u8], o: usize| -> Option<u32> {
            d.get(o..o + 4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        };
        if data.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err(bad("not little-endian BTF (bad magic)".into()));
        }
        let hdr_len = u32_at(&data, 4).ok_or_else(short)? as usize;
        let type_off = u32_at(&data, 8).ok_or_else(short)? as usize;
        let type_len = u32_at(&data, 12).ok_or_else(short)? as usize;
        let str_off = u32_at(&data, 16).ok_or_else(short)? as usize;
        let str_len = u32_at(&data, 20).ok_or_else(short)? as usize;
        let (t0, t1) = (hdr_len + type_off, hdr_len + type_off + type_len);
        let strings_at = hdr_len + str_off;
        if t1 > data.len() || strings_at + str_len > data.len() {
            return Err(bad("BTF sections run past the end".into()));
        }
        let mut types = Vec::with_capacity(type_len / 16);
        let mut at = t0;
        while at + 12 <= t1 {
            let name_off = u32_at(&data, at).unwrap();
            let info = u32_at(&data, at + 4).unwrap();
            let size_or_type = u32_at(&data, at + 8).unwrap();
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let kind_flag = info >> 31 == 1;
            let body = at + 12;
            let extra = match kind {
                1 | 14 | 17 => 4,                      // INT, VAR, DECL_TAG
                3 => 12,                               // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen as usize, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen as usize,           // ENUM, FUNC_PROTO
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
                k => return Err(bad(format!("unknown BTF kind {k}"))),
            };
            if body + extra > t1 {
                return Err(bad(format!(
                    "BTF type {} runs past the type section",
                    types.len() + 1
                )));
            }
            types.push(TypeInfo {
                kind,
                name_off,
                size_or_type,
                members_at: body,
                vlen,
                kind_flag,
            });
            at = body + extra;
        }
        let mut btf = Btf {
            data,
            strings_at,
            strings_len: str_len,
            types,
            by_name: HashMap::new(),
        };
        for (i, t) in btf.types.iter().enumerate() {
            if (t.kind == KIND_STRUCT || t.kind == KIND_UNION) && t.name_off != 0 {
                let name = btf.string(t.name_off).to_string();
                btf.by_name.entry(name).or_default().push(i as u32 + 1);
            }
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let start = self.strings_at + off as usize;
        let end = self.strings_at + self.strings_len;
        let bytes = &self.data[start.min(end)..end];
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..len]).unwrap_or("")
    }

    fn get(&self, id: u32) -> Option<&TypeInfo> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// The type behind typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<(u32, &TypeInfo)> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some((id, t)),
            }
        }
        None
    }

    fn find_in(&self, t: &TypeInfo, member: &str) -> Option<Member> {
        self.find_in_depth(t, member, 0)
    }

    /// Looks into anonymous members at most 16 deep (malformed BTF may
    /// make a struct its own member).
    fn find_in_depth(&self, t: &TypeInfo, member: &str, depth: u32) -> Option<Member> {
        if depth > 16 {
            return None;
        }
        for i in 0..t.vlen as usize {
            let m = t.members_at + 12 * i;
            let word =
                |o: usize| u32::from_le_bytes(self.data[m + o..m + o + 4].try_into().unwrap());
            let (name_off, ty, offset) = (word(0), word(4), word(8));
            let bits = if t.kind_flag {
                offset & 0xff_ffff
            } else {
                offset
            };
            if name_off != 0 {
                if self.string(name_off) == member {
                    return Some((bits / 8, ty));
                }
            } else if let Some((_, inner)) = self.resolve(ty)
                && (inner.kind == KIND_STRUCT || inner.kind == KIND_UNION)
                && let Some((off, mty)) = self.find_in_depth(inner, member, depth + 1)
            {
                // Anonymous struct or union: look inside.
                return Some((bits / 8 + off, mty));
            }
        }
        None
    }

    /// Byte offset of `member` in struct (or union) `name`, looking into
    /// anonymous structs and unions; with the member's type id.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<Member> {
        self.by_name
            .get(name)?
            .iter()
            .find_map(|&id| self.find_in(self.get(id)?, member))
    }

    /// Size in bytes of an integer type (behind typedefs), else None.
    pub fn int_size(&self, id: u32) -> Option<u32> {
        let (_, t) = self.resolve(id)?;
        (t.kind == KIND_INT).then_some(t.size_or_type)
    }
}

const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_ENUM64: u32 = 19;

impl Btf {
    /// The u32 at `at`; 0 past the end (parse checked every type's extent,
    /// so this only guards against arithmetic on malformed values).
    fn word(&self, at: usize) -> u32 {
        self.data
            .get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()))
    }

    /// The value of enumerator `name`, in whichever enum declares it.
    pub fn enum_value(&self, name: &str) -> Option<i64> {
        for t in &self.types {
            let stride = match t.kind {
                KIND_ENUM => 8,
                KIND_ENUM64 => 12,
                _ => continue,
            };
            for i in 0..t.vlen as usize {
                let e = t.members_at + stride * i;
                if self.string(self.word(e)) == name {
                    let lo = self.word(e + 4);
                    return Some(if t.kind == KIND_ENUM {
                        lo as i32 as i64
                    } else {
                        (lo as u64 | (self.word(e + 8) as u64) << 32) as i64
                    });
                }
            }
        }
        None
    }

    /// Element count of an array type (behind typedefs), else None.
    pub fn array_len(&self, id: u32) -> Option<u32> {
        let (_, t) = self.resolve(id)?;
        (t.kind == KIND_ARRAY).then(|| self.word(t.members_at + 8))
    }

    /// Whether argument `n` (0-based, as a raw tracepoint sees it) of
    /// tracepoint `tp` is a pointer to `struct target`, per the
    /// `btf_trace_<tp>` typedef the kernel declares for every tracepoint.
    pub fn tracepoint_arg_is(&self, tp: &str, n: usize, target: &str) -> bool {
        let want = format!("btf_trace_{tp}");
        let Some(id) = self
            .types
            .iter()
            .position(|t| t.kind == KIND_TYPEDEF && self.string(t.name_off) == want)
        else {
            return false;
        };
        let pointee = |id: u32| -> Option<&TypeInfo> {
            let (_, p) = self.resolve(id)?;
            (p.kind == KIND_PTR).then_some(())?;
            Some(self.resolve(p.size_or_type)?.1)
        };
        let Some(proto) = pointee(id as u32 + 1) else {
            return false;
        };
        // Parameter 0 is the raw tracepoint's context (`void *`).
        if proto.kind != KIND_FUNC_PROTO || proto.vlen as usize <= n + 1 {
            return false;
        }
        let param_ty = self.word(proto.members_at + 8 * (n + 1) + 4);
        pointee(param_ty)
            .is_some_and(|s| s.kind == KIND_STRUCT && self.string(s.name_off) == target)
    }
}

/// Finds the offsets of the task -> cgroup chain (see
/// `profiler_common::oom::cgroup_field`), or says why they cannot be found.
pub fn cgroup_offsets(btf: &Btf) -> Result<[u32; 7], BtfError> {
    use profiler_common::{NO_FIELD, oom::cgroup_field as f};
    let need = |strukt: &'static str, member: &'static str| -> Result<Member, BtfError> {
        member_offset(btf, strukt, member).ok_or(BtfError::NoMember {
            strukt,
            member,
            note: "",
        })
    };
    let mut out = [NO_FIELD; 7];
    out[f::TASK_PID] = need("task_struct", "pid")?.0;
    out[f::TASK_CGROUPS] = need("task_struct", "cgroups")?.0;
    out[f::CSS_SET_DFL_CGRP] = need("css_set", "dfl_cgrp")?.0;
    out[f::CSS_CGROUP] = need("cgroup_subsys_state", "cgroup")?.0;
    out[f::CGROUP_KN] = need("cgroup", "kn")?.0;
    let (kn_id, kn_ty) = need("kernfs_node", "id")?;
    if btf.int_size(kn_ty) != Some(8) {
        // Before 5.5 the id was a union of {ino, generation}: its low
        // word is still the inode number, read as a u64 and masked.
        if member_offset(btf, "kernfs_node", "id").is_none() {
            return Err(BtfError::NoMember {
                strukt: "kernfs_node",
                member: "id",
                note: "",
            });
        }
    }
    out[f::KN_ID] = kn_id;
    let (subsys, subsys_ty) = need("css_set", "subsys")?;
    if let Some(idx) = btf.enum_value("memory_cgrp_id")
        && idx >= 0
        && btf.array_len(subsys_ty).is_some_and(|n| (idx as u32) < n)
    {
        out[f::CSS_SET_MEMCG] = subsys + 8 * idx as u32;
    }
    Ok(out)
}

/// Byte offset of `member` in struct `name` (see [`Btf::member_offset`]).
pub fn member_offset(btf: &Btf, name: &str, member: &str) -> Option<Member> {
    btf.member_offset(name, member)
}

/// Offsets for the run-queue depth read:
/// `task_struct.se.cfs_rq` -> `cfs_rq.rq` -> `rq.cfs.<count>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepthOffsets {
    /// Offset of `se.cfs_rq` in `task_struct`.
    pub task_cfs_rq: u32,
    /// Offset of `rq` in `cfs_rq`.
    pub cfs_rq_rq: u32,
    /// Offset of `cfs.<count>` in `rq`.
    pub rq_nr_runnable: u32,
    /// Which count field was found.
    pub count_field: &'static str,
}

/// Count fields of `struct cfs_rq`, best first: `h_nr_runnable` (6.14+,
/// excludes delayed-dequeue tasks), `h_nr_running` (before 6.14),
/// `h_nr_queued` (6.14+, includes delayed tasks).
pub const COUNT_FIELDS: [&str; 3] = ["h_nr_runnable", "h_nr_running", "h_nr_queued"];

/// Finds the run-queue depth offsets, or says why they cannot be found.
pub fn depth_offsets(btf: &Btf) -> Result<DepthOffsets, BtfError> {
    let need = |strukt: &'static str, member: &'static str, note: &'static str| {
        member_offset(btf, strukt, member).ok_or(BtfError::NoMember {
            strukt,
            member,
            note,
        })
    };
    let (se, _) = need("task_struct", "se", "")?;
    let no_group = " (kernel built without CONFIG_FAIR_GROUP_SCHED)";
    let (cfs_rq, _) = need("sched_entity", "cfs_rq", no_group)?;
    let (rq, _) = need("cfs_rq", "rq", no_group)?;
    let (cfs, _) = need("rq", "cfs", "")?;
    for field in COUNT_FIELDS {
        if let Some((off, ty)) = member_offset(btf, "cfs_rq", field) {
            let size = btf.int_size(ty).unwrap_or(0);
            if size != 4 {
                return Err(BtfError::BadSize { field, size });
            }
            return Ok(DepthOffsets {
                task_cfs_rq: se + cfs_rq,
                cfs_rq_rq: rq,
                rq_nr_runnable: cfs + off,
                count_field: field,
            });
        }
    }
    Err(BtfError::NoCountField)
}

/// Loads the kernel's BTF (for our layouts: aya's loader reads its own).
pub fn load() -> Result<Btf, BtfError> {
    Btf::parse(std::fs::read(VMLINUX_BTF).map_err(BtfError::Unreadable)?)
}

/// Bytes of CO-RE relocation records in an eBPF object's `.BTF.ext`
/// section: 0 when the loader has nothing to relocate against the
/// kernel's BTF. `None` when the object cannot be read as a 64-bit
/// little-endian ELF (then assume relocations are needed).
pub fn core_relocation_bytes(elf: &[u8]) -> Option<u32> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| {
        let v = u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?);
        usize::try_from(v).ok()
    };
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = u64_at(0x28)?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let names = shoff.checked_add(usize::from(u16_at(0x3e)?).checked_mul(shentsize)?)?;
    let names_off = u64_at(names.checked_add(0x18)?)?;
    let name_of = |sh: usize| -> Option<&[u8]> {
        let start = names_off.checked_add(u32_at(sh)? as usize)?;
        let rest = elf.get(start..)?;
        Some(&rest[..rest.iter().position(|&b| b == 0)?])
    };
    for i in 0..shnum {
        let sh = shoff.checked_add(i.checked_mul(shentsize)?)?;
        if name_of(sh)? != b".BTF.ext" {
            continue;
        }
        let off = u64_at(sh.checked_add(0x18)?)?;
        // struct btf_ext_header: magic, version, flags (u16, u8, u8),
        // hdr_len, then func_info, line_info and core_relo (off, len)
        // pairs; headers too short to hold core_relo have none.
        let hdr_len = u32_at(off.checked_add(4)?)?;
        if hdr_len < 32 {
            return Some(0);
        }
        return u32_at(off.checked_add(28)?);
    }
    Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our programs are built without CO-RE relocations, so the loader
    /// skips parsing the kernel's BTF for aya; a program that gains one
    /// turns that parse back on (and this test says so).
    #[test]
    fn the_object_has_no_core_relocations() {
        assert_eq!(
            core_relocation_bytes(crate::capture::ebpf_object()),
            Some(0)
        );
        // The same object with a relocation length written into its
        // .BTF.ext header (magic, version 1, flags, hdr_len 32) reads back.
        let mut obj = crate::capture::ebpf_object().to_vec();
        let at = obj
            .windows(8)
            .position(|w| w == [0x9f, 0xeb, 1, 0, 32, 0, 0, 0])
            .expect("the object's .BTF.ext header");
        obj[at + 28..at + 32].copy_from_slice(&48u32.to_le_bytes());
        assert_eq!(core_relocation_bytes(&obj), Some(48));
        assert_eq!(core_relocation_bytes(b"not an elf"), None);
        assert_eq!(core_relocation_bytes(&[]), None);
    }

    /// Reads this machine's BTF (present on every kernel we support; the
    /// test says so when it is not).
    #[test]
    fn rejects_what_is_not_btf() {
        assert!(Btf::parse(vec![0; 8]).is_err());
        assert!(Btf::parse(vec![0x9f, 0xeb, 1, 0]).is_err());
        // Header promising sections past the end.
        let mut h = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        h.extend_from_slice(&[0, 0, 0, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(Btf::parse(h).is_err());
    }

    /// Found by `cargo xtask fuzz` (target btf): a type whose members run
    /// past the type section made the enum look-up read out of bounds.
    #[test]
    fn a_type_running_past_its_section_is_refused() {
        let data = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/fuzz-btf-past-section.bin"
        ))
        .unwrap();
        match Btf::parse(data) {
            Err(e) => assert!(e.to_string().contains("runs past"), "{e}"),
            Ok(btf) => {
                let _ = btf.enum_value("memory_cgrp_id");
            }
        }
    }

    #[test]
    fn finds_the_cgroup_chain_and_tracepoint_arguments_in_this_kernel() {
        let btf = match load() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("SKIPPED: {e}");
                return;
            }
        };
        let c = cgroup_offsets(&btf).expect("cgroup offsets");
        use profiler_common::{NO_FIELD, oom::cgroup_field as f};
        assert!(c.iter().all(|&o| o != NO_FIELD), "{c:?}");
        assert!(btf.enum_value("memory_cgrp_id").is_some());
        assert!(btf.enum_value("no_such_enumerator_at_all").is_none());
        assert!(c[f::CSS_SET_MEMCG] > 0);
        // sched_switch's arguments: (bool preempt, prev, next, ...).
        assert!(btf.tracepoint_arg_is("sched_switch", 1, "task_struct"));
        assert!(!btf.tracepoint_arg_is("sched_switch", 0, "task_struct"));
        assert!(!btf.tracepoint_arg_is("no_such_tracepoint", 0, "task_struct"));
    }

    #[test]
    fn finds_the_depth_chain_in_this_kernel() {
        let btf = match load() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("SKIPPED: {e}");
                return;
            }
        };
        let d = depth_offsets(&btf).expect("depth offsets");
        assert!(d.task_cfs_rq > 0 && d.rq_nr_runnable > 0);
        assert!(COUNT_FIELDS.contains(&d.count_field));
        // A field that exists nowhere is not invented.
        assert!(member_offset(&btf, "cfs_rq", "no_such_field").is_none());
        // A member inside an anonymous union/struct is found, and offsets
        // are consistent: task_struct.se precedes task_struct.stack? No
        // order assumed; just both exist and differ.
        let (se, _) = member_offset(&btf, "task_struct", "se").unwrap();
        let (stack, _) = member_offset(&btf, "task_struct", "stack").unwrap();
        assert_ne!(se, stack);
        // Renamed fields: this kernel has exactly one of the old/new names.
        let old = member_offset(&btf, "cfs_rq", "nr_running").is_some();
        let new = member_offset(&btf, "cfs_rq", "nr_queued").is_some();
        assert!(
            old != new,
            "expected exactly one of cfs_rq.nr_running / nr_queued"
        );
    }
}
