//! Kernel struct offsets from the kernel's own BTF, for the fields the
//! programs read directly (run-queue depth). Field names change between
//! kernel versions; every candidate is tried, and when none fits the
//! signal is reported unavailable with the names that were tried.

use btf_rs::{Btf, Type};

/// Where the kernel's BTF is.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Byte offset of `member` in struct `name`, looking into anonymous
/// structs and unions; with the member's type.
pub fn member_offset(btf: &Btf, name: &str, member: &str) -> Option<(u32, Type)> {
    let types = btf.resolve_types_by_name(name).ok()?;
    types.into_iter().find_map(|t| match t {
        Type::Struct(s) | Type::Union(s) => find_in(btf, &s, member),
        _ => None,
    })
}

fn find_in(btf: &Btf, s: &btf_rs::Struct, member: &str) -> Option<(u32, Type)> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let ty = btf.resolve_chained_type(m).ok()?;
        if name == member {
            return Some((m.bit_offset() / 8, ty));
        }
        if name.is_empty() {
            // Anonymous struct or union: look inside.
            let inner = skip_modifiers(btf, ty)?;
            if let Type::Struct(is) | Type::Union(is) = inner
                && let Some((off, t)) = find_in(btf, &is, member)
            {
                return Some((m.bit_offset() / 8 + off, t));
            }
        }
    }
    None
}

fn skip_modifiers(btf: &Btf, mut t: Type) -> Option<Type> {
    loop {
        t = match t {
            Type::Typedef(ref x) => btf.resolve_chained_type(x).ok()?,
            Type::Const(ref x) => btf.resolve_chained_type(x).ok()?,
            Type::Volatile(ref x) => btf.resolve_chained_type(x).ok()?,
            Type::Restrict(ref x) => btf.resolve_chained_type(x).ok()?,
            Type::TypeTag(ref x) => btf.resolve_chained_type(x).ok()?,
            other => return Some(other),
        }
    }
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
pub fn depth_offsets(btf: &Btf) -> Result<DepthOffsets, String> {
    let (se, _) = member_offset(btf, "task_struct", "se").ok_or("task_struct has no member se")?;
    let (cfs_rq, _) = member_offset(btf, "sched_entity", "cfs_rq").ok_or(
        "sched_entity has no member cfs_rq (kernel built without CONFIG_FAIR_GROUP_SCHED)",
    )?;
    let (rq, _) = member_offset(btf, "cfs_rq", "rq")
        .ok_or("cfs_rq has no member rq (no CONFIG_FAIR_GROUP_SCHED)")?;
    let (cfs, _) = member_offset(btf, "rq", "cfs").ok_or("rq has no member cfs")?;
    for field in COUNT_FIELDS {
        if let Some((off, ty)) = member_offset(btf, "cfs_rq", field) {
            let size = match skip_modifiers(btf, ty) {
                Some(Type::Int(i)) => i.size(),
                _ => 0,
            };
            if size != 4 {
                return Err(format!(
                    "cfs_rq.{field} is {size} bytes, expected a 4-byte count"
                ));
            }
            return Ok(DepthOffsets {
                task_cfs_rq: se + cfs_rq,
                cfs_rq_rq: rq,
                rq_nr_runnable: cfs + off,
                count_field: field,
            });
        }
    }
    Err(format!(
        "struct cfs_rq has none of the fields {}",
        COUNT_FIELDS.join(", ")
    ))
}

/// Loads the kernel's BTF.
pub fn load() -> Result<Btf, String> {
    Btf::from_file(VMLINUX_BTF).map_err(|e| {
        format!("kernel BTF unreadable ({VMLINUX_BTF}: {e}); needs CONFIG_DEBUG_INFO_BTF")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this machine's BTF (present on every kernel we support; the
    /// test says so when it is not).
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
        // Renamed fields: this kernel has exactly one of the old/new names.
        let old = member_offset(&btf, "cfs_rq", "nr_running").is_some();
        let new = member_offset(&btf, "cfs_rq", "nr_queued").is_some();
        assert!(
            old != new,
            "expected exactly one of cfs_rq.nr_running / nr_queued"
        );
    }
}
