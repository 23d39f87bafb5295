//! What every signal's loader part uses: finding maps and programs in the
//! loaded object, registering ring buffers with tokio, and facts about the
//! machine (CPUs, kernel stack size, the monotonic clock).

use std::fs;

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
    programs::{TracePoint, trace_point::TracePointLinkId},
};
use profiler_common::{MapDef, ProgDef};
use tokio::io::unix::AsyncFd;

use super::{CaptureError, Setup};

/// A ring buffer of the object, registered for readiness.
pub type Ring = AsyncFd<RingBuf<MapData>>;

/// Takes a map out of the loaded object, typed.
pub fn take_map<T>(ebpf: &mut Ebpf, def: MapDef) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let name = def.name;
    let map = ebpf.take_map(name).ok_or(CaptureError::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

/// Takes a ring buffer out of the loaded object and registers it.
pub fn take_ring(ebpf: &mut Ebpf, def: MapDef) -> Result<Ring, CaptureError> {
    let ring: RingBuf<MapData> = take_map(ebpf, def)?;
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns
    // the RingBuf, and always reports that same fd.
    unsafe { AsyncFd::register(ring) }.map_err(|e| CaptureError::Io(e.into()))
}

/// A program of the loaded object, typed.
pub fn program<'a, T>(ebpf: &'a mut Ebpf, def: ProgDef) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let name = def.name;
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| CaptureError::Program {
            what: format!("find program {name} in the eBPF object"),
            source: aya::programs::ProgramError::NotLoaded,
        })?;
    prog.try_into().map_err(|source| CaptureError::Program {
        what: format!("use program {name}"),
        source,
    })
}

/// Reads every record waiting in a ring as a `T` (records shorter than a
/// `T` are skipped).
pub fn drain_ring<T: Copy>(ring: &mut Ring, mut f: impl FnMut(T)) {
    let rb = ring.get_mut();
    while let Some(item) = rb.next() {
        if item.len() >= std::mem::size_of::<T>() {
            // SAFETY: the kernel wrote a T (plain integers) at the start of
            // the record; read_unaligned copes with any alignment.
            let v: T = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            f(v);
        }
    }
}

/// Links taken off their programs at the end, closed all at once: closing
/// the last perf event of a tracepoint (or a raw tracepoint's link) waits
/// for an RCU grace period, some 20-100 ms each; one after another the
/// forty of a capture took seconds, while waits made at the same time
/// share their grace periods.
#[derive(Default)]
pub struct Closing(Vec<Box<dyn Send>>);

impl Closing {
    /// Keeps `link` to close in [`Closing::finish`].
    pub fn add(&mut self, link: impl Send + 'static) {
        self.0.push(Box::new(link));
    }

    /// Leaves the waits to a helper process, so that ours can exit at
    /// once: a forked child holds copies of every descriptor, stdio on
    /// /dev/null, until our end of a pipe closes (when we exit); the
    /// closing of our copies then only drops a reference, and the
    /// kernel's waits happen as the helper exits, unwaited for. The
    /// programs stay attached for that second or so. Where no helper can
    /// be made, [`Closing::finish`] here.
    pub fn hand_off(self) {
        if self.0.is_empty() {
            return;
        }
        let mut pipe = [0i32; 2];
        // SAFETY: a two-int array for the descriptors.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return self.finish();
        }
        // SAFETY: a NUL-terminated path.
        let devnull = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        // SAFETY: the child calls only async-signal-safe functions
        // (close, dup2, setsid, read, _exit) before it ends: no lock or
        // allocation another thread may have held at the fork.
        match unsafe { libc::fork() } {
            0 => unsafe {
                libc::close(pipe[1]);
                if devnull >= 0 {
                    for fd in 0..3 {
                        libc::dup2(devnull, fd);
                    }
                }
                // Out of the terminal's process group: a second Ctrl-C
                // is not for it.
                libc::setsid();
                let mut byte = 0u8;
                while libc::read(pipe[0], std::ptr::addr_of_mut!(byte).cast(), 1) < 0 {}
                libc::_exit(0);
            },
            -1 => {
                // SAFETY: descriptors this function opened.
                unsafe {
                    libc::close(pipe[0]);
                    libc::close(pipe[1]);
                    if devnull >= 0 {
                        libc::close(devnull);
                    }
                }
                self.finish();
            }
            _ => {
                // SAFETY: as above. The write end stays open until we
                // exit: then the helper reads the end of the pipe.
                unsafe {
                    libc::close(pipe[0]);
                    if devnull >= 0 {
                        libc::close(devnull);
                    }
                }
                // The helper holds them too: only references drop here.
                drop(self.0);
            }
        }
    }

    /// Closes every link, each on a thread of its own, and waits for
    /// them all.
    pub fn finish(self) {
        let mut threads = Vec::new();
        for link in self.0 {
            // Where no thread can be made, closed here.
            let (tx, rx) = std::sync::mpsc::channel::<Box<dyn Send>>();
            match std::thread::Builder::new()
                .name("profiler-close".into())
                .stack_size(64 * 1024)
                .spawn(move || drop(rx.recv()))
            {
                Ok(t) => {
                    let _ = tx.send(link);
                    threads.push(t);
                }
                Err(_) => drop(link),
            }
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Tracepoint programs attached by a signal, to detach at the end.
#[derive(Default)]
pub struct Tracepoints(Vec<(ProgDef, TracePointLinkId)>);

impl Tracepoints {
    /// Loads `prog` and attaches it to each of `points` (category, name).
    /// When the kernel refuses, `signal` is marked unavailable with its
    /// answer and false is returned; a point in `optional` that is
    /// missing only loses what it adds.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        setup: &mut Setup<'_>,
        signal: &'static str,
        def: ProgDef,
        points: &[(&str, &str)],
        optional: &[&str],
    ) -> Result<bool, CaptureError> {
        let prog: &mut TracePoint = program(ebpf, def)?;
        let t = std::time::Instant::now();
        let loaded = prog.load();
        setup.verifying += t.elapsed();
        if let Err(e) = loaded {
            setup.unavailable(
                signal,
                format!("the kernel refused program {}: {e}", def.name),
            );
            return Ok(false);
        }
        let mut all = true;
        for (category, name) in points {
            match prog.attach(category, name) {
                Ok(link) => self.0.push((def, link)),
                Err(_) if optional.contains(name) => {}
                Err(e) => {
                    setup.unavailable(
                        signal,
                        format!("cannot attach to tracepoint {category}:{name}: {e}"),
                    );
                    all = false;
                }
            }
        }
        Ok(all)
    }

    /// Takes their links off the programs into `closing`; returns what
    /// failed.
    pub fn detach(&mut self, ebpf: &mut Ebpf, closing: &mut Closing) -> Vec<CaptureError> {
        let mut errors = Vec::new();
        for (def, link) in self.0.drain(..) {
            let result = program::<TracePoint>(ebpf, def).and_then(|prog| {
                prog.take_link(link)
                    .map_err(|source| CaptureError::Program {
                        what: format!("detach program {}", def.name),
                        source,
                    })
            });
            match result {
                Ok(link) => closing.add(link),
                Err(e) => errors.push(e),
            }
        }
        errors
    }
}

/// Parses a CPU list such as `0-3,5,7-8` (`/sys/devices/system/cpu/online`).
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// Online CPUs.
pub fn online_cpus() -> Result<Vec<u32>, CaptureError> {
    let text = fs::read_to_string("/sys/devices/system/cpu/online")
        .map_err(|e| CaptureError::Cpus(e.to_string()))?;
    parse_cpu_list(&text).ok_or_else(|| CaptureError::Cpus(format!("unparsable {text:?}")))
}

/// Possible CPUs (the ids a CPU can have), for per-CPU slots.
pub fn possible_cpus() -> u32 {
    fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|t| parse_cpu_list(&t))
        .and_then(|c| c.into_iter().max())
        .map_or(1024, |m| m + 1)
}

/// The kernel stack size (THREAD_SIZE): 16 KiB on x86_64, 32 KiB with
/// KASAN (read from the kernel's config where it is on disk).
pub fn thread_size() -> u32 {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let config = fs::read_to_string(format!("/boot/config-{}", release.trim())).unwrap_or_default();
    if config.lines().any(|l| l == "CONFIG_KASAN=y") {
        32768
    } else {
        16384
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A per-CPU array slot's values (empty when it cannot be read).
pub fn per_cpu(map: &aya::maps::PerCpuArray<MapData, u64>, idx: u32) -> Vec<u64> {
    map.get(&idx, 0)
        .map(|v| v.iter().copied().collect())
        .unwrap_or_default()
}

/// `cur - prev` per CPU, remembering `cur`.
pub fn delta(prev: &mut Vec<u64>, cur: Vec<u64>) -> Vec<u64> {
    let d = cur
        .iter()
        .enumerate()
        .map(|(i, v)| v.saturating_sub(prev.get(i).copied().unwrap_or(0)))
        .collect();
    *prev = cur;
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,5,7-8\n"),
            Some(vec![0, 1, 2, 3, 5, 7, 8])
        );
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn deltas_per_cpu() {
        let mut prev = Vec::new();
        assert_eq!(delta(&mut prev, vec![3, 4]), vec![3, 4]);
        assert_eq!(delta(&mut prev, vec![5, 4, 1]), vec![2, 0, 1]);
    }
}

/// Takes a per-CPU hash map of `u64` values out of the loaded object,
/// untyped, for [`drain_sums`].
pub fn take_percpu_hash(ebpf: &mut Ebpf, def: MapDef) -> Result<MapData, CaptureError> {
    let name = def.name;
    match ebpf.take_map(name) {
        Some(aya::maps::Map::PerCpuHashMap(data)) => Ok(data),
        _ => Err(CaptureError::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        }),
    }
}

/// Takes a per-CPU array map untyped, for [`batch_read`].
pub fn take_percpu_array(ebpf: &mut Ebpf, def: MapDef) -> Result<MapData, CaptureError> {
    let name = def.name;
    match ebpf.take_map(name) {
        Some(aya::maps::Map::PerCpuArray(data)) => Ok(data),
        _ => Err(CaptureError::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        }),
    }
}

/// `BPF_MAP_LOOKUP_BATCH` (Linux 5.6).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_LOOKUP_AND_DELETE_BATCH` (Linux 5.6).
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Moves every entry of a per-CPU hash map of `u64` counts out of the
/// kernel, handing each key with its count summed over CPUs to `f`: a
/// few system calls for the whole map (`BPF_MAP_LOOKUP_AND_DELETE_BATCH`,
/// which takes each bucket under its lock: a sample counted meanwhile
/// lands either in what is returned or in a fresh entry, never lost).
/// Returns how many entries were moved.
pub fn drain_sums<K: aya::Pod + Copy>(
    map: &MapData,
    ncpus: usize,
    mut f: impl FnMut(K, u64),
) -> Result<usize, std::io::Error> {
    batch_read(map, ncpus, true, |k: K, v: &[u64]| f(k, v.iter().sum()))
}

/// Reads every entry of a per-CPU hash map, `f` getting each key and its
/// values (one per possible CPU), and deletes them with `delete`: a few
/// system calls for the whole map (`BPF_MAP_LOOKUP_BATCH` or
/// `BPF_MAP_LOOKUP_AND_DELETE_BATCH`, Linux 5.6), or lookups (and
/// deletes) one key at a time on a kernel without batch operations.
/// Returns how many entries were read.
pub fn batch_read<K: aya::Pod + Copy, V: aya::Pod + Copy + Default>(
    map: &MapData,
    ncpus: usize,
    delete: bool,
    mut f: impl FnMut(K, &[V]),
) -> Result<usize, std::io::Error> {
    use std::os::fd::{AsFd, AsRawFd};
    const BATCH: usize = 1024;
    // The kernel lays per-CPU values out 8-byte aligned.
    assert!(std::mem::size_of::<V>().is_multiple_of(8));
    let fd = map.fd().as_fd().as_raw_fd();
    let ksize = std::mem::size_of::<K>();
    let mut keys = vec![0u8; BATCH * ksize];
    let mut values = vec![V::default(); BATCH * ncpus];
    let mut token = 0u64;
    let mut first = true;
    let mut read = 0;
    let cmd = if delete {
        BPF_MAP_LOOKUP_AND_DELETE_BATCH
    } else {
        BPF_MAP_LOOKUP_BATCH
    };
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::addr_of!(token) as u64
            },
            out_batch: std::ptr::addr_of_mut!(token) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: the attribute points at buffers of `count` keys and
        // `count` per-CPU values (one V per possible CPU) that outlive the
        // call, and at `token` (a hash map's batch token is a u32).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::addr_of_mut!(attr),
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let n = attr.count as usize;
        for i in 0..n.min(BATCH) {
            // SAFETY: the kernel wrote `n` keys of `ksize` bytes; K is Pod.
            let key: K = unsafe { std::ptr::read_unaligned(keys[i * ksize..].as_ptr().cast()) };
            f(key, &values[i * ncpus..(i + 1) * ncpus]);
        }
        read += n;
        first = false;
        match err {
            None => {}
            // The end of the map.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(read),
            Some(e) if read == 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                return read_one_by_one(map, ncpus, delete, f);
            }
            Some(e) => return Err(e),
        }
    }
}

/// [`batch_read`] without batch operations (kernels before 5.6).
fn read_one_by_one<K: aya::Pod + Copy, V: aya::Pod + Copy + Default>(
    map: &MapData,
    ncpus: usize,
    delete: bool,
    mut f: impl FnMut(K, &[V]),
) -> Result<usize, std::io::Error> {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = map.fd().as_fd().as_raw_fd();
    let mut keys: Vec<K> = Vec::new();
    let mut prev: Option<K> = None;
    loop {
        // SAFETY: zeroed bytes are a valid Pod.
        let mut next: K = unsafe { std::mem::zeroed() };
        let mut attr = [0u64; 4];
        attr[0] = fd as u64;
        attr[1] = prev.as_ref().map_or(0, |k| k as *const K as u64);
        attr[2] = std::ptr::addr_of_mut!(next) as u64;
        // SAFETY: BPF_MAP_GET_NEXT_KEY (4) with a key buffer of the map's
        // key size; the attribute's first three fields.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, 4, attr.as_mut_ptr(), 32usize) };
        if rc < 0 {
            break;
        }
        keys.push(next);
        prev = Some(next);
    }
    let mut values = vec![V::default(); ncpus];
    let mut read = 0;
    for key in keys {
        let mut attr = [0u64; 4];
        attr[0] = fd as u64;
        attr[1] = std::ptr::addr_of!(key) as u64;
        attr[2] = values.as_mut_ptr() as u64;
        // SAFETY: BPF_MAP_LOOKUP_ELEM (1) into a buffer of one V per
        // possible CPU, then BPF_MAP_DELETE_ELEM (3) of the same key.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, 1, attr.as_mut_ptr(), 32usize) };
        if rc < 0 {
            continue;
        }
        if delete {
            // SAFETY: as above.
            unsafe { libc::syscall(libc::SYS_bpf, 3, attr.as_mut_ptr(), 32usize) };
        }
        f(key, &values);
        read += 1;
    }
    Ok(read)
}
