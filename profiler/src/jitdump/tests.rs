use super::*;

/// Bytes of a jitdump as V8 writes one (little endian).
#[derive(Default)]
pub(crate) struct Writer(pub Vec<u8>);

impl Writer {
    pub(crate) fn new() -> Self {
        let mut w = Writer(Vec::new());
        w.u32(MAGIC);
        w.u32(1);
        w.u32(40);
        w.u32(62); // EM_X86_64
        w.u32(0xdead_beef);
        w.u32(1234);
        w.u64(0);
        w.u64(0);
        w
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn record(&mut self, id: u32, body: &[u8]) {
        let size = RECORD_HEADER + body.len();
        let padded = size.div_ceil(8) * 8;
        self.u32(id);
        self.u32(padded as u32);
        self.u64(0);
        self.0.extend_from_slice(body);
        self.0.resize(self.0.len() + padded - size, 0);
    }
    pub(crate) fn load(&mut self, addr: u64, size: u64, name: &str) {
        let mut b = Writer(Vec::new());
        b.u32(1234);
        b.u32(1234);
        b.u64(addr);
        b.u64(addr);
        b.u64(size);
        b.u64(0);
        b.0.extend_from_slice(name.as_bytes());
        b.0.push(0);
        b.0.resize(b.0.len() + size as usize, 0xcc);
        self.record(LOAD, &b.0);
    }
    pub(crate) fn debug(&mut self, addr: u64, entries: &[(u64, u32, &str)]) {
        let mut b = Writer(Vec::new());
        b.u64(addr);
        b.u64(entries.len() as u64);
        for (off, line, file) in entries {
            b.u64(addr + off + V8_DEBUG_ADDR_BIAS);
            b.u32(*line);
            b.u32(1);
            b.0.extend_from_slice(file.as_bytes());
            b.0.push(0);
        }
        self.record(DEBUG_INFO, &b.0);
    }
    pub(crate) fn unwinding(&mut self, eh_frame: &[u8]) {
        let hdr = [0u8; 20];
        let mut b = Writer(Vec::new());
        b.u64((eh_frame.len() + hdr.len()) as u64);
        b.u64(hdr.len() as u64);
        b.u64((eh_frame.len() + hdr.len()) as u64);
        b.0.extend_from_slice(eh_frame);
        b.0.extend_from_slice(&hdr);
        self.record(UNWINDING_INFO, &b.0);
    }
}

#[test]
fn loads_lines_and_unwinding_info_are_read() {
    let mut w = Writer::new();
    w.debug(0x1000, &[(0, 10, "/app/a.js"), (0x20, 12, "/app/b.js")]);
    w.unwinding(&[1, 2, 3, 4]);
    w.load(0x1000, 0x40, "JS:*outer /app/a.js:9:1");
    w.load(0x2000, 0x10, "Builtin:Foo");
    let d = JitDump::parse(&w.0).unwrap();
    assert_eq!(d.len(), 2);
    let c = d.lookup(0x1025).unwrap();
    assert_eq!(c.name, "JS:*outer /app/a.js:9:1");
    assert_eq!(c.eh_frame.as_deref(), Some(&[1u8, 2, 3, 4][..]));
    let l = c.line_at(0x1025).unwrap();
    assert_eq!((&*l.file, l.line), ("/app/b.js", 12));
    assert_eq!(c.line_at(0x1001).unwrap().line, 10);
    let b = d.lookup(0x2000).unwrap();
    assert!(b.lines.is_empty() && b.eh_frame.is_none());
    assert!(d.lookup(0x2010).is_none());
    assert!(d.lookup(0x1040).is_none());
}

/// Fed a byte at a time (a file read while the runtime writes it),
/// the same records come out, each once, and cut records wait.
#[test]
fn a_file_read_while_written_parses_the_same() {
    let mut w = Writer::new();
    for i in 0..20u64 {
        w.debug(0x10_000 + i * 0x100, &[(0, i as u32, "/x.js")]);
        w.load(0x10_000 + i * 0x100, 0x80, &format!("JS:*f{i} /x.js:{i}:1"));
    }
    let whole = JitDump::parse(&w.0).unwrap();
    let mut p = JitDumpParser::default();
    let mut d = JitDump::default();
    for b in w.0.chunks(7) {
        d.apply(p.feed(b).unwrap());
    }
    assert!(d.codes().eq(whole.codes()));
    assert_eq!(d.len(), 20);
    assert_eq!(p.consumed, w.0.len() as u64);
}

/// A reader follows a file as it grows, reading only what is new.
#[test]
fn a_reader_follows_a_growing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jit-1.dump");
    let mut w = Writer::new();
    w.load(0x1000, 0x10, "JS:*a /a.js:1:1");
    std::fs::write(&path, &w.0).unwrap();
    let mut r = JitDumpReader::new(path.clone());
    assert!(r.refresh());
    assert_eq!(r.dump.len(), 1);
    w.load(0x2000, 0x10, "JS:*b /a.js:5:1");
    std::fs::write(&path, &w.0).unwrap();
    assert!(r.refresh());
    assert_eq!(r.dump.len(), 2);
    assert_eq!(r.dump.lookup(0x2004).unwrap().name, "JS:*b /a.js:5:1");
    std::fs::write(&path, [0u8; 64]).unwrap();
    let mut bad = JitDumpReader::new(path);
    assert!(!bad.refresh());
}

#[test]
fn garbage_and_truncation_are_survived() {
    assert_eq!(
        JitDump::parse(&[0u8; 64]).unwrap_err(),
        JitDumpError::Magic(0)
    );
    assert!(JitDump::parse(&[]).unwrap().is_empty());
    let mut w = Writer::new();
    w.load(0x1000, 0x40, "JS:*a");
    let full = w.0.len();
    w.load(0x2000, 0x40, "JS:*b");
    // Cut inside the second record: the first stands.
    let d = JitDump::parse(&w.0[..full + 10]).unwrap();
    assert_eq!(d.len(), 1);
    // A record whose length is nonsense ends the parse, not the process.
    let mut bad = w.0.clone();
    bad[full + 4..full + 8].copy_from_slice(&3u32.to_le_bytes());
    let d = JitDump::parse(&bad).unwrap();
    assert_eq!((d.len(), d.bad_records), (1, 1));
    // Every prefix of a real file parses without a panic.
    for n in 0..w.0.len() {
        let _ = JitDump::parse(&w.0[..n]);
    }
}

#[test]
fn v8_names_parse() {
    let n = V8Name::parse("JS:*trim_prefix /app/node_modules/express/lib/router/index.js:293:23")
        .unwrap();
    assert_eq!(
        (n.kind, n.tier, n.function, n.line, n.column),
        ("JS", Some('*'), "trim_prefix", 293, 23)
    );
    assert_eq!(n.file, "/app/node_modules/express/lib/router/index.js");
    assert_eq!(
        n.untiered(),
        "JS:trim_prefix /app/node_modules/express/lib/router/index.js:293:23"
    );
    let anon = V8Name::parse("JS:~ node:internal/main:1:1").unwrap();
    assert_eq!(
        (anon.function, anon.file, anon.tier),
        ("", "node:internal/main", Some('~'))
    );
    assert!(V8Name::parse("Builtin:ArgumentsAdaptorTrampoline").is_none());
    assert!(V8Name::parse("RegExp:^\\s+").is_none());
}

/// TurboFan code of `outer` with `inner` (same script) and `other`
/// (another script) inlined, its debug info naming outer's script for
/// every position as V8 does: positions of inner's and other's
/// baseline code are theirs, positions within inner's extent too, the
/// rest outer's; a position matching nothing is left to outer.
#[test]
fn inlined_functions_are_told_by_their_positions() {
    let mut w = Writer::new();
    w.debug(0x1000, &[(0, 20, "/a.js"), (8, 25, "/a.js")]);
    w.load(0x1000, 0x40, "JS:^inner /a.js:20:1");
    w.debug(0x2000, &[(0, 10, "/a.js"), (8, 40, "/a.js")]);
    w.load(0x2000, 0x40, "JS:^outer /a.js:10:1");
    w.debug(0x4000, &[(0, 300, "/b.js"), (8, 307, "/b.js")]);
    w.load(0x4000, 0x40, "JS:^other /b.js:300:1");
    w.debug(
        0x3000,
        &[
            (0, 10, "/a.js"),
            (0x10, 22, "/a.js"),
            (0x20, 307, "/a.js"),
            (0x30, 12, "/a.js"),
            (0x38, 999, "/a.js"),
        ],
    );
    w.load(0x3000, 0x40, "JS:*outer /a.js:10:1");
    let d = JitDump::parse(&w.0).unwrap();
    let f = d.functions();
    let code = d.lookup(0x3000).unwrap();
    assert_eq!(f.inlined_at(code, 0x3004), None);
    assert_eq!(
        f.inlined_at(code, 0x3014).as_deref(),
        Some("JS:inner /a.js:20:1")
    );
    assert_eq!(
        f.inlined_at(code, 0x3024).as_deref(),
        Some("JS:other /b.js:300:1")
    );
    assert_eq!(f.inlined_at(code, 0x3034), None);
    assert_eq!(f.inlined_at(code, 0x303c), None);
    // The baseline code itself inlines nothing.
    assert_eq!(f.inlined_at(d.lookup(0x1004).unwrap(), 0x1004), None);
}

#[test]
fn jitdump_paths_are_recognized() {
    assert!(is_jitdump_path("/srv/app/jit-4242.dump"));
    assert!(is_jitdump_path("jit-1.dump"));
    assert!(!is_jitdump_path("/tmp/jit-.dump"));
    assert!(!is_jitdump_path("/tmp/jit-12a.dump"));
    assert!(!is_jitdump_path("/tmp/perf-12.map"));
}
