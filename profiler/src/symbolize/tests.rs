use super::*;

#[test]
fn rust_hashes_are_stripped() {
    assert_eq!(
        strip_rust_hash("core::fmt::write::h0123456789abcdef"),
        "core::fmt::write"
    );
    assert_eq!(strip_rust_hash("foo::hello"), "foo::hello");
    assert_eq!(strip_rust_hash("foo::h0123"), "foo::h0123");
}

/// A process table that has read this test process, and its pid.
fn this_process() -> (crate::procs::ProcessTable, u32) {
    let mut table = crate::procs::ProcessTable::new();
    let me = std::process::id();
    table.observe(me);
    (table, me)
}

#[test]
fn names_a_function_of_this_test_binary() {
    let (table, me) = this_process();
    let addr = names_a_function_of_this_test_binary as *const () as u64;
    let mut sym = Symbolizer::new();
    let frames = sym.user(table.get(me), &[addr]);
    let names: Vec<&str> = frames[&addr].iter().map(|f| &*f.name).collect();
    assert!(
        names
            .iter()
            .any(|n| n.ends_with("names_a_function_of_this_test_binary")),
        "{names:?}"
    );
}

/// A capture names its addresses ahead, file by file, and lets each
/// parsed file go: the frames are those a symbolizer finds on demand, and
/// no parsed file is held afterwards. A daemon's idle files go too.
#[test]
fn prefetched_names_match_and_files_are_let_go() {
    let (table, me) = this_process();
    let a = names_a_function_of_this_test_binary as *const () as u64;
    let b = rust_hashes_are_stripped as *const () as u64;
    let stack = RawStack {
        tgid: me,
        thread: "test".into(),
        // Leaf first: `b` is a return address, named as `b - 1`.
        user: Ok(vec![a, b + 1]),
        user_cut: None,
        kernel: Err(-libc::EFAULT),
        count: 1,
    };
    let mut ahead = Symbolizer::new();
    ahead.prefetch([&stack], &table);
    assert_eq!(ahead.files.len(), 1);
    assert!(
        ahead
            .files
            .values()
            .all(|f| f.blaze.is_none() && f.named.len() == 2),
        "a prefetched file keeps its frames, not its parse"
    );
    let named = ahead.user(table.get(me), &[a, b]);
    assert!(
        ahead.files.values().all(|f| f.blaze.is_none()),
        "named again from what was kept"
    );
    let fresh = Symbolizer::new().user(table.get(me), &[a, b]);
    for addr in [a, b] {
        assert_eq!(names_of(&named, addr), names_of(&fresh, addr));
    }
    assert!(
        names_of(&named, b)
            .iter()
            .any(|n| n.ends_with("rust_hashes_are_stripped"))
    );

    ahead.forget_unused(Duration::from_secs(3600));
    assert_eq!(ahead.files.len(), 1, "used just now: kept");
    ahead.forget_unused(Duration::ZERO);
    assert_eq!(ahead.files.len(), 0);
}

/// kallsyms' table is read on the first kernel address asked for, kept
/// across windows (a daemon with short windows read it each window, 45%
/// of its CPU), and let go with the kernel names once they are a
/// minute old. Needs kallsyms' addresses (root), like the captures.
#[test]
fn the_kallsyms_table_lives_as_long_as_the_kernel_names() {
    let Some(table) = kallsyms::Table::load() else {
        eprintln!("skipped: /proc/kallsyms shows no addresses (not root)");
        return;
    };
    let addr = table
        .address_of("schedule")
        .expect("schedule is in kallsyms");
    let mut sym = Symbolizer::new();
    assert!(sym.kernel_table.get().is_none(), "read only when asked");
    let named = sym.kernel(&[addr + 1]);
    assert_eq!(&*named[&(addr + 1)][0].name, "schedule");
    sym.forget_unused(Duration::ZERO);
    assert!(
        matches!(sym.kernel_table.get(), Some(Some(_))),
        "kept while the kernel names are younger than a minute"
    );
    sym.kernel_since -= KERNEL_NAMES_LIFETIME;
    sym.forget_unused(Duration::ZERO);
    assert!(sym.kernel_table.get().is_none() && sym.kernel_named.is_empty());
}

fn names_of(t: &HashMap<u64, Vec<Frame>>, addr: u64) -> Vec<String> {
    t[&addr].iter().map(|f| f.name.to_string()).collect()
}

/// Truncated and corrupted copies of a real binary with DWARF (this
/// test binary): symbolizing them never panics, and every frame still
/// says where it is.
#[test]
fn truncated_and_corrupt_files_still_say_where() {
    let me = std::fs::read("/proc/self/exe").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("header-only", me[..64].to_vec()),
        ("half", me[..me.len() / 2].to_vec()),
    ];
    // Garbage over the second half (DWARF and symbol tables live there),
    // headers intact.
    let mut garbled = me.clone();
    let mut x: u32 = 0x9e37_79b9;
    for b in garbled[me.len() / 2..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    cases.push(("garbled", garbled));
    for (name, bytes) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let info = exited_process(&format!(
            "1000-100000 r-xp 00001000 fd:01 7 {}\n",
            path.display()
        ));
        let mut sym = Symbolizer::new();
        let frames = sym.user(Some(&info), &[0x2000, 0x3000, 0x50000]);
        for (addr, fs) in &frames {
            assert!(!fs.is_empty(), "{name}: {addr:#x} has no frame");
            for f in fs {
                assert!(!f.name.is_empty(), "{name}: empty name at {addr:#x}");
                if f.unknown_info().is_some() {
                    assert!(
                        f.name.starts_with(&format!("{name}+0x")),
                        "{name}: {} does not say where",
                        f.name
                    );
                }
            }
        }
    }
}

/// An exited process known by these /proc maps lines.
fn exited_process(maps: &str) -> ProcessInfo {
    ProcessInfo {
        pid: 1,
        ns_pid: 1,
        name: "x".into(),
        start_time: 1,
        maps: crate::procmaps::parse_maps(maps).0,
        root: None,
        exited: true,
        cgroup: None,
        replaced: HashMap::new(),
    }
}

#[test]
fn a_missing_file_still_says_where() {
    let info = exited_process("1000-2000 r-xp 00003000 fd:01 7 /nonexistent/libfoo.so\n");
    let mut sym = Symbolizer::new();
    let frames = sym.user(Some(&info), &[0x1a2b, 0x5000]);
    assert_eq!(&*frames[&0x1a2b][0].name, "libfoo.so+0x3a2b");
    assert_eq!(
        frames[&0x1a2b][0].unknown_info().map(|u| u.reason),
        Some(UnknownReason::FileUnreadable)
    );
    assert_eq!(
        frames[&0x5000][0].unknown_info().map(|u| u.reason),
        Some(UnknownReason::Unmapped)
    );
    let none = sym.user(None, &[0x10]);
    assert_eq!(
        none[&0x10][0].unknown_info().map(|u| u.reason),
        Some(UnknownReason::ProcessExited)
    );
}

/// Heap, stack and a file's data are not code: a frame there says the
/// walk went wrong, not that symbols are missing. JIT memory with no
/// perf map and no jitdump says so.
#[test]
fn addresses_that_are_not_code_say_so() {
    let info = exited_process(
        "1000-2000 rw-p 00000000 00:00 0 [heap]\n\
         3000-4000 rw-p 00000000 00:00 0 [stack]\n\
         5000-6000 r--p 00001000 fd:01 7 /nonexistent/libfoo.so\n\
         7000-8000 rw-p 00000000 00:00 0\n\
         9000-a000 r-xp 00000000 00:00 0\n\
         b000-c000 r-xp 00000000 00:01 9 /memfd:jit (deleted)\n",
    );
    let mut sym = Symbolizer::new();
    let frames = sym.user(
        Some(&info),
        &[0x1010, 0x3010, 0x5010, 0x7010, 0x9010, 0xb010],
    );
    for (addr, what) in [
        (0x1010, "[heap]"),
        (0x3010, "[stack]"),
        (0x5010, "data of libfoo.so"),
        (0x7010, "anonymous memory"),
    ] {
        let f = &frames[&addr][0];
        assert_eq!(
            f.unknown_info().map(|u| u.reason),
            Some(UnknownReason::NotCode),
            "{f:?}"
        );
        assert!(
            f.name.contains(what) && f.name.contains("the walk went wrong"),
            "{f:?}"
        );
    }
    // Anonymous code, and code in a memfd (anonymous memory with a
    // name): JIT code, not a stripped file.
    for addr in [0x9010, 0xb010] {
        assert_eq!(
            frames[&addr][0].unknown_info().map(|u| u.reason),
            Some(UnknownReason::JitWithoutPerfMap),
            "{:?}",
            frames[&addr]
        );
    }
}
