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
