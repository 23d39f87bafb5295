//! End-to-end: correct user stacks without frame pointers. The known
//! workload built three ways must give the same shares under the default
//! unwinding (CFI in userspace, frame pointers where no CFI covers); frame
//! pointers alone must be seen to fail where leaves or all functions lack
//! frames, so the builds really test something.

use tests::*;

const FRAMED: &[&str] = &[
    "-O2",
    "-g",
    "-fno-omit-frame-pointer",
    "-mno-omit-leaf-frame-pointer",
];
/// Debian's gcc default with frame pointers asked for: leaves that need no
/// stack are shrink-wrapped, without a frame.
const DEBIAN_FP: &[&str] = &["-O2", "-g", "-fno-omit-frame-pointer", "-DUNFRAMED_LEAVES"];
const NO_FP: &[&str] = &["-O2", "-g", "-fomit-frame-pointer"];

fn capture(name: &str, flags: &[&str], extra: &[&str]) -> KnownShares {
    let dir = scratch(&format!("unwind-{name}"));
    let exe = build_c("known.c", &dir.join(name), flags);
    let out = dir.join("out");
    let mut args = vec!["-F", "999", "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", exe.to_str().unwrap(), "3"]);
    record_ok(&dir, &args);
    known_shares(&out, name)
}

#[test]
fn framed_leaves_are_right_by_default() {
    if !require_root("framed_leaves_are_right_by_default") {
        return;
    }
    assert_known_shares("framed leaves, auto", &capture("framed", FRAMED, &[]), 2000);
}

#[test]
fn shrink_wrapped_leaves_are_right_with_cfi() {
    if !require_root("shrink_wrapped_leaves_are_right_with_cfi") {
        return;
    }
    let dwarf = capture("debfp", DEBIAN_FP, &["--unwind", "dwarf"]);
    assert_known_shares("Debian frame pointers, dwarf", &dwarf, 2000);
    let auto = capture("debfp", DEBIAN_FP, &[]);
    assert_known_shares("Debian frame pointers, auto", &auto, 2000);
    // Frame pointers alone lose the caller of a frameless leaf: the build
    // is a real test only if that happens.
    let KnownShares {
        alpha: a,
        beta: b,
        delta: d,
        ..
    } = capture("debfp", DEBIAN_FP, &["--unwind", "fp"]);
    eprintln!("Debian frame pointers, fp: alpha {a:.1}% beta {b:.1}% gamma;delta {d:.1}%");
    assert!(
        (a - 50.0).abs() > 5.0 || (b - 30.0).abs() > 5.0 || (d - 20.0).abs() > 5.0,
        "frame pointers alone got the shrink-wrapped build right: the test build no longer tests CFI"
    );
}

#[test]
fn no_frame_pointers_are_right_with_cfi() {
    if !require_root("no_frame_pointers_are_right_with_cfi") {
        return;
    }
    assert_known_shares(
        "no frame pointers, auto",
        &capture("nofp", NO_FP, &[]),
        2000,
    );
    let KnownShares {
        alpha: a,
        beta: b,
        delta: d,
        ..
    } = capture("nofp", NO_FP, &["--unwind", "fp"]);
    eprintln!("no frame pointers, fp: alpha {a:.1}% beta {b:.1}% gamma;delta {d:.1}%");
    assert!(
        a + b + d < 50.0,
        "frame pointers alone unwound a build without them"
    );
}

/// A stripped binary (CFI kept, symbols gone): stacks still unwind, and
/// its frames say where they are (`file+0xoffset`), never a bare address.
#[test]
fn stripped_binary_frames_say_where_they_are() {
    if !require_root("stripped_binary_frames_say_where_they_are") {
        return;
    }
    let dir = scratch("unwind-stripped");
    let exe = build_c(
        "known.c",
        &dir.join("stripped"),
        &["-O2", "-fomit-frame-pointer", "-s"],
    );
    let out = dir.join("out");
    record_ok(
        &dir,
        &[
            "-F",
            "499",
            "-o",
            out.to_str().unwrap(),
            "--",
            exe.to_str().unwrap(),
            "2",
        ],
    );
    let folded = read_folded(&out);
    let total = samples_where(&folded, "stripped", |_| true);
    let located = samples_where(&folded, "stripped", |f| {
        f.iter().any(|fr| {
            fr.strip_prefix("stripped+0x")
                .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
        })
    });
    assert!(total > 500, "{total} samples");
    assert!(
        pct(located, total) > 90.0,
        "{located} of {total} samples show stripped+0x…:\n{folded:#?}"
    );
    // Unwound through libc's CFI to the start: the outermost frames are named.
    assert!(
        folded
            .keys()
            .any(|l| l.contains("__libc_start_call_main;stripped+0x")),
        "{folded:#?}"
    );
    assert!(
        !folded
            .keys()
            .any(|l| l.split(';').any(|f| f.starts_with("0x"))),
        "bare addresses in {folded:#?}"
    );
}

/// A main thread's stack copy stops at its first frame: the arguments,
/// environment and auxiliary vector above it (here a 48 KB variable, as
/// in a pod with many service variables) are not copied with each
/// sample. Node.js's main thread, whose copies read up to the stack's
/// top before (6 KB of environment and vectors with a small
/// environment), runs a JS loop; its stacks still reach `_start`.
#[test]
fn main_thread_copies_leave_the_environment_out() {
    if !require_root("main_thread_copies_leave_the_environment_out") {
        return;
    }
    let dir = scratch("unwind-environ");
    let out = dir.join("out");
    let big = format!("BIG={}", "x".repeat(48 * 1024));
    let run = record_ok(
        &dir,
        &[
            "-v",
            "-F",
            "999",
            "-o",
            out.to_str().unwrap(),
            "--",
            "env",
            &big,
            "node",
            "-e",
            "const end = Date.now() + 2000; let x = 0; while (Date.now() < end) { x += Math.sqrt(x + 1); }",
        ],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    let per_sample: u64 = stderr
        .lines()
        .find_map(|l| {
            let (head, _) = l.split_once(" bytes of stack per sample")?;
            head.rsplit(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no bytes per sample in:\n{stderr}"));
    assert!(
        per_sample < 16 * 1024,
        "{per_sample} bytes of stack copied per sample: the environment was copied\n{stderr}"
    );
    let folded = read_folded(&out);
    let node: u64 = folded
        .iter()
        .filter(|(l, _)| l.starts_with("node;"))
        .map(|(_, n)| n)
        .sum();
    let whole: u64 = folded
        .iter()
        .filter(|(l, _)| l.starts_with("node;_start;"))
        .map(|(_, n)| n)
        .sum();
    assert!(node > 1000, "too few node samples: {node}\n{stderr}");
    assert!(
        pct(whole, node) > 95.0,
        "{whole} of {node} node samples reach _start\n{stderr}"
    );
}
