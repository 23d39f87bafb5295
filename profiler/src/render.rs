//! The render stage: folded stacks to an interactive SVG flame graph
//! (inferno), kernel, inlined and JIT frames coloured apart.

use std::io;

use inferno::flamegraph::{
    self, Options,
    color::{MultiPalette, Palette},
};

use crate::fold::Folded;

/// What the flame graph's title says.
#[derive(Clone, Debug)]
pub struct Title {
    /// Host name.
    pub host: String,
    /// Capture length in seconds.
    pub duration_s: f64,
    /// Sampling frequency in Hz.
    pub frequency_hz: u64,
    /// Samples in the graph.
    pub samples: u64,
}

impl Title {
    fn text(&self) -> String {
        format!(
            "CPU flame graph: {} — {:.1} s at {} Hz, {} samples",
            self.host, self.duration_s, self.frequency_hz, self.samples
        )
    }
}

/// Writes the SVG. Colours are derived from frame names (deterministic):
/// the same profile gives the same file.
pub fn flamegraph(folded: &Folded, title: &Title, w: impl io::Write) -> io::Result<()> {
    let mut opts = Options::default();
    opts.title = title.text();
    opts.subtitle = Some("kernel frames _[k] orange, inlined _[i] aqua, JIT _[j] green".into());
    opts.colors = Palette::Multi(MultiPalette::Java);
    opts.count_name = "samples".into();
    draw(folded, opts, w)
}

/// What an off-CPU (or event-loop stall) flame graph's title says.
#[derive(Clone, Debug)]
pub struct TimeTitle {
    /// What the graph shows ("Off-CPU time", "Event-loop stalls").
    pub what: &'static str,
    /// Host name.
    pub host: String,
    /// Capture length in seconds.
    pub duration_s: f64,
    /// Microseconds in the graph.
    pub total_us: u64,
}

/// Writes a flame graph of time (microseconds) in the blue palette, apart
/// from the CPU one: off-CPU time, or what blocked event loops.
pub fn time_flamegraph(folded: &Folded, title: &TimeTitle, w: impl io::Write) -> io::Result<()> {
    let mut opts = Options::default();
    opts.title = format!(
        "{} flame graph: {} — {:.1} s captured, {:.3} s in the graph",
        title.what,
        title.host,
        title.duration_s,
        title.total_us as f64 / 1e6
    );
    opts.subtitle = Some("widths are time (us); the leaf [off-cpu: CAUSE] says why".into());
    opts.colors = Palette::Basic(inferno::flamegraph::color::BasicPalette::Blue);
    opts.count_name = "us".into();
    draw(folded, opts, w)
}

fn draw(folded: &Folded, mut opts: Options<'_>, w: impl io::Write) -> io::Result<()> {
    opts.deterministic = true;
    let lines: Vec<String> = folded.iter().map(|(l, c)| format!("{l} {c}")).collect();
    if lines.is_empty() {
        // inferno refuses empty input; say so in an SVG of our own.
        return write!(
            { w },
            "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg version=\"1.1\" width=\"1200\" height=\"60\" xmlns=\"http://www.w3.org/2000/svg\"><text x=\"10\" y=\"30\">{}: no samples</text></svg>\n",
            xml_escape(&opts.title)
        );
    }
    flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), w)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden test: re-bless with `BLESS=1 cargo test -p profiler render`.
    #[test]
    fn golden_svg() {
        let mut folded = Folded::new();
        folded.insert("app;main;run;helper_[i]".into(), 7);
        folded.insert("app;main;idle;__x64_sys_nanosleep_[k]".into(), 3);
        folded.insert("node;node::Start;LazyCompile:*hot /a.js:1:1_[j]".into(), 5);
        let title = Title {
            host: "testhost".into(),
            duration_s: 2.0,
            frequency_hz: 99,
            samples: 15,
        };
        let mut out = Vec::new();
        flamegraph(&folded, &title, &mut out).unwrap();
        let svg = String::from_utf8(out.clone()).unwrap();
        assert!(svg.contains("testhost — 2.0 s at 99 Hz, 15 samples"));
        crate::golden::check("flamegraph.svg", &out);
    }

    #[test]
    fn empty_profile_still_gives_an_svg() {
        let title = Title {
            host: "h".into(),
            duration_s: 1.0,
            frequency_hz: 99,
            samples: 0,
        };
        let mut out = Vec::new();
        flamegraph(&Folded::new(), &title, &mut out).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("no samples"));
    }
}
