//! Headless Chromium driven over the DevTools protocol, on the pipe
//! transport (`--remote-debugging-pipe`: JSON messages ending in a NUL
//! byte, written to the browser's fd 3 and read from its fd 4), so that
//! the tests look at the pages as a person would: the page's script
//! runs, mouse events are real input events, screenshots are taken.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    os::{
        fd::{FromRawFd, RawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The browser binaries tried, in order.
const BROWSERS: &[&str] = &["chromium", "chromium-browser", "google-chrome"];

/// A running headless browser with one page open.
pub struct Browser {
    child: Child,
    to: File,
    from: BufReader<File>,
    next_id: u64,
    session: Option<String>,
    profile: PathBuf,
    /// Errors the page reported: exceptions, console.error, log errors.
    pub errors: Vec<String>,
}

fn pipe() -> [RawFd; 2] {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    fds
}

/// The browser's path, or a panic that says how to install it.
pub fn browser_bin() -> PathBuf {
    for b in BROWSERS {
        if let Ok(out) = Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            && out.status.success()
        {
            return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        }
    }
    panic!(
        "no Chromium found ({}): install it (Debian: apt-get install chromium; .ci/run does)",
        BROWSERS.join(", ")
    );
}

impl Browser {
    /// Starts headless Chromium with a window of `width` x `height`.
    pub fn launch(width: u32, height: u32) -> Browser {
        let bin = browser_bin();
        let profile =
            std::env::temp_dir().join(format!("profiler-chromium-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        let [child_in, to_browser] = pipe();
        let [from_browser, child_out] = pipe();
        let mut cmd = Command::new(&bin);
        cmd.args([
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
            &format!("--window-size={width},{height}"),
            &format!("--user-data-dir={}", profile.display()),
            "about:blank",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only fcntl, dup2 and close between fork and exec
        // (async-signal-safe); fds 3 and 4 are made without O_CLOEXEC, the
        // originals are closed by exec.
        unsafe {
            cmd.pre_exec(move || {
                // Out of the way first: either end may be fd 3 or 4.
                let a = libc::fcntl(child_in, libc::F_DUPFD, 10);
                let b = libc::fcntl(child_out, libc::F_DUPFD, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(a);
                libc::close(b);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        // SAFETY: closing our copies of the child's ends, and owning ours.
        let (to, from) = unsafe {
            libc::close(child_in);
            libc::close(child_out);
            (
                File::from_raw_fd(to_browser),
                File::from_raw_fd(from_browser),
            )
        };
        Browser {
            child,
            to,
            from: BufReader::new(from),
            next_id: 1,
            session: None,
            profile,
            errors: Vec::new(),
        }
    }

    /// Sends a command (to the page once one is open) and waits for its
    /// answer; events that arrive meanwhile are looked at for errors.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.call_in(self.session.clone(), method, params)
    }

    fn call_in(&mut self, session: Option<String>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to the browser");
        loop {
            let m = self.read();
            if m["id"] == json!(id) {
                if let Some(e) = m.get("error") {
                    panic!("{method} failed: {e}");
                }
                return m["result"].clone();
            }
            self.event(&m);
        }
    }

    fn read(&mut self) -> Value {
        let mut buf = Vec::new();
        let n = self
            .from
            .read_until(0, &mut buf)
            .expect("read from the browser");
        assert!(n > 0, "the browser closed its pipe (it exited)");
        buf.pop();
        serde_json::from_slice(&buf).expect("a JSON message from the browser")
    }

    fn event(&mut self, m: &Value) {
        let p = &m["params"];
        match m["method"].as_str() {
            Some("Runtime.exceptionThrown") => self.errors.push(format!(
                "exception: {}",
                p["exceptionDetails"]["exception"]["description"]
                    .as_str()
                    .or(p["exceptionDetails"]["text"].as_str())
                    .unwrap_or("?")
            )),
            Some("Runtime.consoleAPICalled") if p["type"] == "error" => {
                self.errors.push(format!("console.error: {}", p["args"]))
            }
            Some("Log.entryAdded") if p["entry"]["level"] == "error" => self.errors.push(format!(
                "log: {}",
                p["entry"]["text"].as_str().unwrap_or("?")
            )),
            _ => {}
        }
    }

    /// Opens `file` in a new page and waits until the page's script has
    /// run (`document.body.dataset.ready`) or `timeout` passes; returns
    /// the time from the navigation to that point.
    pub fn open(&mut self, file: &Path, timeout: Duration) -> Duration {
        let url = format!("file://{}", file.canonicalize().unwrap().display());
        let target = self.call_in(None, "Target.createTarget", json!({"url": "about:blank"}));
        let attached = self.call_in(
            None,
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        self.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        self.call("Runtime.enable", json!({}));
        self.call("Log.enable", json!({}));
        self.call("Page.enable", json!({}));
        let start = Instant::now();
        self.call("Page.navigate", json!({"url": url}));
        while start.elapsed() < timeout {
            if self.eval("document.body && document.body.dataset.ready === '1'") == json!(true) {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not finish its script in {timeout:?}; errors: {:?}",
            file.display(),
            self.errors
        );
    }

    /// Evaluates an expression in the page; its value as JSON.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr} threw: {e}");
        }
        r["result"]["value"].clone()
    }

    /// A mouse event at page coordinates (`mousePressed`, `mouseMoved`,
    /// `mouseReleased`), left button.
    pub fn mouse(&mut self, kind: &str, x: f64, y: f64) {
        self.call(
            "Input.dispatchMouseEvent",
            json!({"type": kind, "x": x, "y": y, "button": "left",
                   "buttons": if kind == "mouseReleased" { 0 } else { 1 }, "clickCount": 1}),
        );
    }

    /// A drag with the left button from one point to another.
    pub fn drag(&mut self, from: (f64, f64), to: (f64, f64)) {
        self.mouse("mousePressed", from.0, from.1);
        self.mouse("mouseMoved", (from.0 + to.0) / 2.0, (from.1 + to.1) / 2.0);
        self.mouse("mouseMoved", to.0, to.1);
        self.mouse("mouseReleased", to.0, to.1);
    }

    /// Types text into the element `selector` (focused first), as keys.
    pub fn type_into(&mut self, selector: &str, text: &str) {
        self.eval(&format!(
            "document.querySelector({}).focus()",
            serde_json::to_string(selector).unwrap()
        ));
        self.call("Input.insertText", json!({"text": text}));
    }

    /// The centre of an element's box, in page coordinates, and its size.
    pub fn rect(&mut self, selector: &str) -> (f64, f64, f64, f64) {
        let v = self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); e.scrollIntoView(); const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; }})()",
            serde_json::to_string(selector).unwrap()
        ));
        let f = |i: usize| v[i].as_f64().unwrap();
        (f(0), f(1), f(2), f(3))
    }

    /// Saves a PNG of the whole page.
    pub fn screenshot(&mut self, path: &Path) {
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        let png = base64_decode(r["data"].as_str().unwrap());
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Standard base64 (the screenshots' encoding).
pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64() {
        assert_eq!(super::base64_decode("aGVsbG8gd29ybGQ="), b"hello world");
        assert_eq!(super::base64_decode("YQ=="), b"a");
    }
}
