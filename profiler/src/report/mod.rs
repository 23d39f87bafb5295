//! `report.html`: one self-contained page for a capture (the USE table
//! and findings in words, a FlameScope-style heat map of the samples over
//! time whose selection folds the flame graph below to that range, the
//! off-CPU and stall flame graphs, plots of the distributions and of the
//! per-second series, the symbolization report), and `timeline.json`,
//! the timed stacks it draws from. Nothing is fetched: the page's script
//! and style are inlined (`page.html`), the data is a JSON block in it.

use std::{
    collections::HashMap,
    io::{self, Write as _},
};

use serde::Serialize;

use profiler_common::stacks::TIME_SLICE_NS;

use crate::{
    fold::{self, Folded},
    model::{RawProfile, Second, SymbolizedStack},
    requests::RequestsReport,
    symreport::SymbolReport,
    usereport::{self, UseReport},
};

/// The page, with `/*DATA*/` where the data goes.
const PAGE: &str = include_str!("page.html");

/// Stacks with their times: any range of the capture folds on its own.
#[derive(Debug, Default, Serialize)]
pub struct Timeline {
    /// Schema tag.
    pub schema: &'static str,
    /// Width of a time slice, in ms.
    pub slice_ms: f64,
    /// Frame names (interned).
    pub frames: Vec<String>,
    /// Each distinct folded stack, root first, as indexes in `frames`.
    pub stacks: Vec<Vec<u32>>,
    /// Flat triples `slice, stack, samples`, in slice order: `samples`
    /// samples of `stacks[stack]` in `[slice, slice + 1) * slice_ms` from
    /// the start.
    pub samples: Vec<u32>,
    /// HTTP routes: `METHOD route [pid]`.
    pub routes: Vec<String>,
    /// HTTP requests, flat quadruples `ms, route, duration_us, status`:
    /// answered `ms` milliseconds from the start, `routes[route]`.
    pub requests: Vec<u32>,
    /// Off-CPU time with its times, when recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offcpu: Option<TimedGraph>,
    /// Time inside event-loop stalls with its times, when timed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalls: Option<TimedGraph>,
}

/// A flame graph of time (µs) with the intervals it was spent in:
/// off-CPU time (offcpu.folded) or time inside stalls (stalls.folded).
#[derive(Debug, Default, Serialize)]
pub struct TimedGraph {
    /// Frames, stacks and their µs over the capture: `stacks[..graphed]`
    /// are the folded file's lines; for off-CPU time those after are
    /// the blocks shorter than `--off-cpu-min`, one stack per cause (its
    /// frame alone), in no flame graph.
    #[serde(flatten)]
    pub graph: Graph,
    /// How many of the stacks are in the flame graph.
    pub graphed: usize,
    /// Flat quadruples `first, last, stack, us`: `us` microseconds of
    /// `stacks[stack]`, spread over slices `first..=last` (slices as
    /// `Timeline::samples`).
    pub spans: Vec<u32>,
}

/// Builds a [`TimedGraph`], one distinct line at a time.
struct TimedGraphBuilder {
    interner: Interner,
    ids: HashMap<String, u32>,
    out: TimedGraph,
    /// µs per (first, last, stack): the same interval of the same line
    /// (threads folded together, ticks) is one span.
    spans: HashMap<(u32, u32, u32), u64>,
    /// The capture's first slice (absolute, wrapping).
    origin: u32,
}

impl TimedGraphBuilder {
    fn new(raw: &RawProfile) -> Self {
        TimedGraphBuilder {
            interner: Interner::default(),
            ids: HashMap::new(),
            out: TimedGraph {
                graph: Graph {
                    unit: "µs",
                    ..Default::default()
                },
                ..Default::default()
            },
            spans: HashMap::new(),
            origin: (raw.time_origin_ns / TIME_SLICE_NS) as u32,
        }
    }

    /// A slice counted from the start; one before it (a block begun
    /// before the start) at the start.
    fn rel(&self, slice: u32) -> u32 {
        let r = slice.wrapping_sub(self.origin);
        if r > u32::MAX / 2 { 0 } else { r }
    }

    /// Adds `us` to `line`, spent over `spans` (`[first, last, us]`,
    /// absolute slices).
    fn add(&mut self, line: &str, us: u64, spans: impl IntoIterator<Item = [u32; 3]>) {
        let id = match self.ids.get(line) {
            Some(&id) => id,
            None => {
                let id = self.out.graph.stacks.len() as u32;
                self.out.graph.stacks.push(self.interner.stack(line));
                self.out.graph.weights.push(0);
                self.ids.insert(line.to_string(), id);
                id
            }
        };
        self.out.graph.weights[id as usize] += us;
        for [first, last, us] in spans {
            let (a, b) = (self.rel(first), self.rel(last));
            *self.spans.entry((a, b.max(a), id)).or_default() += u64::from(us);
        }
    }

    fn finish(mut self, graphed: usize) -> TimedGraph {
        let mut spans: Vec<((u32, u32, u32), u64)> = self.spans.into_iter().collect();
        spans.sort_unstable();
        self.out.spans = spans
            .into_iter()
            .flat_map(|((a, b, id), us)| [a, b, id, us.min(u64::from(u32::MAX)) as u32])
            .collect();
        self.out.graphed = graphed;
        self.out.graph.frames = self.interner.frames;
        self.out
    }
}

/// The off-CPU time of a capture whose keys `analysis` folded, with its
/// intervals.
pub fn off_timeline(raw: &RawProfile, analysis: &crate::offcpu::OffCpuAnalysis) -> TimedGraph {
    let mut b = TimedGraphBuilder::new(raw);
    let mut order: Vec<&crate::offcpu::TimedKey> = analysis.timed.iter().collect();
    // The graphed lines first.
    order.sort_by_key(|t| t.short);
    let mut graphed = None;
    for t in order {
        let Some(o) = raw.offcpu.get(t.index) else {
            continue;
        };
        if t.short && graphed.is_none() {
            graphed = Some(b.out.graph.stacks.len());
        }
        b.add(&t.line, o.ns / 1000, o.spans.iter().copied());
    }
    let graphed = graphed.unwrap_or(b.out.graph.stacks.len());
    b.finish(graphed)
}

/// The time inside event-loop stalls of a capture, with its intervals.
pub fn stall_timeline(raw: &RawProfile, analysis: &crate::loops::LoopsAnalysis) -> TimedGraph {
    let mut b = TimedGraphBuilder::new(raw);
    for (line, from, to, us) in &analysis.timed {
        let (first, last) = profiler_common::stacks::slices_of(*from, (*to).max(from + 1));
        let us32 = (*us).min(u64::from(u32::MAX)) as u32;
        b.add(line, *us, [[first, last, us32]]);
    }
    let n = b.out.graph.stacks.len();
    b.finish(n)
}

impl Timeline {
    /// Adds the off-CPU and stall time with its intervals, where they
    /// were recorded.
    pub fn with_timed(
        mut self,
        raw: &RawProfile,
        offcpu: Option<&crate::offcpu::OffCpuAnalysis>,
        loops: Option<&crate::loops::LoopsAnalysis>,
    ) -> Self {
        self.offcpu = offcpu.map(|o| off_timeline(raw, o));
        self.stalls = loops.map(|l| stall_timeline(raw, l));
        self
    }
}

/// `timeline.json`'s schema tag.
pub const TIMELINE_SCHEMA: &str = "profiler.timeline/1";

/// Interns frame names and stacks.
#[derive(Default)]
struct Interner {
    frames: Vec<String>,
    index: HashMap<String, u32>,
}

impl Interner {
    fn stack(&mut self, line: &str) -> Vec<u32> {
        line.split(';')
            .map(|f| {
                if let Some(&i) = self.index.get(f) {
                    return i;
                }
                let i = self.frames.len() as u32;
                self.frames.push(f.to_string());
                self.index.insert(f.to_string(), i);
                i
            })
            .collect()
    }
}

/// The timeline of a capture: `stacks` are the symbolized `raw.stacks`
/// whose indexes are `kept` (the same order).
pub fn timeline(raw: &RawProfile, stacks: &[SymbolizedStack], kept: &[usize]) -> Timeline {
    let mut interner = Interner::default();
    // Raw stack index -> distinct folded line index.
    let mut by_raw: Vec<Option<u32>> = vec![None; raw.stacks.len()];
    // Distinct stacks by their interned frames (4 bytes a frame, not the
    // folded line's text).
    let mut lines: HashMap<Vec<u32>, u32> = HashMap::new();
    let mut out_stacks: Vec<Vec<u32>> = Vec::new();
    for (s, &raw_index) in stacks.iter().zip(kept) {
        let frames = interner.stack(&fold::line(s));
        let id = match lines.get(&frames) {
            Some(&id) => id,
            None => {
                let id = out_stacks.len() as u32;
                out_stacks.push(frames.clone());
                lines.insert(frames, id);
                id
            }
        };
        if let Some(slot) = by_raw.get_mut(raw_index) {
            *slot = Some(id);
        }
    }
    let mut cells: HashMap<(u32, u32), u32> = HashMap::new();
    for &(slice, raw_index, n) in &raw.stack_times {
        if let Some(&Some(id)) = by_raw.get(raw_index as usize) {
            *cells.entry((slice, id)).or_default() += n;
        }
    }
    let mut cells: Vec<((u32, u32), u32)> = cells.into_iter().collect();
    cells.sort_unstable();
    let routes = raw
        .request_routes
        .iter()
        .map(|(pid, method, route)| format!("{method} {route} [{pid}]"))
        .collect();
    let requests = raw
        .request_times
        .iter()
        .flat_map(|r| {
            [
                (r.time_ns.saturating_sub(raw.time_origin_ns) / 1_000_000) as u32,
                r.route,
                r.duration_us,
                u32::from(r.status),
            ]
        })
        .collect();
    Timeline {
        routes,
        requests,
        schema: TIMELINE_SCHEMA,
        slice_ms: TIME_SLICE_NS as f64 / 1e6,
        offcpu: None,
        stalls: None,
        frames: interner.frames,
        stacks: out_stacks,
        samples: cells
            .into_iter()
            .flat_map(|((slice, id), n)| [slice, id, n])
            .collect(),
    }
}

/// A flame graph without time: stacks and their weights.
#[derive(Debug, Default, Serialize)]
pub struct Graph {
    /// What it counts (`samples`, `us`).
    pub unit: &'static str,
    /// Frame names.
    pub frames: Vec<String>,
    /// Stacks, root first, as indexes in `frames`.
    pub stacks: Vec<Vec<u32>>,
    /// Weight of each stack.
    pub weights: Vec<u64>,
}

/// A folded profile as a [`Graph`].
pub fn graph(folded: &Folded, unit: &'static str) -> Graph {
    graph_of(folded.iter().map(|(l, &n)| (l.as_str(), n)), unit)
}

/// Folded lines and their weights as a [`Graph`].
pub fn graph_of<'a>(lines: impl Iterator<Item = (&'a str, u64)>, unit: &'static str) -> Graph {
    let mut interner = Interner::default();
    let mut g = Graph {
        unit,
        ..Default::default()
    };
    for (line, n) in lines {
        g.stacks.push(interner.stack(line));
        g.weights.push(n);
    }
    g.frames = interner.frames;
    g
}

/// What the diff page shows.
#[derive(Serialize)]
pub struct DiffPage<'a> {
    /// Always `diff`: the page draws the diff view.
    pub kind: &'static str,
    /// Heading.
    pub title: String,
    /// The comparison (diff.json).
    pub diff: &'a crate::diff::Diff,
    /// Whether rules were given.
    pub rules: bool,
    /// The stacks before.
    pub before: Graph,
    /// The stacks after.
    pub after: Graph,
}

/// Writes the diff page.
pub fn write_diff_html(page: &DiffPage<'_>, w: impl io::Write) -> io::Result<()> {
    write_json_page(page, w)
}

/// What the page shows.
#[derive(Serialize)]
pub struct Page<'a> {
    /// Heading: what, where, how long.
    pub title: String,
    /// Sampling rate (Hz).
    pub hz: u64,
    /// Length of the capture (s).
    pub duration_s: f64,
    /// The USE table's rows (resource, utilization, saturation, errors).
    pub use_rows: [[String; 4]; 3],
    /// Lines under the table.
    pub use_notes: Vec<String>,
    /// use.json.
    #[serde(rename = "use")]
    pub use_report: &'a UseReport,
    /// requests.json, when followed.
    pub requests: Option<&'a RequestsReport>,
    /// symbols.json, when stacks were taken.
    pub symbols: Option<&'a SymbolReport>,
    /// Timed CPU stacks, when stacks were taken.
    pub cpu: Option<&'a Timeline>,
    /// Off-CPU time, when recorded and not timed in `cpu`.
    pub offcpu: Option<Graph>,
    /// Event-loop stalls, when timed and not in `cpu`.
    pub stalls: Option<Graph>,
    /// The per-second series.
    pub seconds: &'a [Second],
}

impl<'a> Page<'a> {
    /// Adds the off-CPU and stall flame graphs, where they were recorded.
    pub fn with_graphs(mut self, offcpu: Option<&Folded>, stalls: Option<&Folded>) -> Self {
        self.offcpu = offcpu.map(|f| graph(f, "µs"));
        self.stalls = stalls.map(|f| graph(f, "µs"));
        self
    }

    /// Adds the timed CPU stacks; off-CPU and stall time timed there is
    /// not repeated.
    pub fn with_timeline(mut self, cpu: Option<&'a Timeline>) -> Self {
        if cpu.is_some_and(|t| t.offcpu.is_some()) {
            self.offcpu = None;
        }
        if cpu.is_some_and(|t| t.stalls.is_some()) {
            self.stalls = None;
        }
        self.cpu = cpu;
        self
    }

    /// The page of a capture.
    pub fn new(title: String, hz: u64, use_report: &'a UseReport) -> Self {
        Page {
            title,
            hz,
            duration_s: use_report.duration_s,
            use_rows: usereport::table_rows(use_report),
            use_notes: usereport::table_notes(use_report),
            use_report,
            requests: None,
            symbols: None,
            cpu: None,
            offcpu: None,
            stalls: None,
            seconds: &use_report.seconds,
        }
    }
}

/// Writes the page.
pub fn write_html(page: &Page<'_>, w: impl io::Write) -> io::Result<()> {
    write_json_page(page, w)
}

/// Writes the page around `data`, a JSON object, made safe to sit in a
/// `<script>` element.
pub fn write_page(data: &str, w: impl io::Write) -> io::Result<()> {
    write_page_with(w, |out| out.write_all(data.as_bytes()))
}

/// Writes the page with `value` serialized as its data, streamed (no
/// copy of the JSON in memory).
fn write_json_page<T: Serialize>(value: &T, w: impl io::Write) -> io::Result<()> {
    write_page_with(w, |out| {
        serde_json::to_writer(out, value).map_err(io::Error::other)
    })
}

fn write_page_with(
    mut w: impl io::Write,
    data: impl FnOnce(&mut ScriptSafe<&mut dyn io::Write>) -> io::Result<()>,
) -> io::Result<()> {
    let (head, tail) = PAGE
        .split_once("/*DATA*/")
        .expect("page.html has a /*DATA*/ mark");
    w.write_all(head.as_bytes())?;
    let mut out = ScriptSafe {
        w: &mut w as &mut dyn io::Write,
        after_lt: false,
    };
    data(&mut out)?;
    w.write_all(tail.as_bytes())
}

/// Passes JSON through with every `</` written `<\/`: "</script>" inside
/// the data would end the page's element, and `\/` is `/` to JSON (a
/// `<` is only ever inside a string there).
struct ScriptSafe<W> {
    w: W,
    /// The last byte written was `<`.
    after_lt: bool,
}

impl<W: io::Write> io::Write for ScriptSafe<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut from = 0;
        for (i, &b) in buf.iter().enumerate() {
            let lt_before = if i == 0 {
                self.after_lt
            } else {
                buf[i - 1] == b'<'
            };
            if b == b'/' && lt_before {
                self.w.write_all(&buf[from..i])?;
                self.w.write_all(b"\\")?;
                from = i;
            }
        }
        self.w.write_all(&buf[from..])?;
        if let Some(&last) = buf.last() {
            self.after_lt = last == b'<';
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_has_its_data_and_nothing_fetched() {
        let mut folded = Folded::new();
        folded.insert("app;main;</script>".into(), 3);
        let g = graph(&folded, "samples");
        let mut out = Vec::new();
        write_page(&serde_json::to_string(&g).unwrap(), &mut out).unwrap();
        let html = String::from_utf8(out).unwrap();
        assert!(html.contains(r#"<\/script>"#));
        // A `</` split across two writes is caught too.
        let mut out = Vec::new();
        write_page_with(&mut out, |w| {
            w.write_all(b"\"a<")?;
            w.write_all(b"/script>\"")
        })
        .unwrap();
        let html = String::from_utf8(out).unwrap();
        assert!(html.contains(r#""a<\/script>""#), "{html}");
        assert_eq!(
            html.matches("</script>").count(),
            2,
            "the page's own two elements"
        );
        for fetch in [
            "src=",
            "href=",
            "@import",
            "url(",
            "fetch(",
            "XMLHttpRequest",
        ] {
            assert!(!html.contains(fetch), "{fetch} in the page");
        }
    }
}
