//! Unwinding through JIT code with the CFI its runtime wrote into a
//! jitdump (Node.js: `--perf-prof --perf-prof-unwinding-info`).
//!
//! V8 writes, before each piece of optimized code, an `.eh_frame` with one
//! CIE and one FDE for it. JIT code keeps frame pointers, so frame
//! pointers are right inside a function's body, but not in its prologue
//! and epilogue (before `mov rbp, rsp`, after `pop rbp`): a sample there
//! walked by frame pointer loses the caller. The CFI says where the
//! return address and the caller's rbp are at every instruction.
//!
//! The dump is read as it grows (the runtime appends while the capture
//! runs), from where the last read stopped.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use framehop::x86_64::UnwindRegsX86_64;
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, LittleEndian, RegisterRule, UnwindContext,
    UnwindSection, X86_64,
};

use crate::{
    jitdump::{Event, JitDumpFollower},
    perfmap::CodeRanges,
};

/// How often a process's jitdump is read again for code loaded since.
const REFRESH: Duration = Duration::from_millis(100);
/// Most bytes read from one dump at once: a long-lived runtime's dump
/// holds every piece of code it compiled (hundreds of MB); catching up
/// runs in steps of this size, one per [`REFRESH`], so that the drain of
/// the stack ring is never held up long.
const READ_MAX: u64 = 8 << 20;
/// Where the `.eh_frame` of a piece of code is placed to parse it first:
/// any address far from zero, so that a backwards pc-relative pointer
/// does not wrap.
const PROBE_BASE: u64 = 1 << 40;

/// The CFI of one piece of JIT code, evaluated once when it is read: a
/// row per address range, looked up per frame without parsing anything
/// (a busy Node service walks over 10,000 JIT frames a second).
#[derive(Debug, Default)]
pub struct JitFde {
    rows: Vec<Row>,
}

/// From `start` (an address) to the next row's: where the CFA is, and the
/// return address and the caller's rbp relative to it.
#[derive(Clone, Copy, Debug)]
struct Row {
    start: u64,
    end: u64,
    /// CFA = rbp + offset (else rsp + offset).
    cfa_from_bp: bool,
    cfa_offset: i64,
    /// Where the return address is, from the CFA (a call puts it at -8).
    ra_at: i64,
    /// Where the caller's rbp was saved, if it was.
    bp_at: Option<i64>,
}

impl JitFde {
    /// The CFI for code at `start`, when `eh_frame` holds an FDE whose
    /// rules this walk can follow (CFA from rsp or rbp, registers saved
    /// at offsets from it).
    pub fn new(start: u64, eh_frame: Arc<[u8]>) -> Option<Self> {
        let eh_frame = without_omitted_lsda(eh_frame);
        let initial = first_fde(&eh_frame, PROBE_BASE, |fde| Some(fde.initial_address()))?;
        // Where the FDE says the code is, relative to the eh_frame (V8:
        // just before it), kept in two's complement.
        let offset = initial.wrapping_sub(PROBE_BASE);
        let at = start.wrapping_sub(offset);
        let mut eh = EhFrame::new(&eh_frame[..], LittleEndian);
        eh.set_address_size(8);
        let bases = BaseAddresses::default().set_eh_frame(at);
        let mut ctx = UnwindContext::<usize>::new();
        let rows = first_fde(&eh_frame, at, |fde| {
            let mut table = fde.rows(&eh, &bases, &mut ctx).ok()?;
            let mut rows = Vec::new();
            while let Ok(Some(row)) = table.next_row() {
                let (cfa_from_bp, cfa_offset) = match *row.cfa() {
                    CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RSP => {
                        (false, offset)
                    }
                    CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RBP => {
                        (true, offset)
                    }
                    _ => return None,
                };
                let ra_at = match row.register(X86_64::RA) {
                    Some(RegisterRule::Offset(o)) => o,
                    None | Some(RegisterRule::Undefined) => -8,
                    _ => return None,
                };
                let bp_at = match row.register(X86_64::RBP) {
                    Some(RegisterRule::Offset(o)) => Some(o),
                    _ => None,
                };
                rows.push(Row {
                    start: row.start_address(),
                    end: row.end_address(),
                    cfa_from_bp,
                    cfa_offset,
                    ra_at,
                    bp_at,
                });
            }
            Some(rows)
        })?;
        (!rows.is_empty()).then_some(JitFde { rows })
    }

    /// One step: the caller's registers from this frame's, `lookup` being
    /// the instruction (a return address minus one, past the first
    /// frame). None when the CFI does not cover it.
    pub fn step(
        &self,
        lookup: u64,
        regs: &mut UnwindRegsX86_64,
        read_stack: &mut impl FnMut(u64) -> Result<u64, ()>,
    ) -> Option<u64> {
        let i = self.rows.partition_point(|r| r.start <= lookup);
        let row = self.rows[..i].last().filter(|r| lookup < r.end)?;
        let base = if row.cfa_from_bp {
            regs.bp()
        } else {
            regs.sp()
        };
        let cfa = base.checked_add_signed(row.cfa_offset)?;
        let ra = read_stack(cfa.checked_add_signed(row.ra_at)?).ok()?;
        let bp = match row.bp_at {
            Some(o) => read_stack(cfa.checked_add_signed(o)?).ok()?,
            None => regs.bp(),
        };
        regs.set_sp(cfa);
        regs.set_bp(bp);
        regs.set_ip(ra);
        Some(ra)
    }
}

/// V8's CIE says `zLR` with an LSDA encoding of "omitted" (0xff) and its
/// FDEs carry no LSDA: gimli refuses that (an omitted encoding cannot be
/// read). The CIE is rewritten to `zRR`, its 'L' byte replaced by the
/// 'R' one (read twice, the same FDE pointer encoding), same length, same
/// meaning. Anything else is left as it is.
fn without_omitted_lsda(eh: Arc<[u8]>) -> Arc<[u8]> {
    let patched = (|| {
        // length, CIE id 0, version, augmentation string.
        if eh.get(4..8)? != [0, 0, 0, 0] {
            return None;
        }
        let aug_at = 9;
        let aug_len = eh.get(aug_at..)?.iter().position(|&b| b == 0)?;
        let aug = eh.get(aug_at..aug_at + aug_len)?;
        if aug.first() != Some(&b'z') || aug[1..].iter().any(|c| !b"LR".contains(c)) {
            return None;
        }
        let l = aug.iter().position(|&c| c == b'L')?;
        let r = aug.iter().position(|&c| c == b'R')?;
        // Code and data alignment (LEB128), return register (LEB128 in
        // version 3, a byte in 1), then the augmentation data's length.
        let mut at = aug_at + aug_len + 1;
        let skip_leb = |at: &mut usize| -> Option<()> {
            while *eh.get(*at)? & 0x80 != 0 {
                *at += 1;
            }
            *at += 1;
            Some(())
        };
        skip_leb(&mut at)?;
        skip_leb(&mut at)?;
        if eh.get(8) == Some(&1) {
            at += 1;
        } else {
            skip_leb(&mut at)?;
        }
        skip_leb(&mut at)?; // augmentation data length
        // One byte of data per letter after 'z', in order.
        let (l_at, r_at) = (at + l - 1, at + r - 1);
        if *eh.get(l_at)? != 0xff {
            return None;
        }
        let mut out = eh.to_vec();
        out[aug_at + l] = b'R';
        out[l_at] = *eh.get(r_at)?;
        Some(Arc::from(out))
    })();
    patched.unwrap_or(eh)
}

/// Runs `f` on the first FDE of `eh_frame` placed at `at`.
fn first_fde<T>(
    eh_frame: &[u8],
    at: u64,
    f: impl FnOnce(&gimli::FrameDescriptionEntry<gimli::EndianSlice<'_, LittleEndian>>) -> Option<T>,
) -> Option<T> {
    let mut eh = EhFrame::new(eh_frame, LittleEndian);
    eh.set_address_size(8);
    let bases = BaseAddresses::default().set_eh_frame(at);
    let mut entries = eh.entries(&bases);
    while let Ok(Some(entry)) = entries.next() {
        if let CieOrFde::Fde(partial) = entry {
            let fde = partial.parse(|s, b, o| s.cie_from_offset(b, o)).ok()?;
            return f(&fde);
        }
    }
    None
}

/// The JIT CFI of one process, read from its jitdump as it grows.
#[derive(Debug)]
pub struct JitCfi {
    follower: JitDumpFollower,
    last_read: Option<Instant>,
    /// Code with CFI; code without any (interpreted, baseline) is absent
    /// and walked by frame pointer.
    pub codes: CodeRanges<Arc<JitFde>>,
}

impl JitCfi {
    /// For the jitdump at `path` (as the host sees it).
    pub fn new(path: PathBuf) -> Self {
        JitCfi {
            follower: JitDumpFollower::new(path),
            last_read: None,
            codes: CodeRanges::default(),
        }
    }

    /// Whether this reads the dump at `path`.
    pub fn is_for(&self, path: &std::path::Path) -> bool {
        self.follower.is_for(path)
    }

    /// Reads what the runtime appended since the last read, at most every
    /// `REFRESH` and `READ_MAX` bytes at a time.
    pub fn refresh(&mut self) {
        let now = Instant::now();
        if self
            .last_read
            .is_some_and(|t| now.duration_since(t) < REFRESH)
        {
            return;
        }
        self.last_read = Some(now);
        for e in self.follower.read_new(READ_MAX).unwrap_or_default() {
            match e {
                Event::Load(c) => {
                    let end = c.start.saturating_add(c.size.max(1));
                    // New code without CFI still replaces old code there.
                    let fde = c.eh_frame.and_then(|eh| JitFde::new(c.start, eh));
                    self.codes
                        .insert(c.start, end, Arc::new(fde.unwrap_or_default()));
                }
                Event::Move(old, new, size) => {
                    if let Some((_, f)) = self.codes.remove(old) {
                        self.codes.insert(new, new.saturating_add(size.max(1)), f);
                    }
                }
            }
        }
    }

    /// The CFI of the code holding `addr`, if it has any.
    pub fn get(&self, addr: u64) -> Option<&JitFde> {
        self.codes
            .get(addr)
            .map(|f| &**f)
            .filter(|f| !f.rows.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `.eh_frame` V8 (Node 20) wrote for a 168-byte piece of
    /// TurboFan code (`JS:*isPosixPathSeparator`), CIE + FDE + terminator,
    /// its FDE's start pc-relative to where V8 places it: right after the
    /// code.
    const V8_EH_FRAME: &str = "1800000000000000037a4c520001781002ff1b0c0708900100000000200000002000000034ffffffa5000000004f0e108602430d0602430d07410e08520c061000000000";

    fn bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    /// At the code's first instruction the return address is at sp; after
    /// `push rbp; mov rbp, rsp` it is at rbp + 8 and the caller's rbp at
    /// rbp; past the code, the CFI says nothing.
    #[test]
    fn v8_cfi_finds_the_return_address_in_prologue_and_body() {
        let start = 0x7f00_0000_1000u64;
        let fde = JitFde::new(start, Arc::from(bytes(V8_EH_FRAME))).expect("an FDE");
        // A stack: [sp] = return address 0x5555, then more.
        let sp = 0x7ffe_0000_0000u64;
        let stack: Vec<(u64, u64)> = vec![(sp, 0x5555), (sp + 8, 0x6666), (sp - 8, 0x7777)];
        let mut read = |a: u64| {
            stack
                .iter()
                .find(|(at, _)| *at == a)
                .map(|(_, v)| *v)
                .ok_or(())
        };
        // At entry: CFA = rsp + 8, return address at CFA - 8 = sp.
        let mut regs = UnwindRegsX86_64::new(start, sp, 0x1234);
        assert_eq!(fde.step(start, &mut regs, &mut read), Some(0x5555));
        assert_eq!((regs.sp(), regs.bp()), (sp + 8, 0x1234));
        // In the body, after push rbp (at sp - 8, holding 0x7777) and
        // mov rbp, rsp: rbp = sp - 8, whatever rsp is now.
        let mut regs = UnwindRegsX86_64::new(start + 0x40, sp - 0x40, sp - 8);
        assert_eq!(fde.step(start + 0x40, &mut regs, &mut read), Some(0x5555));
        assert_eq!((regs.sp(), regs.bp()), (sp + 8, 0x7777));
        // Past the FDE's range (0xa5 bytes): not covered.
        let mut regs = UnwindRegsX86_64::new(start + 0xa8, sp, 0);
        assert_eq!(fde.step(start + 0xa8, &mut regs, &mut read), None);
    }

    #[test]
    fn garbage_cfi_is_refused() {
        assert!(JitFde::new(0x1000, Arc::from(&[0u8; 8][..])).is_none());
        assert!(JitFde::new(0x1000, Arc::from(&[0xffu8; 40][..])).is_none());
        assert!(JitFde::new(0x1000, Arc::from(&[][..])).is_none());
    }
}
