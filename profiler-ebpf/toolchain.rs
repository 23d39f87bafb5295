// The toolchain the kernel programs are built with, pinned in this one
// place: a newer nightly brings a newer LLVM, which bpf-linker (built for
// one LLVM) and the verifier may not accept. Included by profiler/build.rs
// and by xtask. To move the pin, see README.md ("Moving the eBPF
// toolchain pin").

/// The dated nightly (rustup's name).
pub const EBPF_NIGHTLY: &str = "nightly-2026-05-20";
/// Its rustc's commit (`rustc +nightly -vV`): an installed `nightly` that
/// is this very build is linked under [`EBPF_LINKED`] instead of
/// downloading the same compiler again.
pub const EBPF_NIGHTLY_COMMIT: &str = "e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a";
/// The name such a linked toolchain gets (rustup refuses `nightly-*`
/// names for links).
pub const EBPF_LINKED: &str = "profiler-ebpf-2026-05-20";
/// bpf-linker's version, built against that nightly's own LLVM.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
