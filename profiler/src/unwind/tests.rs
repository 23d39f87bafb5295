use super::{file::Segment, *};

/// A mapping's start svma, for the layouts the two common linkers
/// write: GNU ld (text segment page aligned in the file) and lld (text
/// segment at 0x...cc0, mapped from the page below, which belongs to
/// the read-only segment before it).
#[test]
fn mapping_offsets_find_their_segment() {
    let seg = |vaddr, offset, size, exec| Segment {
        vaddr,
        offset,
        size,
        exec,
    };
    let file = |segments| FileUnwindData {
        base_svma: 0,
        segments,
        eh_frame: None,
        eh_frame_hdr: None,
        debug_frame: None,
        text: None,
        entry: 0,
        cfi: Vec::new(),
        sigreturn: Vec::new(),
    };
    let lld = file(vec![
        seg(0, 0, 0x188cbc, false),
        seg(0x189cc0, 0x188cc0, 0x3ace00, true),
        seg(0x537ac0, 0x535ac0, 0x1cfe8, false),
    ]);
    assert_eq!(lld.svma_of_offset(0x188000, true), Some(0x189000));
    assert_eq!(lld.svma_of_offset(0, false), Some(0));
    assert_eq!(lld.svma_of_offset(0x535000, false), Some(0x537000));
    let bfd = file(vec![
        seg(0, 0, 0x6e0, false),
        seg(0x1000, 0x1000, 0x1a5, true),
        seg(0x2000, 0x2000, 0x10c, false),
    ]);
    assert_eq!(bfd.svma_of_offset(0x1000, true), Some(0x1000));
    assert_eq!(bfd.svma_of_offset(0x2000, false), Some(0x2000));
    assert_eq!(bfd.svma_of_offset(0x9000, true), None);
}

/// Copies this thread's registers and stack the way the sampler does.
#[inline(never)]
fn sample_here(out: &mut StackSample, stack_end: u64) {
    let (ip, sp, bp): (u64, u64, u64);
    // SAFETY: reads three registers.
    unsafe {
        std::arch::asm!(
            "lea {ip}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            ip = out(reg) ip,
            sp = out(reg) sp,
            bp = out(reg) bp,
        );
    }
    let len = (stack_end - sp).min(profiler_common::stacks::STACK_COPY_MAX as u64) as usize;
    // SAFETY: [sp, sp + len) lies in this thread's stack mapping.
    unsafe { std::ptr::copy_nonoverlapping(sp as *const u8, out.stack.as_mut_ptr(), len) };
    out.ip = ip;
    out.sp = sp;
    out.bp = bp;
    out.base = sp;
    out.len = len as u32;
    out.tgid = std::process::id();
}

#[inline(never)]
fn nested(depth: u32, out: &mut StackSample, stack_end: u64) -> u32 {
    if depth == 0 {
        sample_here(out, stack_end);
        return 0;
    }
    std::hint::black_box(nested(depth - 1, out, stack_end)) + 1
}

/// This process, known, and an unwinder that unwound `s` of it: the
/// stack it made and the figures.
fn unwind_own(s: &StackSample) -> (UserUnwinder, ProcessTable, UnwoundKey, UnwindStats) {
    let mut procs = ProcessTable::new();
    procs.observe(std::process::id());
    let mut u = UserUnwinder::new();
    u.add(s, &mut procs);
    let (stacks, stats) = u.take_window();
    let key = stacks.stacks.into_iter().next().unwrap().0;
    (u, procs, key, stats)
}

/// How many of a stack's frames lie in the `span` bytes from `f`.
fn frames_in(key: &UnwoundKey, f: *const (), span: u64) -> usize {
    let at = f as u64;
    key.user
        .iter()
        .filter(|a| (at..at + span).contains(a))
        .count()
}

/// The top of the calling thread's stack mapping.
fn this_stack_end() -> u64 {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let probe = 0u8;
    let here = std::ptr::addr_of!(probe) as u64;
    maps.lines()
        .filter_map(|l| {
            let (lo, hi) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            ))
        })
        .find(|(lo, hi)| (*lo..*hi).contains(&here))
        .map(|(_, hi)| hi)
        .unwrap()
}

/// The sample a SIGUSR1 handler takes of its own stack, and the top of
/// that stack.
static SIGNAL_SAMPLE: std::sync::atomic::AtomicPtr<StackSample> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
static SIGNAL_STACK_END: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn take_sample(_: libc::c_int) {
    let out = SIGNAL_SAMPLE.load(std::sync::atomic::Ordering::SeqCst);
    let end = SIGNAL_STACK_END.load(std::sync::atomic::Ordering::SeqCst);
    // SAFETY: the test set `out` to a live sample before raising.
    unsafe { sample_here(&mut *out, end) };
}

#[inline(never)]
fn raise_nested(depth: u32) -> u32 {
    if depth == 0 {
        // SAFETY: raises a signal whose handler the test installed.
        unsafe { libc::raise(libc::SIGUSR1) };
        return 0;
    }
    std::hint::black_box(raise_nested(depth - 1)) + 1
}

/// A sample taken inside a signal handler (as V8's --cpu-prof SIGPROF
/// handler is sampled) unwinds through the signal frame to the code
/// the signal interrupted: the nested calls that raised it and the
/// test function are found below the handler.
#[test]
fn walks_continue_through_signal_frames() {
    // SAFETY: all zeroes is a valid StackSample.
    let mut s: Box<StackSample> = unsafe { Box::new_zeroed().assume_init() };
    SIGNAL_SAMPLE.store(&mut *s, std::sync::atomic::Ordering::SeqCst);
    SIGNAL_STACK_END.store(this_stack_end(), std::sync::atomic::Ordering::SeqCst);
    // SAFETY: installs a handler (no SA_ONSTACK: it runs on this
    // thread's stack) for a signal this test raises on itself.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = take_sample as *const () as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    raise_nested(3);
    let (_, _, key, _) = unwind_own(&s);
    let raise = raise_nested as *const ();
    assert_eq!(frames_in(&key, raise, 256), 4, "frames {:x?}", key.user);
    let test = walks_continue_through_signal_frames as *const ();
    assert!(
        frames_in(&key, test, 4096) > 0,
        "no frame in the test function: {:x?}",
        key.user
    );
}

// A function without CFI (as V8's builtins in `node`) that sets up a
// frame, spills a heap pointer at [sp] and samples itself there: the
// leaf of the sample is in code no FDE covers.
std::arch::global_asm!(
    ".text",
    ".globl profiler_test_framed_no_cfi",
    "profiler_test_framed_no_cfi:",
    "push rbp",
    "mov rbp, rsp",
    "push rdi",
    "push rdi",
    "lea rsi, [rip]",
    "mov rdx, rsp",
    "mov rcx, rbp",
    "call {cb}",
    "pop rdi",
    "pop rdi",
    "pop rbp",
    "ret",
    cb = sym sample_from_asm,
);

unsafe extern "C" {
    fn profiler_test_framed_no_cfi(out: *mut StackSample);
}

/// Copies the stack of the no-CFI function's frame as the sampler
/// would have at `ip` (its registers given; its frame lies above ours).
extern "C" fn sample_from_asm(out: *mut StackSample, ip: u64, sp: u64, bp: u64) {
    let end = SIGNAL_STACK_END.load(std::sync::atomic::Ordering::SeqCst);
    // SAFETY: [sp, end) is this thread's live stack above this frame.
    unsafe {
        let len = (end - sp).min(profiler_common::stacks::STACK_COPY_MAX as u64) as usize;
        std::ptr::copy_nonoverlapping(sp as *const u8, (*out).stack.as_mut_ptr(), len);
        (*out).ip = ip;
        (*out).sp = sp;
        (*out).bp = bp;
        (*out).base = sp;
        (*out).len = len as u32;
        (*out).tgid = std::process::id();
    }
}

/// The leaf in code of a file that no FDE covers, with a frame set up
/// and a heap pointer at [sp] (V8's builtins): walked by its frame
/// pointer, the caller is found and the walk goes on; taking [sp] as
/// the return address (framehop's rule for a frameless leaf) ended it
/// at "not code" after one frame of garbage.
#[test]
fn a_leaf_without_cfi_is_walked_by_its_frame_pointer() {
    // SAFETY: all zeroes is a valid StackSample.
    let mut s: Box<StackSample> = unsafe { Box::new_zeroed().assume_init() };
    SIGNAL_STACK_END.store(this_stack_end(), std::sync::atomic::Ordering::SeqCst);
    // SAFETY: the function only reads its argument's address.
    unsafe { profiler_test_framed_no_cfi(&mut *s) };
    let (_, _, key, stats) = unwind_own(&s);
    let test_at = a_leaf_without_cfi_is_walked_by_its_frame_pointer as *const () as u64;
    assert!(
        key.user
            .iter()
            .skip(1)
            .take(2)
            .any(|a| (test_at..test_at + 4096).contains(a)),
        "the caller is not the second frame: {:x?}",
        key.user
    );
    assert_eq!(
        (stats.bad_address, stats.lost, key.cut),
        (0, 0, None),
        "frames {:x?}",
        key.user
    );
}

/// This test binary (linked by lld, as Rust binaries are) unwound with
/// its CFI from a copy of its own stack, as a sample of it would be:
/// every frame of the nested calls found (six: five nested calls and
/// the one that samples), and the walk ends at the
/// thread's start, not truncated. With the text segment's mapping
/// placed 0x1000 off, the second frame was already garbage.
#[test]
fn this_binary_unwinds_to_its_thread_start() {
    let stack_end = this_stack_end();
    // SAFETY: all zeroes is a valid StackSample.
    let mut s: Box<StackSample> = unsafe { Box::new_zeroed().assume_init() };
    nested(5, &mut s, stack_end);
    let (mut u, mut procs, key, stats) = unwind_own(&s);
    let nested_fn = nested as *const ();
    assert_eq!(frames_in(&key, nested_fn, 256), 6, "frames {:x?}", key.user);
    let test = this_binary_unwinds_to_its_thread_start as *const ();
    assert!(
        frames_in(&key, test, 4096) > 0,
        "no frame in the test function: {:x?}",
        key.user
    );
    assert_eq!(stats.truncated + stats.lost, 0, "frames {:x?}", key.user);

    // The same copy cut to 512 bytes: cut at the window when the copy
    // stopped at the configured size, a lost walk when it stopped at
    // the stack's top (a frame pointed past what the stack holds).
    s.len = 512;
    s.flags = 0;
    u.add(&s, &mut procs);
    s.flags = STACK_AT_TOP;
    u.add(&s, &mut procs);
    let (stacks, stats) = u.take_window();
    let cuts: Vec<_> = stacks.stacks.iter().map(|(k, _)| k.cut).collect();
    assert_eq!((stats.truncated, stats.lost), (1, 1), "{cuts:?}");

    // A return address just inside the entry point (_start) ends a
    // walk; one further in does not.
    // SAFETY: getauxval has no preconditions.
    let entry = unsafe { libc::getauxval(libc::AT_ENTRY) };
    let pu = &u.procs[&std::process::id()];
    assert!(pu.in_entry(entry + 0x10));
    assert!(!pu.in_entry(entry + 0x100));
}

/// The unwind sections of truncated or garbled copies of a real binary:
/// read without panicking (or refused), the intact one found.
#[test]
fn truncated_and_garbled_files_are_survived() {
    let me = std::fs::read("/proc/self/exe").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    std::fs::write(&good, &me).unwrap();
    let d = FileUnwindData::read(&good).expect("this binary has CFI");
    assert!(d.eh_frame.is_some() && d.text.is_some());
    let mut garbled = me.clone();
    for (i, b) in garbled.iter_mut().enumerate().skip(64) {
        *b = (i as u8).wrapping_mul(31) ^ 0x5a;
    }
    for (name, bytes) in [
        ("empty", &me[..0]),
        ("header", &me[..64]),
        ("half", &me[..me.len() / 2]),
        ("garbled", &garbled[..]),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        // Either refused or read: never a panic or a fault.
        let _ = FileUnwindData::read(&p);
    }
}
