//! Userspace unwinding of copied user stacks (`--unwind dwarf|auto`): the
//! kernel sends the user registers and a window of the user stack per
//! sample; framehop unwinds it with each binary's CFI (`.eh_frame`,
//! `.debug_frame`) and falls back to frame pointers where no CFI covers an
//! address (JIT code), crossing between the two. Repeated stacks are
//! aggregated at once, so memory stays bounded by distinct stacks.

use std::{collections::HashMap, ops::Range, path::PathBuf, sync::Arc};

use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use profiler_common::stacks::{STACK_AT_TOP, STACK_IN_TURN, STACK_IPS, StackSample, TIME_SLICE_NS};

use crate::{
    jitcfi::JitCfi,
    model::{Cut, UnwindStats},
    procmaps::Backing,
    procs::{ProcessInfo, ProcessTable},
};

mod file;

use file::FileUnwindData;

/// Deepest stack unwound.
pub const MAX_FRAMES: usize = 256;
/// Most distinct stacks kept; past it samples are counted as dropped.
pub const MAX_STACKS: usize = 200_000;
/// Most samples inside event-loop turns kept per window (at 99 Hz, an
/// hour of one busy loop thread).
pub const MAX_TIMED: usize = 400_000;
/// Most per-process unwinders kept at once.
pub const MAX_PROCS: usize = 4096;
/// Most object files whose unwind sections are kept.
pub const MAX_FILES: usize = 4096;

/// How user stacks are walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UnwindMode {
    /// Frame pointers, walked in the kernel: cheapest, wrong where
    /// binaries omit them.
    Fp,
    /// CFI (.eh_frame/.debug_frame) in userspace on a copied stack, frame
    /// pointers where no CFI covers an address.
    Dwarf,
    /// The default: as dwarf (CFI where it exists, frame pointers where it
    /// does not).
    Auto,
}

struct ProcessUnwinder {
    unwinder: UnwinderX86_64<Arc<[u8]>>,
    /// The jitdump the process maps, as the host sees it.
    jitdump: Option<PathBuf>,
    /// Which maps it was built from.
    maps_key: (u64, usize),
    /// Its executable file mappings (and the vDSO), by address: the rules
    /// of our own walk look their file up here, without allocating, per
    /// frame. The files are held, so that the cache knows which are in use.
    modules: Vec<MappedFile>,
}

/// This process's vDSO image (`[vdso]` in /proc/self/maps), read from
/// its own memory; every 64-bit process of the kernel maps the same one.
pub fn own_vdso() -> Option<Vec<u8>> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let (entries, _) = crate::procmaps::parse_maps(&maps);
    let v = entries
        .iter()
        .find(|e| e.backing == Backing::Special("[vdso]".into()))?;
    let len = (v.end - v.start) as usize;
    let mut buf = vec![0u8; len];
    // SAFETY: the range is our own vDSO mapping, readable for the life of
    // the process; copied byte for byte.
    unsafe { std::ptr::copy_nonoverlapping(v.start as *const u8, buf.as_mut_ptr(), len) };
    Some(buf)
}

/// Most (time slice, stack) counts kept per window: past it, samples are
/// counted without their time (`UnwindStats::untimed`).
pub const MAX_SLICES: usize = 4_000_000;

/// What [`UserUnwinder::take_window`] hands over.
#[derive(Debug, Default)]
pub struct UnwoundWindow {
    /// Distinct stacks with their sample counts.
    pub stacks: Vec<(UnwoundKey, u64)>,
    /// `(time slice, index in stacks, samples)`; slices of
    /// [`TIME_SLICE_NS`] on the monotonic clock, wrapping.
    pub slices: Vec<(u32, u32, u32)>,
}

/// Key of the userspace aggregation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UnwoundKey {
    /// Thread-group id.
    pub tgid: u32,
    /// Thread name.
    pub thread: String,
    /// Return addresses, leaf first (the first is the instruction pointer).
    pub user: Vec<u64>,
    /// Kernel stack id (or negative errno).
    pub kernel_stack_id: i32,
    /// Why the unwind stopped before the stack's end, if it did.
    pub cut: Option<Cut>,
}

impl UnwoundKey {
    /// The stack as the rest of the pipeline takes it, with its kernel
    /// part resolved by the caller.
    pub fn into_raw(
        self,
        kernel: crate::model::RawStackPart,
        count: u64,
    ) -> crate::model::RawStack {
        crate::model::RawStack {
            tgid: self.tgid,
            thread: self.thread,
            user: Ok(self.user),
            user_cut: self.cut,
            kernel,
            count,
        }
    }
}

/// Unwind data of files by host path (None: read and found unusable).
type FileMap = HashMap<PathBuf, Option<Arc<FileUnwindData>>>;

/// An executable mapping of a file whose unwind data is loaded.
struct MappedFile {
    range: Range<u64>,
    file: Arc<FileUnwindData>,
    /// Address minus stated virtual address.
    bias: u64,
}

impl ProcessUnwinder {
    /// The file mapping `addr` and the address's stated virtual address
    /// in it.
    fn file_at(&self, addr: u64) -> Option<(&FileUnwindData, u64)> {
        let i = self.modules.partition_point(|m| m.range.start <= addr);
        let m = self.modules[..i].last().filter(|m| addr < m.range.end)?;
        Some((&m.file, addr.wrapping_sub(m.bias)))
    }

    /// Whether `addr` is in a signal trampoline (`__restore_rt`), by its
    /// FDE (glibc's covers the byte before it too, for return addresses
    /// looked up one byte back).
    fn in_sigreturn(&self, addr: u64) -> bool {
        self.file_at(addr)
            .is_some_and(|(file, at)| file.sigreturn.iter().any(|r| r.contains(&at)))
    }

    /// Whether `addr` is code of a file that none of the file's CFI
    /// covers.
    fn uncovered_code(&self, addr: u64) -> bool {
        self.file_at(addr).is_some_and(|(file, at)| {
            (file.eh_frame.is_some() || file.debug_frame.is_some()) && !file.covered(at)
        })
    }

    /// Whether a return address lies just past the start of its file's
    /// entry point: inside `_start`, the outermost frame of a process's
    /// first thread (and of ld.so's start).
    fn in_entry(&self, addr: u64) -> bool {
        self.file_at(addr).is_some_and(|(file, at)| {
            file.entry != 0 && at > file.entry && at <= file.entry + ENTRY_SPAN
        })
    }
}

/// Where `struct ucontext`'s `uc_mcontext` is (x86_64: after uc_flags,
/// uc_link and the 24-byte uc_stack), and its registers' slots.
const UC_MCONTEXT: u64 = 40;
const REG_RBP: u64 = 10;
const REG_RSP: u64 = 15;
const REG_RIP: u64 = 16;

/// The interrupted registers (ip, sp, bp) of a signal frame whose
/// `ucontext` starts at `uc` (the stack pointer once the handler returned
/// to the trampoline: its return address popped).
fn signal_frame(
    uc: u64,
    read_stack: &mut impl FnMut(u64) -> Result<u64, ()>,
) -> Option<(u64, u64, u64)> {
    let reg = |r: u64| uc + UC_MCONTEXT + r * 8;
    let ip = read_stack(reg(REG_RIP)).ok()?;
    let sp = read_stack(reg(REG_RSP)).ok()?;
    let bp = read_stack(reg(REG_RBP)).ok()?;
    (ip != 0 && sp > uc).then_some((ip, sp, bp))
}

/// One frame-pointer step: the frame at rbp holds the caller's rbp and,
/// above it, the return address.
fn fp_step(
    regs: &mut UnwindRegsX86_64,
    read_stack: &mut impl FnMut(u64) -> Result<u64, ()>,
) -> Result<Option<u64>, framehop::Error> {
    let bp = regs.bp();
    let caller_bp = read_stack(bp).map_err(|()| framehop::Error::CouldNotReadStack(bp))?;
    let ra = read_stack(bp + 8).map_err(|()| framehop::Error::CouldNotReadStack(bp + 8))?;
    regs.set_sp(bp + 16);
    regs.set_bp(caller_bp);
    regs.set_ip(ra);
    Ok(Some(ra))
}

/// Bytes after a file's entry point within which a return address is
/// still in `_start` (glibc's is 0x26 bytes long, ld.so's calls at +8).
const ENTRY_SPAN: u64 = 64;

/// Unwinds copied stacks and aggregates them.
#[derive(Default)]
pub struct UserUnwinder {
    files: FileMap,
    /// The vDSO image, the same in every 64-bit process of this kernel:
    /// read from the profiler's own memory.
    vdso: Option<Arc<FileUnwindData>>,
    procs: HashMap<u32, ProcessUnwinder>,
    rereads: HashMap<u32, std::time::Instant>,
    /// The JIT code's CFI of processes that write a jitdump.
    jit: HashMap<u32, JitCfi>,
    /// Most distinct stacks kept (default [`MAX_STACKS`]); with
    /// `--unwind fp` the kernel's bound (`--max-stacks`), which the
    /// stacks sent aside on collisions share.
    pub max_stacks: Option<usize>,
    cache: CacheX86_64,
    /// Aggregated stacks: count, and index in the order first seen.
    stacks: HashMap<UnwoundKey, (u64, u32)>,
    /// Samples per (time slice, stack index): the time of each sample to
    /// [`profiler_common::stacks::TIME_SLICE_NS`] (absolute, wrapping).
    slices: HashMap<(u32, u32), u32>,
    /// Samples taken inside an event-loop turn, one by one with their
    /// thread and time (also counted in `stacks`): the stalls' own.
    pub timed: Vec<(u32, u64, UnwoundKey)>,
    /// What happened.
    pub stats: UnwindStats,
}

impl UserUnwinder {
    /// A new unwinder.
    pub fn new() -> Self {
        UserUnwinder {
            vdso: own_vdso()
                .and_then(|image| FileUnwindData::parse(&image))
                .map(Arc::new),
            ..Self::default()
        }
    }

    /// Hands over the stacks aggregated and the figures since the last
    /// call, and starts afresh (the caches of files and processes stay).
    pub fn take_window(&mut self) -> (UnwoundWindow, UnwindStats) {
        let mut stacks: Vec<(UnwoundKey, u64, u32)> = std::mem::take(&mut self.stacks)
            .into_iter()
            .map(|(k, (n, i))| (k, n, i))
            .collect();
        stacks.sort_unstable_by_key(|s| s.2);
        let slices = std::mem::take(&mut self.slices)
            .into_iter()
            .map(|((slice, i), n)| (slice, i, n))
            .collect();
        (
            UnwoundWindow {
                stacks: stacks.into_iter().map(|(k, n, _)| (k, n)).collect(),
                slices,
            },
            std::mem::take(&mut self.stats),
        )
    }

    /// Hands over the samples taken inside event-loop turns.
    pub fn take_timed(&mut self) -> Vec<(u32, u64, UnwoundKey)> {
        std::mem::take(&mut self.timed)
    }

    /// Drops what is cached for processes that are gone, and the unwind
    /// data of files no remaining process maps (a long-running capture
    /// keeps only what the live processes use).
    pub fn forget(&mut self, pids: &[u32]) {
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            self.procs.remove(pid);
            self.rereads.remove(pid);
            self.jit.remove(pid);
        }
        self.files
            .retain(|_, f| f.as_ref().is_some_and(|f| Arc::strong_count(f) > 1));
    }

    /// Files whose unwind data is cached (tests, bounds).
    pub fn files_cached(&self) -> usize {
        self.files.len()
    }

    /// True when the maps of `tgid` were not re-read in the last 20 ms.
    fn may_reread(&mut self, tgid: u32) -> bool {
        let now = std::time::Instant::now();
        match self.rereads.get(&tgid) {
            Some(t) if now.duration_since(*t) < std::time::Duration::from_millis(20) => false,
            _ => {
                if self.rereads.len() > MAX_FILES * 8 {
                    self.rereads.clear();
                }
                self.rereads.insert(tgid, now);
                true
            }
        }
    }

    /// One unwind of a sample: the addresses, and whether it stopped early.
    fn unwind_once(
        &mut self,
        s: &StackSample,
        len: usize,
        procs: &ProcessTable,
    ) -> (Vec<u64>, Option<Cut>) {
        let mut user = Vec::with_capacity(32);
        let Some(info) = procs.get(s.tgid) else {
            return (vec![s.ip], Some(Cut::Lost));
        };
        let key = (
            info.start_time,
            info.maps.len() ^ (info.maps.last().map_or(0, |m| m.end as usize)),
        );
        if self.procs.get(&s.tgid).is_none_or(|p| p.maps_key != key) {
            // Bounded: past MAX_PROCS unwinders, start over (they are
            // rebuilt on demand from the maps and the shared file data).
            if self.procs.len() >= MAX_PROCS {
                self.procs.clear();
            }
            let (unwinder, modules) = self.build(info);
            self.procs.insert(
                s.tgid,
                ProcessUnwinder {
                    unwinder,
                    jitdump: crate::jitdump::path_of(info),
                    maps_key: key,
                    modules,
                },
            );
        }
        // The leaf in a file's code that no CFI covers (V8's embedded
        // builtins in `node`, assembly without unwind tables): framehop
        // then takes [sp] as the return address, right only for a function
        // that set up no frame. V8's builtins set up frames as its JIT code
        // does, and [sp] then holds a spilled value: the walk went on from
        // garbage. Walk the frame pointer there instead, as perf -g does,
        // when rbp points into the stack above sp.
        if let Some(path) = &self.procs[&s.tgid].jitdump {
            let j = self
                .jit
                .entry(s.tgid)
                .or_insert_with(|| JitCfi::new(path.clone()));
            if !j.is_for(path) {
                *j = JitCfi::new(path.clone());
            }
            j.refresh();
        }
        let jit = self.jit.get(&s.tgid);
        let pu = &self.procs[&s.tgid];
        let mut leaf_by_fp =
            s.bp > s.sp && s.bp + 16 <= s.base + len as u64 && pu.uncovered_code(s.ip);
        let (base, stack) = (s.base, &s.stack[..len]);
        let window_end = base + len as u64;
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let off = usize::try_from(addr.checked_sub(base).ok_or(())?).map_err(|_| ())?;
            let bytes = stack.get(off..off + 8).ok_or(())?;
            Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| ())?))
        };
        let mut regs = UnwindRegsX86_64::new(s.ip, s.sp, s.bp);
        user.push(s.ip);
        // The sampled instruction itself in no mapping known, or not in
        // code: nothing to walk from (the maps are re-read and the walk
        // retried when they may be stale).
        if info.mapping(s.ip).is_none_or(|m| !m.exec)
            && jit.is_none_or(|j| j.codes.get(s.ip).is_none())
        {
            return (user, Some(Cut::BadAddress));
        }
        let mut at = FrameAddress::from_instruction_pointer(s.ip);
        let mut first = true;
        loop {
            // JIT code with CFI from the jitdump: its own rules (right in
            // prologues and epilogues, where frame pointers are not).
            let sp_before = regs.sp();
            let jit_step = jit
                .and_then(|j| j.get(at.address_for_lookup()))
                .and_then(|f| f.step(at.address_for_lookup(), &mut regs, &mut read_stack));
            let step = if let Some(ra) = jit_step {
                self.stats.jit_cfi_frames += 1;
                Ok(Some(ra))
            } else if first && leaf_by_fp {
                fp_step(&mut regs, &mut read_stack)
            } else {
                pu.unwinder
                    .unwind_frame(at, &mut regs, &mut self.cache, &mut read_stack)
            };
            // Our own steps must move up the stack, as framehop's do.
            if (jit_step.is_some() || (first && leaf_by_fp)) && regs.sp() <= sp_before {
                return (user, Some(Cut::Lost));
            }
            first = false;
            match step {
                Ok(Some(ra)) => {
                    let Some(next) = FrameAddress::from_return_address(ra) else {
                        return (user, None);
                    };
                    user.push(ra);
                    // A return address in no mapping, or in memory that
                    // is not code, means the walk already went wrong:
                    // stop there, that frame saying so (unless the
                    // jitdump has code there: mapped since the maps were
                    // read).
                    let known_jit = jit.is_some_and(|j| j.codes.get(ra - 1).is_some());
                    if info.mapping(ra).is_none_or(|m| !m.exec) && !known_jit {
                        return (user, Some(Cut::BadAddress));
                    }
                    if user.len() >= MAX_FRAMES {
                        return (user, Some(Cut::Window));
                    }
                    at = next;
                    // A signal handler returning into the signal
                    // trampoline: the interrupted code's registers are in
                    // the signal frame's ucontext, right above (V8's
                    // --cpu-prof samples by SIGPROF; Go preempts by
                    // signal). The trampoline frame is left out; the
                    // interrupted instruction is a frame of its own,
                    // walked as a leaf.
                    if pu.in_sigreturn(ra - 1) {
                        let Some((ip, sp, bp)) = signal_frame(regs.sp(), &mut read_stack) else {
                            return (user, Some(Cut::Lost));
                        };
                        user.pop();
                        // Return addresses are named one byte back: the
                        // interrupted instruction is one past that.
                        user.push(ip + 1);
                        regs = UnwindRegsX86_64::new(ip, sp, bp);
                        at = FrameAddress::from_instruction_pointer(ip);
                        first = true;
                        leaf_by_fp = bp > sp && pu.uncovered_code(ip);
                    }
                }
                Ok(None) => return (user, None),
                Err(e) => {
                    // Needing stack past a copy that was cut at the
                    // configured size: the window was too small. Anything
                    // else: a frame with no rule to go on, unless the walk
                    // reached the program's entry function, where a stack
                    // ends (a _start without CFI: musl, ld.so).
                    let past =
                        matches!(e, framehop::Error::CouldNotReadStack(a) if a >= window_end);
                    let cut = if past && s.flags & STACK_AT_TOP == 0 {
                        Cut::Window
                    } else if user.last().is_some_and(|&a| pu.in_entry(a)) {
                        return (user, None);
                    } else {
                        Cut::Lost
                    };
                    return (user, Some(cut));
                }
            }
        }
    }

    fn file(&mut self, path: PathBuf) -> Option<Arc<FileUnwindData>> {
        if let Some(f) = self.files.get(&path) {
            return f.clone();
        }
        let data = FileUnwindData::read(&path).map(Arc::new);
        if self.files.len() < MAX_FILES {
            self.files.insert(path, data.clone());
        }
        data
    }

    fn build(&mut self, info: &ProcessInfo) -> (UnwinderX86_64<Arc<[u8]>>, Vec<MappedFile>) {
        let mut unwinder = UnwinderX86_64::new();
        let mut modules = Vec::new();
        for m in info.maps.iter().filter(|m| m.exec) {
            let (name, file) = match &m.backing {
                Backing::File { path, .. } => match self.file(info.host_path(path)) {
                    Some(f) => (path.clone(), f),
                    None => continue,
                },
                Backing::Special(s) if s == "[vdso]" => match &self.vdso {
                    Some(v) => (s.clone(), v.clone()),
                    None => continue,
                },
                _ => continue,
            };
            let path = &name;
            let Some(svma) = file.svma_of_offset(m.offset, m.exec) else {
                continue;
            };
            let bias = m.start.wrapping_sub(svma);
            let section_info = ExplicitModuleSectionInfo {
                base_svma: file.base_svma,
                text_svma: file.text.clone(),
                eh_frame_svma: file.eh_frame.as_ref().map(|(r, _)| r.clone()),
                eh_frame: file.eh_frame.as_ref().map(|(_, d)| d.clone()),
                eh_frame_hdr_svma: file.eh_frame_hdr.as_ref().map(|(r, _)| r.clone()),
                eh_frame_hdr: file.eh_frame_hdr.as_ref().map(|(_, d)| d.clone()),
                debug_frame: file.debug_frame.clone(),
                ..Default::default()
            };
            unwinder.add_module(Module::new(
                path.clone(),
                m.start..m.end,
                file.base_svma.wrapping_add(bias),
                section_info,
            ));
            modules.push(MappedFile {
                range: m.start..m.end,
                file,
                bias,
            });
        }
        (unwinder, modules)
    }

    /// Unwinds one sample with what is known of its process, and counts it.
    /// When the unwind stops at an address in none of the maps read so far
    /// (a library or JIT region mapped since), the maps are read again,
    /// at most every 20 ms per process, and the unwind retried.
    pub fn add(&mut self, s: &StackSample, procs: &mut ProcessTable) {
        if procs.get(s.tgid).is_none() {
            procs.observe(s.tgid);
        }
        let len = (s.len as usize).min(s.stack.len());
        if s.flags & STACK_IPS != 0 {
            // Walked in the kernel already (a frame-pointer stack that
            // collided in the stack map): aggregate it as it is.
            let user: Vec<u64> = s.stack[..len]
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                .take_while(|&a| a != 0)
                .collect();
            self.count(s, user, None);
            return;
        }
        self.stats.samples += 1;
        self.stats.bytes += len as u64;
        let (mut user, mut cut) = self.unwind_once(s, len, procs);
        // The walk ended at an address in no mapping, or in anonymous
        // memory that was not executable when the maps were read: a JIT
        // maps and commits code as it runs (V8 reserves its code range
        // inaccessible and makes pages executable as it fills them), so
        // the maps may predate it. Heap, stack and file data are not code
        // whenever read.
        let stale = cut.is_some()
            && procs.get(s.tgid).is_some_and(|info| {
                user.last().is_some_and(|&a| match info.mapping(a) {
                    None => true,
                    Some(m) => m.backing == Backing::Anonymous && !m.exec,
                })
            });
        if stale && self.may_reread(s.tgid) {
            procs.observe(s.tgid);
            (user, cut) = self.unwind_once(s, len, procs);
        }
        match cut {
            Some(Cut::Window) => self.stats.truncated += 1,
            Some(Cut::Lost) => self.stats.lost += 1,
            Some(Cut::BadAddress) => self.stats.bad_address += 1,
            None => {}
        }
        self.count(s, user, cut);
    }

    /// Counts one more sample of a stack.
    fn count(&mut self, s: &StackSample, user: Vec<u64>, cut: Option<Cut>) {
        let thread =
            String::from_utf8_lossy(s.comm.split(|b| *b == 0).next().unwrap_or(&[])).into_owned();
        let key = UnwoundKey {
            tgid: s.tgid,
            thread,
            user,
            kernel_stack_id: s.kernel_stack_id,
            cut,
        };
        if s.flags & STACK_IN_TURN != 0 && self.timed.len() < MAX_TIMED {
            self.timed.push((s.tid, s.time_ns, key.clone()));
        }
        let id = if let Some((c, id)) = self.stacks.get_mut(&key) {
            *c += 1;
            *id
        } else if self.stacks.len() < self.max_stacks.unwrap_or(MAX_STACKS) {
            let id = self.stacks.len() as u32;
            self.stacks.insert(key, (1, id));
            id
        } else {
            self.stats.dropped += 1;
            return;
        };
        let slice = (s.time_ns / TIME_SLICE_NS) as u32;
        if let Some(n) = self.slices.get_mut(&(slice, id)) {
            *n += 1;
        } else if self.slices.len() < MAX_SLICES {
            self.slices.insert((slice, id), 1);
        } else {
            self.stats.untimed += 1;
        }
    }
}

#[cfg(test)]
mod tests;
