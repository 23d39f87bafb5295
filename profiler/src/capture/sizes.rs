//! Kernel map sizes from the host at start: its CPUs, the sampling rate
//! and, for a capture of known length, its duration. Fixed sizes either
//! cost a small host memory and start time it never uses (creating a
//! preallocated map is most of an idle capture's system time) or fill on
//! a big one; the README's cost model gives these figures per host size.

use std::time::Duration;

/// What the sizes depend on.
#[derive(Clone, Copy, Debug)]
pub struct Host {
    /// Online CPUs.
    pub cpus: u32,
    /// Samples per second per CPU.
    pub hz: u64,
    /// The capture's length when known (`record -d`).
    pub duration: Option<Duration>,
    /// Threads on the host at start ([`threads_now`]).
    pub threads: u32,
}

/// Threads on the host now: the total of /proc/loadavg's
/// "running/total" field (8192 when it cannot be read).
pub fn threads_now() -> u32 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().nth(3)?.split_once('/')?.1.parse().ok())
        .unwrap_or(8192)
}

/// Most memory one per-CPU map may take: its values are one per possible
/// CPU, so its size grows with the square of the host (entries follow
/// the CPUs too).
const PER_CPU_MAP_BYTES: u64 = 64 << 20;

/// Bytes of a hash map element besides its key and value (the kernel's
/// `htab_elem`, rounded up).
const ELEM_OVERHEAD: u64 = 48;

/// Bytes of a stack-trace map entry: 127 addresses and a header.
const STACK_ENTRY: u64 = 127 * 8 + 24;

/// The largest power of two of entries of a per-CPU map whose `key`
/// and `value` bytes fit [`PER_CPU_MAP_BYTES`] on `cpus` CPUs.
fn per_cpu_cap(cpus: u32, key: u64, value: u64) -> u32 {
    let per_entry = key + ELEM_OVERHEAD + value * u64::from(cpus);
    let n = (PER_CPU_MAP_BYTES / per_entry).max(1);
    (1u64 << (63 - n.leading_zeros())) as u32
}

fn pow2_clamped(want: u64, min: u32, max: u32) -> u32 {
    want.clamp(u64::from(min), u64::from(max))
        .next_power_of_two()
        .min(u64::from(max)) as u32
}

impl Host {
    /// Samples the whole host takes in `secs` seconds.
    fn samples(&self, secs: f64) -> u64 {
        (self.hz as f64 * f64::from(self.cpus) * secs).ceil() as u64
    }

    /// The count map (`COUNTS`, one key per stack and 10 ms slice) is
    /// emptied four times a second: one second of samples, every one a
    /// distinct key, leaves room for three late ticks.
    /// Per-CPU values: at most [`PER_CPU_MAP_BYTES`], which on a very
    /// big host at a high rate holds less than a second (the README's
    /// cost model).
    pub fn count_map(&self) -> u32 {
        let cap = per_cpu_cap(self.cpus, 32, 8).min(1 << 18);
        pow2_clamped(self.samples(1.0), 1024.min(cap), cap)
    }

    /// A stack-trace map (`STACKS`) keeps every distinct stack of a
    /// capture (of a daemon window), 1 KiB each: 2048 per CPU between 8 K
    /// and 32 K entries, and never more than twice the samples a capture
    /// of known length can take.
    pub fn stack_map(&self) -> u32 {
        self.stack_map_of(8192, 1024, |secs| 2 * self.samples(secs))
    }

    /// A stack-trace map of 2048 entries per CPU between `least` and 32 K,
    /// and for a capture of known length no more than `wanted(seconds)`
    /// (at least `least_short`).
    fn stack_map_of(&self, least: u32, least_short: u32, wanted: impl Fn(f64) -> u64) -> u32 {
        let by_cpus = pow2_clamped(u64::from(self.cpus) * 2048, least, 32 * 1024);
        match self.duration {
            Some(d) => by_cpus.min(pow2_clamped(
                wanted(d.as_secs_f64()),
                least_short,
                32 * 1024,
            )),
            None => by_cpus,
        }
    }

    /// The off-CPU stacks (`OFFCPU_STACKS`): 2048 per CPU between 16 K
    /// and 32 K entries (bcc's offcputime keeps 16 K), and 4 K a second
    /// for a capture of known length. Its stacks come from switches, not
    /// samples, so the samples a capture can take do not bound them, and
    /// a stack-trace map holds one stack a bucket: a stack whose bucket
    /// is taken is lost. Express under autocannon for 5 s walks about
    /// 1,650 user stacks (preemptions anywhere in its code), and lost
    /// 6.5% of them to taken buckets with 8 K entries, 2-3.4% with 16 K.
    pub fn offcpu_stack_map(&self) -> u32 {
        self.stack_map_of(16384, 4096, |secs| (4096.0 * secs).ceil() as u64)
    }

    /// The off-CPU sums (`OFFCPU_COUNTS`, one key per stack and span of
    /// slices), emptied four times a second: 4096 per CPU between 8 K
    /// and 128 K entries.
    pub fn offcpu_counts(&self) -> u32 {
        let cap = per_cpu_cap(self.cpus, 44, 16).min(128 * 1024);
        pow2_clamped(u64::from(self.cpus) * 4096, 8192.min(cap), cap)
    }

    /// Maps keyed by thread or process (`OFFCPU_START`: threads off the
    /// CPU now, `RUNQ_START`: threads woken since the start, until they
    /// exit, `SEEN`: processes
    /// announced to userspace): four times the host's
    /// threads at start, between 8 K and 256 K entries (a full one counts
    /// what it could not time).
    pub fn thread_map(&self) -> u32 {
        pow2_clamped(u64::from(self.threads) * 4, 8192, 256 * 1024)
    }

    /// The socket owners (`SOCK_OWNERS`, an LRU that forgets the oldest):
    /// 8 K entries a CPU between 16 K and 256 K.
    pub fn socket_owners(&self) -> u32 {
        pow2_clamped(u64::from(self.cpus) * 8192, 16 * 1024, 256 * 1024)
    }

    /// Kernel memory of the maps that follow the host, bytes: the count
    /// map, the two stack-trace maps, the off-CPU sums, and the ring of
    /// stack copies (`ring`: its bytes, from the rate and CPUs).
    pub fn maps_bytes(&self, ring: u64) -> u64 {
        let cpus = u64::from(self.cpus);
        u64::from(self.count_map()) * (32 + ELEM_OVERHEAD + 8 * cpus)
            + u64::from(self.stack_map() + self.offcpu_stack_map()) * STACK_ENTRY
            + u64::from(self.offcpu_counts()) * (44 + ELEM_OVERHEAD + 16 * cpus)
            + ring
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(cpus: u32, hz: u64) -> Host {
        Host {
            cpus,
            hz,
            duration: None,
            threads: 500,
        }
    }

    #[test]
    fn sizes_follow_the_host() {
        // This VM: 2 CPUs at 999 Hz.
        let vm = host(2, 999);
        assert_eq!(vm.count_map(), 2048);
        assert_eq!(vm.stack_map(), 8192);
        assert_eq!(vm.offcpu_counts(), 8192);
        // A second at 999 Hz on 2 CPUs takes 1998 samples: twice that.
        let short = Host {
            duration: Some(Duration::from_secs(1)),
            ..vm
        };
        assert_eq!(short.stack_map(), 4096);
        assert_eq!(short.offcpu_stack_map(), 4096);
        assert_eq!(vm.offcpu_stack_map(), 16384);
        // The biggest EC2 hosts: bounded.
        // The biggest EC2 hosts: per-CPU maps bounded by memory.
        let big = host(192, 999);
        assert_eq!(big.count_map(), 32 * 1024);
        assert_eq!(big.stack_map(), 32 * 1024);
        assert_eq!(big.offcpu_counts(), 16 * 1024);
        assert_eq!(host(192, 99).count_map(), 32 * 1024);
        assert_eq!(host(64, 999).count_map(), 64 * 1024);
        assert_eq!(host(16, 99).count_map(), 2048);
        assert_eq!(host(1, 1).count_map(), 1024);
        assert_eq!(vm.thread_map(), 8192);
        assert_eq!(
            Host {
                threads: 10_000,
                ..vm
            }
            .thread_map(),
            64 * 1024
        );
        assert_eq!(vm.socket_owners(), 16 * 1024);
        assert_eq!(big.socket_owners(), 256 * 1024);
        assert!(threads_now() > 1);
    }

    /// The README's table of map sizes per host is this code's (run with
    /// `--nocapture` to print it after a change).
    #[test]
    fn the_readme_table_is_this_code() {
        let mut table = String::from(
            "| vCPUs | Hz | count map | stack map | off-CPU stacks | off-CPU sums | stack ring | kernel memory |\n|---|---|---|---|---|---|---|---|\n",
        );
        for cpus in [2u32, 16, 64, 192] {
            for hz in [99u64, 999] {
                let h = host(cpus, hz);
                let ring = u64::from(super::super::stacks::ring_bytes_for(hz, cpus as usize));
                table.push_str(&format!(
                    "| {cpus} | {hz} | {} | {} | {} | {} | {} MiB | {} MiB |\n",
                    h.count_map(),
                    h.stack_map(),
                    h.offcpu_stack_map(),
                    h.offcpu_counts(),
                    ring >> 20,
                    h.maps_bytes(ring) >> 20,
                ));
            }
        }
        println!("{table}");
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md");
        assert!(
            readme.contains(&table),
            "README.md's cost model should hold this table:\n{table}"
        );
    }
}
