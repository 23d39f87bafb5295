//! The pprof export: raw stacks, with their processes' memory maps and the
//! symbol tables, to a gzipped `profile.proto` message, as Go's
//! `net/http/pprof` serves it (sample types `samples/count` and
//! `cpu/nanoseconds`), so that `go tool pprof`, Parca and Pyroscope read it.
//! Locations carry the address and their mapping (file, offsets, build id);
//! inlined functions are extra lines of one location, innermost first.

use std::{collections::HashMap, fs::File, io::Write, path::Path};

use prost::Message;

use crate::{
    model::{Frame, FrameKind, RawStack},
    procs::ProcessTable,
    symbolize::{SymbolTables, adjusted, process_name},
};

// profile.proto (github.com/google/pprof/proto/profile.proto), the fields
// this exporter writes.

/// A profile.
#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    /// What each sample value is.
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    /// The samples.
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    /// Mapped files.
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    /// Code locations.
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    /// Functions.
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    /// Every string; index 0 is "".
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    /// Start, ns since the epoch.
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    /// Length, ns.
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    /// What the period counts.
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    /// Events between samples.
    #[prost(int64, tag = "12")]
    pub period: i64,
    /// Free-form notes (string indexes).
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
}

/// A type and unit (string indexes).
#[derive(Clone, PartialEq, Message)]
pub struct ValueType {
    /// Type.
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    /// Unit.
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// One stack and its values.
#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    /// Locations, leaf first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    /// One value per sample type.
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    /// Labels.
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// A sample label: a string or a number.
#[derive(Clone, PartialEq, Message)]
pub struct Label {
    /// Key (string index).
    #[prost(int64, tag = "1")]
    pub key: i64,
    /// String value (string index).
    #[prost(int64, tag = "2")]
    pub str: i64,
    /// Numeric value.
    #[prost(int64, tag = "3")]
    pub num: i64,
}

/// A mapped file.
#[derive(Clone, PartialEq, Message)]
pub struct Mapping {
    /// Id (1-based).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Start address.
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    /// End address.
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    /// File offset of the start.
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    /// File name (string index).
    #[prost(int64, tag = "5")]
    pub filename: i64,
    /// Build id (string index).
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    /// Locations of this mapping carry function names.
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    /// ... and inlined frames.
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

/// A code address and the functions there.
#[derive(Clone, PartialEq, Message)]
pub struct Location {
    /// Id (1-based).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Its mapping (0: none).
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    /// The address.
    #[prost(uint64, tag = "3")]
    pub address: u64,
    /// Functions, innermost (inlined) first.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

/// A function at a location.
#[derive(Clone, PartialEq, Message)]
pub struct Line {
    /// Its function.
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    /// Source line (0: unknown).
    #[prost(int64, tag = "2")]
    pub line: i64,
}

/// A function.
#[derive(Clone, PartialEq, Message)]
pub struct Function {
    /// Id (1-based).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Name (string index).
    #[prost(int64, tag = "2")]
    pub name: i64,
    /// Name as in the binary (string index).
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    /// Source file (string index).
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

/// Builds a [`Profile`], interning strings, functions, mappings and
/// locations as it goes.
pub struct Builder {
    p: Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(std::sync::Arc<str>, &'static str), u64>,
    mappings: HashMap<(u32, u64), u64>,
    locations: HashMap<(u32, u64), u64>,
    build_ids: HashMap<String, String>,
    kernel_mapping: Option<u64>,
}

/// What a profile covers.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Start, ns since the Unix epoch.
    pub start_unix_ns: i64,
    /// Length, ns.
    pub duration_ns: i64,
    /// Sampling frequency, per CPU.
    pub frequency_hz: u64,
}

impl Builder {
    /// An empty profile of CPU samples taken at `w.frequency_hz`.
    pub fn new(w: Window) -> Self {
        let mut b = Builder {
            p: Profile::default(),
            strings: HashMap::new(),
            functions: HashMap::new(),
            mappings: HashMap::new(),
            locations: HashMap::new(),
            build_ids: HashMap::new(),
            kernel_mapping: None,
        };
        b.s("");
        let (samples, count, cpu, ns) =
            (b.s("samples"), b.s("count"), b.s("cpu"), b.s("nanoseconds"));
        b.p.sample_type = vec![
            ValueType {
                r#type: samples,
                unit: count,
            },
            ValueType {
                r#type: cpu,
                unit: ns,
            },
        ];
        b.p.period_type = Some(ValueType {
            r#type: cpu,
            unit: ns,
        });
        b.p.period = (1_000_000_000 / w.frequency_hz.max(1)) as i64;
        b.p.time_nanos = w.start_unix_ns;
        b.p.duration_nanos = w.duration_ns;
        let note = b.s(&format!(
            "profiler {} on-CPU samples at {} Hz",
            env!("CARGO_PKG_VERSION"),
            w.frequency_hz
        ));
        b.p.comment.push(note);
        b
    }

    fn s(&mut self, text: &str) -> i64 {
        if let Some(&i) = self.strings.get(text) {
            return i;
        }
        let i = self.p.string_table.len() as i64;
        self.p.string_table.push(text.to_string());
        self.strings.insert(text.to_string(), i);
        i
    }

    fn function(&mut self, frame: &Frame, file: &str) -> u64 {
        let tag = match &frame.kind {
            k if k.is_kernel() => "[kernel.kallsyms]",
            FrameKind::Jit => "[jit]",
            _ => "",
        };
        let key = (
            frame.name.clone(),
            if tag.is_empty() { "user" } else { tag },
        );
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.p.function.len() as u64 + 1;
        let name = self.s(&frame.name);
        let filename = self.s(if tag.is_empty() { file } else { tag });
        self.p.function.push(Function {
            id,
            name,
            system_name: name,
            filename,
        });
        self.functions.insert(key, id);
        id
    }

    fn build_id(&mut self, host_path: &Path) -> i64 {
        let key = host_path.to_string_lossy().into_owned();
        if !self.build_ids.contains_key(&key) {
            let id = read_build_id(host_path).unwrap_or_default();
            self.build_ids.insert(key.clone(), id);
        }
        let id = self.build_ids[&key].clone();
        self.s(&id)
    }

    /// The mapping of a user address of process `tgid`, if it is mapped.
    fn user_mapping(
        &mut self,
        tgid: u32,
        addr: u64,
        procs: &ProcessTable,
    ) -> Option<(u64, String)> {
        let info = procs.get(tgid)?;
        let m = info.mapping(addr)?;
        let path = match &m.backing {
            crate::procmaps::Backing::File { path, .. } => path.clone(),
            crate::procmaps::Backing::Special(name) => name.clone(),
            crate::procmaps::Backing::Anonymous => "[anon]".to_string(),
        };
        if let Some(&id) = self.mappings.get(&(tgid, m.start)) {
            return Some((id, path));
        }
        let id = self.p.mapping.len() as u64 + 1;
        let filename = self.s(&path);
        let build_id = if path.starts_with('/') {
            self.build_id(&info.host_path(&path))
        } else {
            0
        };
        self.p.mapping.push(Mapping {
            id,
            memory_start: m.start,
            memory_limit: m.end,
            file_offset: m.offset,
            filename,
            build_id,
            has_functions: true,
            has_inline_frames: true,
        });
        self.mappings.insert((tgid, m.start), id);
        Some((id, path))
    }

    fn kernel_mapping(&mut self) -> u64 {
        if let Some(id) = self.kernel_mapping {
            return id;
        }
        let id = self.p.mapping.len() as u64 + 1;
        let filename = self.s("[kernel.kallsyms]");
        self.p.mapping.push(Mapping {
            id,
            memory_start: 0xffff_8000_0000_0000,
            memory_limit: u64::MAX,
            file_offset: 0,
            filename,
            build_id: 0,
            has_functions: true,
            has_inline_frames: false,
        });
        self.kernel_mapping = Some(id);
        id
    }

    /// The location of an (adjusted) address; `tgid` 0 for kernel ones.
    fn location(
        &mut self,
        tgid: u32,
        addr: u64,
        frames: Option<&Vec<Frame>>,
        procs: &ProcessTable,
    ) -> u64 {
        if let Some(&id) = self.locations.get(&(tgid, addr)) {
            return id;
        }
        let (mapping_id, file) = if tgid == 0 {
            (self.kernel_mapping(), String::new())
        } else {
            self.user_mapping(tgid, addr, procs)
                .unwrap_or((0, String::new()))
        };
        let mut line = Vec::new();
        // Frames are outermost first; pprof wants the innermost first.
        for f in frames.into_iter().flatten().rev() {
            line.push(Line {
                function_id: self.function(f, &file),
                line: 0,
            });
        }
        let id = self.p.location.len() as u64 + 1;
        self.p.location.push(Location {
            id,
            mapping_id,
            address: addr,
            line,
        });
        self.locations.insert((tgid, addr), id);
        id
    }

    /// Adds one counted stack with its labels (`pid`, `comm`, `thread`,
    /// and `container` when it runs in one).
    pub fn add(
        &mut self,
        s: &RawStack,
        tables: &SymbolTables,
        procs: &ProcessTable,
        container: Option<&str>,
    ) {
        let mut ids = Vec::new();
        // The outermost user frame (`_start`) is in the main executable:
        // mapped first, it is the profile's main binary for pprof when the
        // hottest stack is added first.
        if self.p.mapping.is_empty()
            && let Ok(u) = &s.user
            && let Some(&outer) = u.last()
        {
            self.user_mapping(s.tgid, outer, procs);
        }
        // Leaf first: kernel frames, then user frames.
        if let Ok(k) = &s.kernel {
            for a in adjusted(k) {
                let id = self.location(0, a, tables.kernel.get(&a), procs);
                ids.push(id);
            }
        }
        if let Ok(u) = &s.user {
            let table = tables.user.get(&s.tgid);
            for a in adjusted(u) {
                let id = self.location(s.tgid, a, table.and_then(|t| t.get(&a)), procs);
                ids.push(id);
            }
        }
        let mut label = Vec::new();
        let (k_pid, k_comm, k_thread) = (self.s("pid"), self.s("comm"), self.s("thread"));
        label.push(Label {
            key: k_pid,
            str: 0,
            num: s.tgid as i64,
        });
        let comm = process_name(s.tgid, &s.thread, procs);
        let v = self.s(&comm);
        label.push(Label {
            key: k_comm,
            str: v,
            num: 0,
        });
        let v = self.s(&s.thread);
        label.push(Label {
            key: k_thread,
            str: v,
            num: 0,
        });
        if let Some(c) = container {
            let (k, v) = (self.s("container"), self.s(c));
            label.push(Label {
                key: k,
                str: v,
                num: 0,
            });
        }
        let period = self.p.period;
        self.p.sample.push(Sample {
            location_id: ids,
            value: vec![s.count as i64, s.count as i64 * period],
            label,
        });
    }

    /// The profile, serialized and gzipped.
    pub fn finish(self) -> Vec<u8> {
        let raw = self.p.encode_to_vec();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&raw).expect("writing to memory");
        gz.finish().expect("writing to memory")
    }

    /// The profile as built (tests).
    pub fn profile(&self) -> &Profile {
        &self.p
    }
}

/// Why a pprof profile could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Gzipped, but not whole.
    #[error("its gzip stream is broken: {0}")]
    Gzip(#[from] std::io::Error),
    /// Not the protobuf of a profile.
    #[error("{0}")]
    Decode(#[from] prost::DecodeError),
}

/// A pprof profile (gzipped or not) as folded stacks: each sample's
/// frames from the root (its `comm` label, when it has one) to the leaf,
/// inlined functions apart, counted by its first value.
pub fn to_folded(data: &[u8]) -> Result<Vec<(String, u64)>, ReadError> {
    use std::io::Read as _;
    let mut plain = Vec::new();
    let data = if data.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(data).read_to_end(&mut plain)?;
        &plain[..]
    } else {
        data
    };
    let p = Profile::decode(data)?;
    let text = |i: i64| p.string_table.get(i as usize).map_or("?", String::as_str);
    let functions: HashMap<u64, &str> = p.function.iter().map(|f| (f.id, text(f.name))).collect();
    let locations: HashMap<u64, &Location> = p.location.iter().map(|l| (l.id, l)).collect();
    let mut out: HashMap<String, u64> = HashMap::new();
    for s in &p.sample {
        let mut frames: Vec<&str> = Vec::new();
        if let Some(comm) = s.label.iter().find(|l| text(l.key) == "comm") {
            frames.push(text(comm.str));
        }
        for id in s.location_id.iter().rev() {
            match locations.get(id) {
                Some(l) if !l.line.is_empty() => frames.extend(
                    l.line
                        .iter()
                        .rev()
                        .map(|x| functions.get(&x.function_id).copied().unwrap_or("?")),
                ),
                _ => frames.push("[unknown]"),
            }
        }
        let n = s.value.first().copied().unwrap_or(0).max(0) as u64;
        *out.entry(frames.join(";")).or_default() += n;
    }
    Ok(out.into_iter().collect())
}

/// The GNU build id of an ELF file (hex). The file is mapped, not read:
/// only its headers and notes are touched.
pub fn read_build_id(path: &Path) -> Option<String> {
    use object::Object;
    let file = File::open(path).ok()?;
    // SAFETY: a read-only private mapping of a file we opened; binaries in
    // use are not truncated (a truncated one could fault the read).
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let elf = object::File::parse(&*map).ok()?;
    let id = elf.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::model::RawStack;

    /// A profile as the daemon serves it, gzipped, back to folded stacks:
    /// root (comm) first, inlined functions after their caller.
    #[test]
    fn profiles_read_back_as_folded_stacks() {
        let t = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let f = |id, name| Function {
            id,
            name,
            ..Default::default()
        };
        let line = |function_id| Line {
            function_id,
            line: 0,
        };
        let p = Profile {
            string_table: t(&["", "comm", "app", "main", "f", "inl"]),
            function: vec![f(1, 3), f(2, 4), f(3, 5)],
            location: vec![
                Location {
                    id: 1,
                    line: vec![line(3), line(2)],
                    ..Default::default()
                },
                Location {
                    id: 2,
                    line: vec![line(1)],
                    ..Default::default()
                },
            ],
            sample: vec![Sample {
                location_id: vec![1, 2],
                value: vec![5],
                label: vec![Label {
                    key: 1,
                    str: 2,
                    num: 0,
                }],
            }],
            ..Default::default()
        };
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&p.encode_to_vec()).unwrap();
        let folded = to_folded(&gz.finish().unwrap()).unwrap();
        assert_eq!(folded, vec![("app;main;f;inl".to_string(), 5)]);
        assert!(to_folded(b"not a profile").is_err());
    }

    #[test]
    fn build_id_of_a_system_binary_matches_readelf() {
        // Debian's binaries carry a build id; `file` and `readelf -n` show
        // the same hex.
        let id = read_build_id(Path::new("/bin/ls")).expect("/bin/ls has a build id");
        assert_eq!(id.len(), 40, "{id}");
        let out = std::process::Command::new("readelf")
            .args(["-n", "/bin/ls"])
            .output();
        if let Ok(out) = out {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(&id), "{id} not in {text}");
        }
        assert!(read_build_id(Path::new("/etc/passwd")).is_none());
    }

    #[test]
    fn encodes_locations_functions_and_labels() {
        let mut procs = ProcessTable::new();
        let me = std::process::id();
        procs.observe(me);
        let addr = encodes_locations_functions_and_labels as *const () as u64;
        let s = RawStack {
            tgid: me,
            thread: "t".into(),
            user: Ok(vec![addr, addr + 9]),
            user_cut: None,
            kernel: Err(-libc::EFAULT),
            count: 5,
        };
        let tables = crate::symbolize::symbol_tables([&s], &procs);
        let mut b = Builder::new(Window {
            start_unix_ns: 1,
            duration_ns: 2_000_000_000,
            frequency_hz: 100,
        });
        b.add(&s, &tables, &procs, Some("docker:abc"));
        b.add(&s, &tables, &procs, None);
        let p = b.profile().clone();
        assert_eq!(p.string_table[0], "");
        assert_eq!(p.sample.len(), 2);
        assert_eq!(p.sample[0].value, vec![5, 5 * 10_000_000]);
        // Same addresses, same locations.
        assert_eq!(p.sample[0].location_id, p.sample[1].location_id);
        assert_eq!(p.location.len(), 2);
        let loc = &p.location[0];
        assert_eq!(loc.address, addr);
        let m = &p.mapping[loc.mapping_id as usize - 1];
        assert!(m.memory_start <= addr && addr < m.memory_limit);
        assert_eq!(p.string_table[m.build_id as usize].len(), 40);
        let f = &p.function[loc.line.last().unwrap().function_id as usize - 1];
        assert!(
            p.string_table[f.name as usize].ends_with("encodes_locations_functions_and_labels"),
            "{}",
            p.string_table[f.name as usize]
        );
        let key = |l: &Label| p.string_table[l.key as usize].clone();
        assert!(p.sample[0].label.iter().any(|l| key(l) == "container"));
        assert!(!p.sample[1].label.iter().any(|l| key(l) == "container"));
        assert!(
            p.sample[0]
                .label
                .iter()
                .any(|l| key(l) == "pid" && l.num == me as i64)
        );
        // Round trip through the gzip.
        let gz = b.finish();
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(Profile::decode(&raw[..]).unwrap(), p);
    }
}
