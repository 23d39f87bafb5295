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
    io::{Read, Seek, SeekFrom},
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
    jitdump::{Event, JitDumpParser},
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

/// The CFI of one piece of JIT code.
#[derive(Debug)]
pub struct JitFde {
    eh_frame: Arc<[u8]>,
    /// Address to place `eh_frame` at so that its FDE starts at the code.
    eh_frame_at: u64,
}

impl JitFde {
    /// The CFI for code at `start`, when `eh_frame` holds an FDE.
    pub fn new(start: u64, eh_frame: Arc<[u8]>) -> Option<Self> {
        let eh_frame = without_omitted_lsda(eh_frame);
        let initial = first_fde(&eh_frame, PROBE_BASE, |fde| Some(fde.initial_address()))?;
        // Where the FDE says the code is, relative to the eh_frame (V8:
        // just before it), kept in two's complement.
        let offset = initial.wrapping_sub(PROBE_BASE);
        Some(JitFde {
            eh_frame_at: start.wrapping_sub(offset),
            eh_frame,
        })
    }

    /// One step: the caller's registers from this frame's, `lookup` being
    /// the instruction (a return address minus one, past the first
    /// frame). None when the CFI does not cover it or says nothing usable.
    pub fn step(
        &self,
        ctx: &mut UnwindContext<usize>,
        lookup: u64,
        regs: &mut UnwindRegsX86_64,
        read_stack: &mut impl FnMut(u64) -> Result<u64, ()>,
    ) -> Option<u64> {
        let mut eh = EhFrame::new(&self.eh_frame[..], LittleEndian);
        eh.set_address_size(8);
        let bases = BaseAddresses::default().set_eh_frame(self.eh_frame_at);
        let (cfa, ra_rule, bp_rule) = first_fde(&self.eh_frame, self.eh_frame_at, |fde| {
            let row = fde.unwind_info_for_address(&eh, &bases, ctx, lookup).ok()?;
            let cfa = match *row.cfa() {
                CfaRule::RegisterAndOffset { register, offset } => {
                    let base = match register {
                        X86_64::RSP => regs.sp(),
                        X86_64::RBP => regs.bp(),
                        _ => return None,
                    };
                    base.checked_add_signed(offset)?
                }
                CfaRule::Expression(_) => return None,
            };
            Some((cfa, row.register(X86_64::RA), row.register(X86_64::RBP)))
        })?;
        let at = |rule: Option<RegisterRule<usize>>| match rule {
            Some(RegisterRule::Offset(o)) => cfa.checked_add_signed(o),
            _ => None,
        };
        // No rule for the return address: where a call put it, below the
        // CFA.
        let ra = match ra_rule {
            None | Some(RegisterRule::Undefined) => cfa.checked_sub(8)?,
            rule => at(rule)?,
        };
        let ra = read_stack(ra).ok()?;
        let bp = match at(bp_rule) {
            Some(addr) => read_stack(addr).ok()?,
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
    path: PathBuf,
    parser: JitDumpParser,
    read_to: u64,
    last_read: Option<Instant>,
    /// Code with CFI; code without any (interpreted, baseline) is absent
    /// and walked by frame pointer.
    pub codes: CodeRanges<Arc<JitFde>>,
    /// The dump is not one (or no longer readable): stop trying.
    broken: bool,
}

impl JitCfi {
    /// For the jitdump at `path` (as the host sees it).
    pub fn new(path: PathBuf) -> Self {
        JitCfi {
            path,
            parser: JitDumpParser::default(),
            read_to: 0,
            last_read: None,
            codes: CodeRanges::default(),
            broken: false,
        }
    }

    /// Whether this reads the dump at `path`.
    pub fn is_for(&self, path: &std::path::Path) -> bool {
        self.path == path
    }

    /// Reads what the runtime appended since the last read, at most every
    /// [`REFRESH`].
    pub fn refresh(&mut self) {
        let now = Instant::now();
        if self.broken
            || self
                .last_read
                .is_some_and(|t| now.duration_since(t) < REFRESH)
        {
            return;
        }
        self.last_read = Some(now);
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return;
        };
        if file.seek(SeekFrom::Start(self.read_to)).is_err() {
            return;
        }
        let mut bytes = Vec::new();
        if file.take(READ_MAX).read_to_end(&mut bytes).is_err() || bytes.is_empty() {
            return;
        }
        self.read_to += bytes.len() as u64;
        let Ok(events) = self.parser.feed(&bytes) else {
            self.broken = true;
            return;
        };
        for e in events {
            match e {
                Event::Load(c) => {
                    let end = c.start.saturating_add(c.size.max(1));
                    match c.eh_frame.and_then(|eh| JitFde::new(c.start, eh)) {
                        Some(fde) => self.codes.insert(c.start, end, Arc::new(fde)),
                        // New code without CFI still replaces old code there.
                        None => {
                            self.codes.insert(c.start, end, Arc::new(JitFde::none()));
                        }
                    }
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
            .filter(|f| !f.eh_frame.is_empty())
    }
}

impl JitFde {
    /// A placeholder for code without CFI.
    fn none() -> Self {
        JitFde {
            eh_frame: Arc::from(&[][..]),
            eh_frame_at: 0,
        }
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
        let mut ctx = UnwindContext::new();
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
        assert_eq!(
            fde.step(&mut ctx, start, &mut regs, &mut read),
            Some(0x5555)
        );
        assert_eq!((regs.sp(), regs.bp()), (sp + 8, 0x1234));
        // In the body, after push rbp (at sp - 8, holding 0x7777) and
        // mov rbp, rsp: rbp = sp - 8, whatever rsp is now.
        let mut regs = UnwindRegsX86_64::new(start + 0x40, sp - 0x40, sp - 8);
        assert_eq!(
            fde.step(&mut ctx, start + 0x40, &mut regs, &mut read),
            Some(0x5555)
        );
        assert_eq!((regs.sp(), regs.bp()), (sp + 8, 0x7777));
        // Past the FDE's range (0xa5 bytes): not covered.
        let mut regs = UnwindRegsX86_64::new(start + 0xa8, sp, 0);
        assert_eq!(fde.step(&mut ctx, start + 0xa8, &mut regs, &mut read), None);
    }

    #[test]
    fn garbage_cfi_is_refused() {
        assert!(JitFde::new(0x1000, Arc::from(&[0u8; 8][..])).is_none());
        assert!(JitFde::new(0x1000, Arc::from(&[0xffu8; 40][..])).is_none());
        assert!(JitFde::new(0x1000, Arc::from(&[][..])).is_none());
    }
}
