//! An object file's unwind sections (`.eh_frame`, `.eh_frame_hdr`,
//! `.debug_frame`), its loadable segments and the ranges its CFI covers,
//! read once per file and shared by every process mapping it.

use std::{ops::Range, sync::Arc};

use object::{Object, ObjectSection, ObjectSegment};

/// Unwind sections of one object file, shared by every process mapping it.
#[derive(Debug)]
pub(super) struct FileUnwindData {
    pub(super) base_svma: u64,
    /// Each loadable segment.
    pub(super) segments: Vec<Segment>,
    pub(super) eh_frame: Option<(Range<u64>, Arc<[u8]>)>,
    pub(super) eh_frame_hdr: Option<(Range<u64>, Arc<[u8]>)>,
    pub(super) debug_frame: Option<Arc<[u8]>>,
    pub(super) text: Option<Range<u64>>,
    /// The entry point's stated virtual address (0: none).
    pub(super) entry: u64,
    /// The addresses (svma) some FDE covers, sorted and merged: code
    /// outside them has no CFI (V8's embedded builtins in `node`,
    /// hand-written assembly).
    pub(super) cfi: Vec<Range<u64>>,
    /// The ranges of FDEs marked as signal trampolines (augmentation
    /// 'S': glibc's `__restore_rt`, where a signal handler returns).
    pub(super) sigreturn: Vec<Range<u64>>,
}

impl FileUnwindData {
    /// Reads the unwind sections of a file, mapping it rather than reading
    /// it: of a 100 MB binary only the headers and the CFI are touched.
    pub(super) fn read(path: &std::path::Path) -> Option<Self> {
        let file = std::fs::File::open(path).ok()?;
        // SAFETY: a private read-only mapping of a file we opened; the
        // bytes are only read while it lives. A file truncated meanwhile
        // could fault: binaries in use are not truncated.
        let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
        if map.is_empty() {
            return None;
        }
        Self::parse(&map)
    }

    pub(super) fn parse(data: &[u8]) -> Option<Self> {
        let file = object::File::parse(data).ok()?;
        let section = |name: &str| -> Option<(Range<u64>, Arc<[u8]>)> {
            let s = file.section_by_name(name)?;
            let bytes = s.uncompressed_data().ok()?;
            Some((s.address()..s.address() + s.size(), Arc::from(&*bytes)))
        };
        let segments = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                let exec = match s.flags() {
                    object::SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                    _ => false,
                };
                Segment {
                    vaddr: s.address(),
                    offset,
                    size,
                    exec,
                }
            })
            .collect();
        let eh_frame = section(".eh_frame");
        let debug_frame = section(".debug_frame").map(|(_, d)| d);
        let text = file
            .section_by_name(".text")
            .map(|s| s.address()..s.address() + s.size());
        let got = file.section_by_name(".got").map_or(0, |s| s.address());
        let (cfi, sigreturn) = cfi_ranges(
            eh_frame.as_ref().map(|(r, d)| (r.start, &d[..])),
            debug_frame.as_deref(),
            text.as_ref().map_or(0, |t| t.start),
            got,
        );
        Some(FileUnwindData {
            base_svma: file.relative_address_base(),
            segments,
            eh_frame,
            eh_frame_hdr: section(".eh_frame_hdr"),
            debug_frame,
            text,
            entry: file.entry(),
            cfi,
            sigreturn,
        })
    }

    /// Whether some FDE of the file covers `svma`.
    pub(super) fn covered(&self, svma: u64) -> bool {
        let i = self.cfi.partition_point(|r| r.start <= svma);
        i > 0 && svma < self.cfi[i - 1].end
    }

    /// The stated virtual address of the start of a mapping of this file
    /// at `offset` (page aligned, as the kernel maps). A segment is mapped
    /// from its offset rounded down to a page, so the mapping can start
    /// before the segment, inside the previous one's last page: lld lays
    /// out Rust and C++ binaries so (text at offset 0x188cc0, vaddr
    /// 0x189cc0, mapped from offset 0x188000). Among the segments that
    /// cover the offset, the one whose executable flag matches the
    /// mapping's is taken.
    pub(super) fn svma_of_offset(&self, offset: u64, exec: bool) -> Option<u64> {
        let covers =
            |s: &&Segment| offset >= s.offset & !(PAGE - 1) && offset < s.offset + s.size.max(1);
        let seg = self
            .segments
            .iter()
            .filter(covers)
            .find(|s| s.exec == exec)
            .or_else(|| self.segments.iter().find(covers))?;
        Some(seg.vaddr.wrapping_add(offset.wrapping_sub(seg.offset)))
    }
}

/// Page size the kernel maps file segments with (x86_64).
pub(super) const PAGE: u64 = 4096;

/// The address ranges the FDEs of `.eh_frame` (at `eh_frame.0`) and
/// `.debug_frame` describe, sorted and merged; and those of signal
/// trampolines.
pub(super) fn cfi_ranges(
    eh_frame: Option<(u64, &[u8])>,
    debug_frame: Option<&[u8]>,
    text: u64,
    got: u64,
) -> (Vec<Range<u64>>, Vec<Range<u64>>) {
    use gimli::{BaseAddresses, CieOrFde, LittleEndian, UnwindSection};
    pub(super) fn collect<R: gimli::Reader, S: UnwindSection<R>>(
        section: &S,
        bases: &BaseAddresses,
        out: &mut Vec<Range<u64>>,
        sig: &mut Vec<Range<u64>>,
    ) {
        let mut entries = section.entries(bases);
        // A malformed entry ends the list: what was read so far stands.
        while let Ok(Some(entry)) = entries.next() {
            if let CieOrFde::Fde(partial) = entry
                && let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o))
                && fde.len() > 0
            {
                let r = fde.initial_address()..fde.end_address();
                if fde.cie().is_signal_trampoline() {
                    sig.push(r.clone());
                }
                out.push(r);
            }
        }
    }
    let mut out = Vec::new();
    let mut sig = Vec::new();
    if let Some((addr, data)) = eh_frame {
        let bases = BaseAddresses::default()
            .set_eh_frame(addr)
            .set_text(text)
            .set_got(got);
        let mut section = gimli::EhFrame::new(data, LittleEndian);
        section.set_address_size(8);
        collect(&section, &bases, &mut out, &mut sig);
    }
    if let Some(data) = debug_frame {
        let mut section = gimli::DebugFrame::new(data, LittleEndian);
        section.set_address_size(8);
        collect(&section, &BaseAddresses::default(), &mut out, &mut sig);
    }
    out.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(out.len());
    for r in out {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    (merged, sig)
}

/// A loadable segment of an ELF file.
#[derive(Clone, Copy, Debug)]
pub(super) struct Segment {
    /// p_vaddr.
    pub(super) vaddr: u64,
    /// p_offset.
    pub(super) offset: u64,
    /// p_filesz.
    pub(super) size: u64,
    /// p_flags has PF_X.
    pub(super) exec: bool,
}
