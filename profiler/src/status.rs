//! The live status of `record`: on a terminal, one line rewritten each
//! second (elapsed and remaining time, samples so far and lost so far,
//! the busiest processes of the last second), and the events as they
//! happen (an OOM kill, a burst of retransmits, an event-loop stall) on
//! lines of their own above it. Plain lines when stderr is not a
//! terminal: the events at once and the status every
//! [`PLAIN_EVERY`] seconds; nothing with `--quiet`.

use std::{
    io::{IsTerminal, Write},
    time::Duration,
};

use crate::model::Second;

/// Seconds between two status lines when stderr is not a terminal.
pub const PLAIN_EVERY: u64 = 5;

/// Retransmits in one second that are reported as a burst.
pub const RETRANSMIT_BURST: u64 = 10;

/// The status line's state.
pub struct Status {
    tty: bool,
    quiet: bool,
    duration: Option<Duration>,
    samples: u64,
    lost: u64,
    seconds: u64,
    /// A status line is on the terminal (to be erased before other output).
    shown: bool,
}

impl Status {
    /// For a capture of `duration` (None: until stopped).
    pub fn new(duration: Option<Duration>, quiet: bool) -> Self {
        Status {
            tty: std::io::stderr().is_terminal(),
            quiet,
            duration,
            samples: 0,
            lost: 0,
            seconds: 0,
            shown: false,
        }
    }

    /// Says what the second just ended brought.
    pub fn second(&mut self, row: &Second) {
        self.samples += row.samples;
        self.lost += row.lost;
        self.seconds += 1;
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        let events = events(row);
        if self.tty && self.shown {
            // Erase the status line before anything else is written.
            let _ = write!(err, "\r\x1b[K");
            self.shown = false;
        }
        for e in &events {
            let _ = writeln!(err, "profiler: {:.0} s: {e}", row.t);
        }
        let line = self.line(row);
        if self.tty {
            let _ = write!(err, "{line}");
            self.shown = true;
        } else if self.seconds.is_multiple_of(PLAIN_EVERY) {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Erases the status line (before the capture's own output).
    pub fn clear(&mut self) {
        if self.tty && self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
            self.shown = false;
        }
    }

    /// The status line.
    fn line(&self, row: &Second) -> String {
        let remaining = match self.duration {
            Some(d) => format!(", {:.0} s left", (d.as_secs_f64() - row.t).max(0.0).round()),
            None => String::new(),
        };
        let busiest: Vec<String> = row
            .top
            .iter()
            .filter(|(_, _, n)| *n > 0 && row.samples > 0)
            .map(|(pid, name, n)| {
                format!(
                    "{}[{pid}] {:.0}%",
                    if name.is_empty() { "?" } else { name },
                    100.0 * *n as f64 / row.samples as f64
                )
            })
            .collect();
        let busy = if row.cpu_busy.is_empty() {
            String::new()
        } else {
            format!(
                ", CPU {:.0}%",
                100.0 * row.cpu_busy.iter().sum::<f64>() / row.cpu_busy.len() as f64
            )
        };
        format!(
            "profiler: {:.0} s{remaining}: {} samples, {} lost{busy}{}",
            row.t,
            self.samples,
            self.lost,
            if busiest.is_empty() {
                String::new()
            } else {
                format!("; busiest {}", busiest.join(", "))
            }
        )
    }
}

/// What happened in a second that deserves a line of its own.
pub fn events(row: &Second) -> Vec<String> {
    let mut out = Vec::new();
    if row.oom_kills > 0 {
        out.push(format!(
            "{} OOM kill{} (details in use.json at the end)",
            row.oom_kills,
            if row.oom_kills == 1 { "" } else { "s" }
        ));
    }
    if row.retransmits >= RETRANSMIT_BURST {
        out.push(format!("burst of {} TCP retransmits", row.retransmits));
    }
    if row.stalls > 0 {
        out.push(format!(
            "{} event-loop stall{} ({:.0} ms)",
            row.stalls,
            if row.stalls == 1 { "" } else { "s" },
            row.stall_ms
        ));
    }
    if row.lost > 0 {
        out.push(format!("{} samples lost", row.lost));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_and_events() {
        let mut s = Status::new(Some(Duration::from_secs(30)), true);
        let row = Second {
            t: 12.0,
            samples: 200,
            lost: 0,
            cpu_busy: vec![1.0, 0.5],
            top: vec![(42, "node".into(), 150), (7, "redis".into(), 50)],
            oom_kills: 1,
            retransmits: 3,
            stalls: 2,
            stall_ms: 250.0,
            ..Default::default()
        };
        s.second(&row);
        assert_eq!(
            s.line(&row),
            "profiler: 12 s, 18 s left: 200 samples, 0 lost, CPU 75%; busiest node[42] 75%, redis[7] 25%"
        );
        assert_eq!(
            events(&row),
            vec![
                "1 OOM kill (details in use.json at the end)".to_string(),
                "2 event-loop stalls (250 ms)".to_string()
            ]
        );
    }
}
