//! `profiler diff BEFORE AFTER`: two captures compared, with a verdict a
//! CI job can act on.
//!
//! Each capture is a directory `record` or the daemon wrote (its
//! `stacks.folded`, and `use.json` / `requests.json` when there), a
//! folded file, or a pprof profile the daemon served. Per function (frame name): its self share (samples whose
//! leaf it is) and total share (samples whose stack holds it, once per
//! stack), of each capture's own total. A change is significant when a
//! two-proportion z-test on the sample counts gives a p-value that
//! survives Holm's correction for the number of functions compared
//! (family-wise error 5%), and the share moved by half a point or more;
//! [`stats`] holds the arithmetic. Rules (`--fail-on`) turn changes into
//! an exit code; the differential flame graph is inferno's, normalized.

pub mod rules;
pub mod stats;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
};

use serde::Serialize;

pub use rules::Rule;

/// What `diff` can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// An input that is neither a capture directory nor a folded file.
    #[error(
        "{0}: not a capture directory (with stacks.folded), a folded file or a pprof profile: give two directories `profiler record -o` wrote, two .folded files, or two profiles the daemon served"
    )]
    NotACapture(PathBuf),
    /// An input that could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A folded file with a line that is not `frames COUNT`.
    #[error("{path}:{line}: not a folded stack line (`frame;frame;... COUNT`)")]
    BadLine {
        /// The file.
        path: PathBuf,
        /// Line number, from 1.
        line: usize,
    },
    /// A pprof file that does not decode.
    #[error(
        "{path}: not a pprof profile ({source}): give a profile the daemon served, gzipped or not"
    )]
    Pprof {
        /// The file.
        path: PathBuf,
        /// Why.
        source: crate::pprof::ReadError,
    },
    /// A capture without samples.
    #[error("{0}: no samples: nothing to compare")]
    Empty(PathBuf),
    /// A `--fail-on` rule that does not parse.
    #[error(transparent)]
    Rule(#[from] rules::RuleError),
    /// An output that could not be written.
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    /// The output directory could not be made.
    #[error("cannot make the output directory {path}: {source}; pass another -o DIR")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl DiffError {
    /// Whether the user gave bad input (exit 2).
    pub fn is_usage(&self) -> bool {
        !matches!(self, DiffError::Output(_))
    }
}

/// One capture, as read.
#[derive(Debug, Default)]
pub struct Capture {
    /// Folded stacks and their counts.
    pub stacks: Vec<(String, u64)>,
    /// use.json, when there.
    pub use_json: Option<serde_json::Value>,
    /// requests.json, when there.
    pub requests: Option<serde_json::Value>,
}

impl Capture {
    /// Reads a capture directory or a folded file.
    pub fn read(path: &Path) -> Result<Capture, DiffError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| DiffError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let json = |p: PathBuf| {
            std::fs::read_to_string(&p)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
        };
        let (folded, dir) = if path.is_dir() {
            let f = path.join("stacks.folded");
            if !f.is_file() {
                return Err(DiffError::NotACapture(path.to_path_buf()));
            }
            (f, Some(path))
        } else if path.is_file() {
            (path.to_path_buf(), None)
        } else {
            return Err(DiffError::NotACapture(path.to_path_buf()));
        };
        if let Ok(bytes) = std::fs::read(&folded)
            && (bytes.starts_with(&[0x1f, 0x8b]) || folded.extension().is_some_and(|e| e == "pb"))
        {
            // A pprof profile (the daemon's /debug/pprof/profile).
            let stacks = crate::pprof::to_folded(&bytes).map_err(|source| DiffError::Pprof {
                path: folded.clone(),
                source,
            })?;
            if stacks.iter().all(|(_, n)| *n == 0) {
                return Err(DiffError::Empty(path.to_path_buf()));
            }
            return Ok(Capture {
                stacks,
                ..Default::default()
            });
        }
        let text = read(&folded)?;
        let mut stacks = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed = line
                .rsplit_once(' ')
                .and_then(|(s, n)| Some((s.to_string(), n.trim().parse::<u64>().ok()?)));
            match parsed {
                Some(x) => stacks.push(x),
                None => {
                    return Err(DiffError::BadLine {
                        path: folded,
                        line: i + 1,
                    });
                }
            }
        }
        if stacks.iter().all(|(_, n)| *n == 0) {
            return Err(DiffError::Empty(path.to_path_buf()));
        }
        Ok(Capture {
            stacks,
            use_json: dir.and_then(|d| json(d.join("use.json"))),
            requests: dir.and_then(|d| json(d.join("requests.json"))),
        })
    }

    /// All samples.
    pub fn total(&self) -> u64 {
        self.stacks.iter().map(|(_, n)| n).sum()
    }

    /// Per function: (self samples, total samples).
    pub fn functions(&self) -> HashMap<&str, (u64, u64)> {
        let mut out: HashMap<&str, (u64, u64)> = HashMap::new();
        let mut seen = HashSet::new();
        for (stack, n) in &self.stacks {
            seen.clear();
            let frames: Vec<&str> = stack.split(';').collect();
            for (i, f) in frames.iter().enumerate() {
                let e = out.entry(f).or_default();
                if i + 1 == frames.len() {
                    e.0 += n;
                }
                if seen.insert(*f) {
                    e.1 += n;
                }
            }
        }
        out
    }

    /// Samples whose stack holds a frame containing `name`.
    pub fn holding(&self, name: &str) -> u64 {
        self.stacks
            .iter()
            .filter(|(s, _)| s.split(';').any(|f| f.contains(name)))
            .map(|(_, n)| n)
            .sum()
    }
}

/// One function's change.
#[derive(Clone, Debug, Serialize)]
pub struct Function {
    /// Frame name.
    pub name: String,
    /// Share of samples it is the leaf of, before (0..1).
    pub self_before: f64,
    /// After.
    pub self_after: f64,
    /// Share of samples whose stack holds it, before (0..1).
    pub total_before: f64,
    /// After.
    pub total_after: f64,
    /// Two-sided p-value of the z-test on its total share.
    pub p_value: f64,
    /// Whether the change of its total share survives Holm's correction
    /// and moved by [`stats::MIN_POINTS`] or more.
    pub significant: bool,
}

/// A figure of both captures side by side.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// What it is, with its unit.
    pub name: String,
    /// Before.
    pub before: Option<f64>,
    /// After.
    pub after: Option<f64>,
}

/// A rule that failed, with its figures.
#[derive(Clone, Debug, Serialize)]
pub struct Failed {
    /// The rule as given.
    pub rule: String,
    /// What it is about (a function, a route).
    pub subject: String,
    /// Before (a share, or ms for a p99).
    pub before: f64,
    /// After.
    pub after: f64,
    /// Relative change (0.1: +10%).
    pub change: f64,
    /// Why it counts as a change.
    pub why: String,
}

/// The comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Diff {
    /// Schema tag.
    pub schema: &'static str,
    /// Samples before and after.
    pub samples_before: u64,
    /// After.
    pub samples_after: u64,
    /// How significance is decided.
    pub test: &'static str,
    /// Functions with 10 samples or more in one of the captures, the
    /// significant ones first, by the change of their total share.
    pub functions: Vec<Function>,
    /// USE, off-CPU, loop and route figures side by side.
    pub figures: Vec<Figure>,
    /// The `--fail-on` rules that failed.
    pub failed: Vec<Failed>,
}

/// Samples, at least, in one capture for a function to be compared.
const MIN_SAMPLES: u64 = 10;

/// How [`Diff::test`] reads.
const TEST: &str = "two-proportion z-test per function on its total share (samples whose stack holds it), two-sided; Holm's correction over the functions compared (family-wise error 5%); significant also needs a change of half a point or more";

/// Compares two captures and applies the rules.
pub fn compare(before: &Capture, after: &Capture, rules: &[Rule]) -> Diff {
    let (n1, n2) = (before.total(), after.total());
    let (fb, fa) = (before.functions(), after.functions());
    let names: Vec<&str> = fb
        .keys()
        .chain(fa.keys())
        .copied()
        .collect::<HashSet<_>>()
        .into_iter()
        .filter(|n| {
            fb.get(n).map_or(0, |c| c.1) >= MIN_SAMPLES
                || fa.get(n).map_or(0, |c| c.1) >= MIN_SAMPLES
        })
        .collect();
    let p_values: Vec<f64> = names
        .iter()
        .map(|n| {
            stats::two_proportion_p(
                fb.get(n).map_or(0, |c| c.1),
                n1,
                fa.get(n).map_or(0, |c| c.1),
                n2,
            )
        })
        .collect();
    let holm = stats::holm(&p_values, 0.05);
    let mut functions: Vec<Function> = names
        .iter()
        .zip(p_values.iter().zip(&holm))
        .map(|(n, (p, h))| {
            let (b, a) = (
                fb.get(n).copied().unwrap_or_default(),
                fa.get(n).copied().unwrap_or_default(),
            );
            let share = |x: u64, of: u64| x as f64 / of as f64;
            let (tb, ta) = (share(b.1, n1), share(a.1, n2));
            Function {
                name: n.to_string(),
                self_before: share(b.0, n1),
                self_after: share(a.0, n2),
                total_before: tb,
                total_after: ta,
                p_value: *p,
                significant: *h && (ta - tb).abs() >= stats::MIN_POINTS,
            }
        })
        .collect();
    functions.sort_by(|a, b| {
        b.significant
            .cmp(&a.significant)
            .then(
                (b.total_after - b.total_before)
                    .abs()
                    .total_cmp(&(a.total_after - a.total_before).abs()),
            )
            .then(a.name.cmp(&b.name))
    });
    let figures = figures(before, after);
    let failed = rules
        .iter()
        .flat_map(|r| r.check(before, after, &functions))
        .collect();
    Diff {
        schema: "profiler.diff/1",
        samples_before: n1,
        samples_after: n2,
        test: TEST,
        functions,
        figures,
        failed,
    }
}

/// The figures both captures' use.json and requests.json give.
fn figures(before: &Capture, after: &Capture) -> Vec<Figure> {
    let mut names: BTreeMap<String, (Option<f64>, Option<f64>)> = BTreeMap::new();
    let mut put = |name: String, v: Option<f64>, after_side: bool| {
        let e = names.entry(name).or_default();
        if after_side {
            e.1 = v;
        } else {
            e.0 = v;
        }
    };
    for (c, side) in [(before, false), (after, true)] {
        if let Some(u) = &c.use_json {
            let f = |p: &str| u.pointer(p).and_then(|v| v.as_f64());
            put(
                "CPU busy (%)".into(),
                f("/cpu/utilization").map(|x| 100.0 * x),
                side,
            );
            put(
                "run-queue wait p99 (µs)".into(),
                f("/cpu/runqueue_latency_us/p99"),
                side,
            );
            put(
                "TCP retransmits".into(),
                f("/network/tcp_retransmits"),
                side,
            );
            if let Some(causes) = u.pointer("/offcpu/by_cause_s").and_then(|v| v.as_object()) {
                for (cause, s) in causes {
                    put(format!("off-CPU {cause} (s)"), s.as_f64(), side);
                }
            }
            let turn_p99 = u
                .pointer("/event_loops/loops")
                .and_then(|v| v.as_array())
                .and_then(|l| {
                    l.iter()
                        .filter_map(|x| x.pointer("/turn_ms/p99")?.as_f64())
                        .reduce(f64::max)
                });
            put(
                "event-loop turn p99, worst loop (ms)".into(),
                turn_p99,
                side,
            );
        }
        if let Some(r) = &c.requests {
            for (route, p99, errors) in rules::routes(r) {
                put(format!("{route} p99 (ms)"), Some(p99), side);
                put(format!("{route} errors (%)"), Some(100.0 * errors), side);
            }
        }
    }
    names
        .into_iter()
        // Figures both captures have at 0 (a cause never seen) say nothing.
        .filter(|(_, (b, a))| b.is_some_and(|x| x != 0.0) || a.is_some_and(|x| x != 0.0))
        .map(|(name, (before, after))| Figure {
            name,
            before,
            after,
        })
        .collect()
}

/// `profiler diff`: reads both, compares, prints (words or JSON), writes
/// diff.svg and diff.json; whether a rule failed.
pub fn run(args: &crate::cli::DiffArgs) -> Result<bool, DiffError> {
    let before = Capture::read(&args.before)?;
    let after = Capture::read(&args.after)?;
    let d = compare(&before, &after, &args.fail_on);
    let json = serde_json::to_string_pretty(&d).expect("the diff serializes");
    if args.json {
        println!("{json}");
    } else {
        print!("{}", render(&d));
    }
    std::fs::create_dir_all(&args.output).map_err(|source| DiffError::Dir {
        path: args.output.clone(),
        source,
    })?;
    let svg = args.output.join("diff.svg");
    write_svg(&before, &after, &svg)?;
    let jpath = args.output.join("diff.json");
    crate::output::write_json(&jpath, &d)?;
    let page = crate::report::DiffPage {
        kind: "diff",
        title: format!("{} → {}", args.before.display(), args.after.display()),
        diff: &d,
        rules: !args.fail_on.is_empty(),
        before: crate::report::graph_of(
            before.stacks.iter().map(|(l, n)| (l.as_str(), *n)),
            "samples",
        ),
        after: crate::report::graph_of(
            after.stacks.iter().map(|(l, n)| (l.as_str(), *n)),
            "samples",
        ),
    };
    let hpath = args.output.join("diff.html");
    crate::output::write_atomic(&hpath, |w| crate::report::write_diff_html(&page, w))?;
    eprintln!(
        "profiler: wrote {}, {} and {}",
        hpath.display(),
        svg.display(),
        jpath.display()
    );
    Ok(!d.failed.is_empty())
}

/// The printed report.
pub fn render(d: &Diff) -> String {
    let mut out = format!(
        "diff: {} samples before, {} after; {}\n",
        d.samples_before, d.samples_after, d.test
    );
    let changed: Vec<&Function> = d.functions.iter().filter(|f| f.significant).collect();
    if changed.is_empty() {
        out.push_str("no function's share changed significantly\n");
    } else {
        out.push_str("functions whose share changed (total = in the stack, self = the leaf):\n");
        for f in changed.iter().take(30) {
            out.push_str(&format!(
                "  {:+6.2} points  total {:6.2}% -> {:6.2}%  self {:6.2}% -> {:6.2}%  p={:.1e}  {}\n",
                100.0 * (f.total_after - f.total_before),
                100.0 * f.total_before,
                100.0 * f.total_after,
                100.0 * f.self_before,
                100.0 * f.self_after,
                f.p_value,
                f.name
            ));
        }
    }
    if !d.figures.is_empty() {
        out.push_str("figures (before -> after):\n");
        let v = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
        for f in &d.figures {
            out.push_str(&format!(
                "  {}: {} -> {}\n",
                f.name,
                v(f.before),
                v(f.after)
            ));
        }
    }
    for f in &d.failed {
        out.push_str(&format!(
            "FAILED {}: {} {:.4} -> {:.4} ({:+.1}%): {}\n",
            f.rule,
            f.subject,
            f.before,
            f.after,
            100.0 * f.change,
            f.why
        ));
    }
    out
}

/// Writes the differential flame graph (inferno: each frame coloured by
/// the change of its share, red grown, blue shrunk, both captures
/// normalized to the same total).
pub fn write_svg(before: &Capture, after: &Capture, path: &Path) -> Result<(), DiffError> {
    let to_text = |c: &Capture| {
        c.stacks
            .iter()
            .map(|(s, n)| format!("{s} {n}\n"))
            .collect::<String>()
    };
    let (b, a) = (to_text(before), to_text(after));
    let mut folded = Vec::new();
    let opts = inferno::differential::Options {
        normalize: true,
        ..Default::default()
    };
    inferno::differential::from_readers(opts, b.as_bytes(), a.as_bytes(), &mut folded)
        .expect("writing to memory does not fail");
    let mut fg = inferno::flamegraph::Options::default();
    fg.title = "Differential: red grew, blue shrank (shares normalized)".into();
    fg.count_name = "samples".into();
    crate::output::write_atomic(path, |w| {
        inferno::flamegraph::from_reader(&mut fg, folded.as_slice(), w)
            .map_err(std::io::Error::other)
    })?;
    Ok(())
}
