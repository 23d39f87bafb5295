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
    pub fn count_map(&self) -> u32 {
        pow2_clamped(self.samples(1.0), 1024, 1 << 18)
    }

    /// A stack-trace map (`STACKS`, `OFFCPU_STACKS`) keeps every distinct
    /// stack of a capture (of a daemon window), 1 KiB each: 2048 per CPU
    /// between 8 K and 32 K entries, and never more than twice the
    /// samples a capture of known length can take.
    pub fn stack_map(&self) -> u32 {
        let by_cpus = pow2_clamped(u64::from(self.cpus) * 2048, 8192, 32 * 1024);
        match self.duration {
            Some(d) => by_cpus.min(pow2_clamped(
                2 * self.samples(d.as_secs_f64()),
                1024,
                32 * 1024,
            )),
            None => by_cpus,
        }
    }

    /// The off-CPU sums (`OFFCPU_COUNTS`, one key per stack and span of
    /// slices), emptied four times a second: 4096 per CPU between 8 K
    /// and 128 K entries.
    pub fn offcpu_counts(&self) -> u32 {
        pow2_clamped(u64::from(self.cpus) * 4096, 8192, 128 * 1024)
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
        // The biggest EC2 hosts: bounded.
        let big = host(192, 999);
        assert_eq!(big.count_map(), 1 << 18);
        assert_eq!(big.stack_map(), 32 * 1024);
        assert_eq!(big.offcpu_counts(), 128 * 1024);
        assert_eq!(host(192, 99).count_map(), 32 * 1024);
        assert_eq!(host(16, 99).count_map(), 2048);
        assert_eq!(host(1, 1).count_map(), 1024);
    }
}
