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

/// (alpha, beta, gamma;delta) shares of a capture of the known workload.
fn shares(out_dir: &std::path::Path, process: &str) -> (f64, f64, f64, u64) {
    let folded = read_folded(out_dir);
    let total = samples_where(&folded, process, |_| true);
    let under_main =
        |name: &'static str| move |f: &[&str]| f.contains(&"main") && f.contains(&name);
    let alpha = pct(
        samples_where(&folded, process, under_main("work_alpha")),
        total,
    );
    let beta = pct(
        samples_where(&folded, process, under_main("work_beta")),
        total,
    );
    let delta = pct(
        samples_where(&folded, process, |f| {
            f.contains(&"main") && f.windows(2).any(|w| w == ["work_gamma", "work_delta"])
        }),
        total,
    );
    (alpha, beta, delta, total)
}

fn capture(name: &str, flags: &[&str], extra: &[&str]) -> (f64, f64, f64, u64) {
    let dir = scratch(&format!("unwind-{name}"));
    let exe = build_c("known.c", &dir.join(name), flags);
    let out = dir.join("out");
    let mut args = vec!["-F", "999", "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", exe.to_str().unwrap(), "3"]);
    record_ok(&dir, &args);
    shares(&out, name)
}

fn assert_right(what: &str, (a, b, d, total): (f64, f64, f64, u64)) {
    eprintln!("{what}: alpha {a:.1}% beta {b:.1}% gamma;delta {d:.1}% of {total}");
    assert!(total > 2000, "{what}: only {total} samples");
    for (name, got, want) in [
        ("work_alpha", a, 50.0),
        ("work_beta", b, 30.0),
        ("work_gamma;work_delta", d, 20.0),
    ] {
        assert!(
            (got - want).abs() <= 3.0,
            "{what}: {name} {got:.1}%, expected {want} ± 3"
        );
    }
}

#[test]
fn framed_leaves_are_right_by_default() {
    if !require_root("framed_leaves_are_right_by_default") {
        return;
    }
    assert_right("framed leaves, auto", capture("framed", FRAMED, &[]));
}

#[test]
fn shrink_wrapped_leaves_are_right_with_cfi() {
    if !require_root("shrink_wrapped_leaves_are_right_with_cfi") {
        return;
    }
    assert_right(
        "Debian frame pointers, dwarf",
        capture("debfp", DEBIAN_FP, &["--unwind", "dwarf"]),
    );
    assert_right(
        "Debian frame pointers, auto",
        capture("debfp", DEBIAN_FP, &[]),
    );
    // Frame pointers alone lose the caller of a frameless leaf: the build
    // is a real test only if that happens.
    let (a, b, d, _) = capture("debfp", DEBIAN_FP, &["--unwind", "fp"]);
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
    assert_right("no frame pointers, auto", capture("nofp", NO_FP, &[]));
    let (a, b, d, _) = capture("nofp", NO_FP, &["--unwind", "fp"]);
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
