//! What `record` and `daemon` write, and how: files written atomically
//! (complete under their final name, or absent), output directories, their
//! time stamps, and a capture's files (stacks.folded, flamegraph.svg,
//! use.json) made from one window's data. Also the handling of signals
//! while the files are written.

use std::{
    fs, io,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::{fold, model::Folded, render};

/// Why an output could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The output directory disappeared during the capture.
    #[error(
        "the output directory {dir} was removed during the capture; nothing was written. Pass -o a directory that stays"
    )]
    Removed {
        /// The directory.
        dir: PathBuf,
    },
    /// Writing an output failed.
    #[error(
        "cannot write {path}: {source}. Free space there (or fix its permissions), or pass another -o DIR; the files already written with their final names are complete"
    )]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The flame graph could not be drawn.
    #[error("cannot draw the flame graph: {0}")]
    Render(#[source] io::Error),
}

/// The host's name, for titles and labels.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// `YYYYmmddTHHMMSSZ`: a UTC time for directory names (sorts by time).
pub fn stamp(t: SystemTime) -> String {
    // RFC 3339 in UTC, `2026-12-02T08:32:24Z`, without the separators.
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace(['-', ':'], "")
}

/// Writes a file under a temporary name, then renames it: a file with the
/// final name is always complete.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut io::BufWriter<fs::File>) -> io::Result<()>,
) -> Result<(), OutputError> {
    let err = |source: io::Error| match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => OutputError::Removed {
            dir: dir.to_path_buf(),
        },
        _ => OutputError::Write {
            path: path.to_path_buf(),
            source,
        },
    };
    let tmp = path.with_extension("tmp");
    let res = (|| {
        // 0644 whatever the umask: outputs are never world-writable.
        let mut w = io::BufWriter::new(
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)?,
        );
        write(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        // The temporary file may not exist (the open failed): nothing
        // else to clean.
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

/// Writes pretty JSON and a newline.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), OutputError> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value).map_err(io::Error::other)?;
        io::Write::write_all(w, b"\n")
    })
}

/// Draws a flame graph into memory.
pub fn flamegraph(folded: &Folded, title: &render::Title) -> Result<Vec<u8>, OutputError> {
    let mut out = Vec::new();
    render::flamegraph(folded, title, &mut out).map_err(OutputError::Render)?;
    Ok(out)
}

/// The files of one window's stacks and USE report.
pub struct WindowFiles<'a> {
    /// Folded stacks.
    pub folded: &'a Folded,
    /// The flame graph, drawn (None: it could not be; not written).
    pub svg: Option<&'a [u8]>,
    /// use.json's bytes.
    pub use_json: &'a [u8],
    /// Extra folded files and their drawings (`offcpu`, `stalls`): name
    /// stem, folded stacks, SVG.
    pub extra: Vec<(&'static str, &'a Folded, Option<&'a [u8]>)>,
}

impl WindowFiles<'_> {
    /// Writes stacks.folded, flamegraph.svg and use.json into `dir`;
    /// returns their paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, OutputError> {
        let folded = dir.join("stacks.folded");
        write_atomic(&folded, |w| fold::write_folded(self.folded, w))?;
        let mut written = vec![folded];
        if let Some(bytes) = self.svg {
            let svg = dir.join("flamegraph.svg");
            write_atomic(&svg, |w| io::Write::write_all(w, bytes))?;
            written.push(svg);
        }
        let use_json = dir.join("use.json");
        write_atomic(&use_json, |w| io::Write::write_all(w, self.use_json))?;
        written.push(use_json);
        for (stem, folded, svg) in &self.extra {
            let path = dir.join(format!("{stem}.folded"));
            write_atomic(&path, |w| fold::write_folded(folded, w))?;
            written.push(path);
            if let Some(bytes) = svg {
                let path = dir.join(format!("{stem}.svg"));
                write_atomic(&path, |w| io::Write::write_all(w, bytes))?;
                written.push(path);
            }
        }
        Ok(written)
    }
}

/// A new directory `DIR/<prefix>-<UTC time>` (`.2`, `.3`... when taken).
pub fn new_dir(dir: &Path, prefix: &str, t: SystemTime) -> Result<PathBuf, OutputError> {
    let name = format!("{prefix}-{}", stamp(t));
    let mut out = dir.join(&name);
    let mut n = 1;
    while out.exists() {
        n += 1;
        out = dir.join(format!("{name}.{n}"));
    }
    crate::preflight::create_dir(&out).map_err(|source| OutputError::Write {
        path: out.clone(),
        source,
    })?;
    Ok(out)
}

/// Removes the oldest `<prefix>-*` directories of `dir` past the newest
/// `keep`; returns what could not be removed.
pub fn retain(dir: &Path, prefix: &str, keep: usize) -> Vec<OutputError> {
    let entries = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(source) => {
            return vec![OutputError::Write {
                path: dir.to_path_buf(),
                source,
            }];
        }
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(keep);
    dirs[..excess]
        .iter()
        .filter_map(|old| {
            fs::remove_dir_all(old)
                .err()
                .map(|source| OutputError::Write {
                    path: old.clone(),
                    source,
                })
        })
        .collect()
}

/// Signals still to come before one aborts (see [`abort_on_signal`]).
static SIGNALS_TO_ABORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

extern "C" fn on_signal_while_writing(_: libc::c_int) {
    use std::sync::atomic::Ordering;
    // Only async-signal-safe calls here: write(2) and _exit(2).
    let left = SIGNALS_TO_ABORT.fetch_sub(1, Ordering::SeqCst);
    let msg: &[u8] = if left <= 1 {
        b"profiler: interrupted again, aborting without writing\n"
    } else {
        b"profiler: writing what was captured; interrupt again to abort\n"
    };
    // SAFETY: write(2) of a static buffer to stderr.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    if left <= 1 {
        // SAFETY: _exit(2) ends the process at once, no destructors.
        unsafe { libc::_exit(130) };
    }
}

/// While the outputs are written (synchronous work, where the runtime's
/// signal handling cannot run): the `n`th SIGINT or SIGTERM from now ends
/// the process at once with status 130; the ones before say so.
pub fn abort_on_signal(n: u32) {
    SIGNALS_TO_ABORT.store(n, std::sync::atomic::Ordering::SeqCst);
    let handler = on_signal_while_writing as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: installing a handler that only makes async-signal-safe calls.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn utc_stamps() {
        let at = |s| stamp(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "19700101T000000Z");
        assert_eq!(at(1_795_651_200), "20261126T000000Z");
        assert_eq!(at(951_782_400 + 3661), "20000229T010101Z");
    }

    #[test]
    fn directories_are_retained() {
        let dir = tempfile::tempdir().unwrap();
        let folded = Folded::from([("a;b".to_string(), 3)]);
        for i in 0..5u64 {
            let t = UNIX_EPOCH + Duration::from_secs(1_795_651_200 + i * 60);
            let out = new_dir(dir.path(), "window", t).unwrap();
            let files = WindowFiles {
                folded: &folded,
                svg: Some(b"<svg/>"),
                use_json: b"{}",
                extra: vec![("offcpu", &folded, None)],
            };
            let written = files.write(&out).unwrap();
            assert!(written.contains(&out.join("offcpu.folded")));
            assert!(retain(dir.path(), "window-", 3).is_empty());
        }
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "window-20261126T000200Z",
                "window-20261126T000300Z",
                "window-20261126T000400Z"
            ]
        );
        let text = fs::read_to_string(dir.path().join(&names[2]).join("stacks.folded")).unwrap();
        assert_eq!(text, "a;b 3\n");
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        let r = write_atomic(&path, |_| Err(io::Error::other("disk full")));
        assert!(matches!(r, Err(OutputError::Write { .. })), "{r:?}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
