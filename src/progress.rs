//! Progress that stays truthful wherever it is read: an indicatif bar when stderr is a terminal,
//! and plain lines in job logs (stderr a file or a pipe, where a bar would print nothing): one
//! line every twentieth of the work or every minute, whichever comes first, and a final line.
//! `SDDPM_PROGRESS=plain` forces the lines on a terminal too.
//!
//! Callers report work that is done (steps taken, evaluations finished, images measured), never
//! work merely submitted, so the rate and the eta are real.

use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Plain lines at least this often while work progresses.
const LINE_EVERY: Duration = Duration::from_secs(60);
/// Plain lines at every this fraction of the work.
const LINES_PER_RUN: u64 = 20;

pub struct Progress {
    bar: ProgressBar,
    plain: Option<Mutex<Plain>>,
}

struct Plain {
    what: String,
    unit: String,
    len: u64,
    pos: u64,
    /// Position at the last line, and the position of the next mark.
    printed: u64,
    next_mark: u64,
    started: Instant,
    last_line: Instant,
    message: String,
}

/// Whether progress goes out as plain lines (see the module documentation).
pub fn plain_lines() -> bool {
    std::env::var("SDDPM_PROGRESS").is_ok_and(|v| v == "plain") || !std::io::stderr().is_terminal()
}

fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

impl Plain {
    fn line(&mut self) {
        let elapsed = self.started.elapsed();
        let pct = (100 * self.pos).checked_div(self.len).unwrap_or(100);
        let eta = if self.pos > 0 && self.pos < self.len {
            let left = elapsed.mul_f64((self.len - self.pos) as f64 / self.pos as f64);
            format!(", eta {}", duration(left))
        } else {
            String::new()
        };
        let msg = if self.message.is_empty() { String::new() } else { format!("  {}", self.message) };
        eprintln!("{}: {}/{} {} ({pct}%), {}{eta}{msg}", self.what, self.pos, self.len, self.unit, duration(elapsed),);
        self.printed = self.pos;
        self.last_line = Instant::now();
        let every = self.len.div_ceil(LINES_PER_RUN).max(1);
        self.next_mark = (self.pos / every + 1) * every;
    }
}

impl Progress {
    /// Progress over `len` units of work, named `what` (e.g. "train", "sample") and counted in
    /// `unit` (e.g. "steps"). The bar shows `{pos}/{len} {unit}`, the rate and the eta; messages
    /// follow.
    pub fn new(what: &str, len: u64, unit: &str) -> Progress {
        let template = format!("{{bar:40}} {{pos}}/{{len}} {unit}, {{per_sec}}, eta {{eta}} {{msg}}");
        Self::with_template(what, len, unit, &template)
    }

    /// As [`Progress::new`] with an indicatif template for the bar.
    pub fn with_template(what: &str, len: u64, unit: &str, template: &str) -> Progress {
        if plain_lines() {
            let now = Instant::now();
            let plain = Plain {
                what: what.to_string(),
                unit: unit.to_string(),
                len,
                pos: 0,
                printed: 0,
                next_mark: len.div_ceil(LINES_PER_RUN).max(1),
                started: now,
                last_line: now,
                message: String::new(),
            };
            return Progress {
                bar: ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden()),
                plain: Some(Mutex::new(plain)),
            };
        }
        let bar = ProgressBar::new(len);
        bar.set_style(ProgressStyle::with_template(template).expect("a valid progress template"));
        Progress { bar, plain: None }
    }

    /// Progress that shows nothing (work inside work that has its own progress).
    pub fn hidden() -> Progress {
        Progress { bar: ProgressBar::hidden(), plain: None }
    }

    /// `pos` units are done. Restarting mid-way (a resumed run) is a position, not progress: the
    /// first call only sets where the count starts.
    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
        if let Some(p) = &self.plain {
            let mut p = p.lock().unwrap();
            if pos == p.pos {
                return;
            }
            p.pos = pos;
            let due = pos >= p.next_mark || p.last_line.elapsed() >= LINE_EVERY;
            if due && pos < p.len {
                p.line();
            }
        }
    }

    /// Where a resumed count starts (no line: nothing was done yet).
    pub fn start_at(&self, pos: u64) {
        self.bar.set_position(pos);
        if let Some(p) = &self.plain {
            let mut p = p.lock().unwrap();
            p.pos = pos;
            p.printed = pos;
            let every = p.len.div_ceil(LINES_PER_RUN).max(1);
            p.next_mark = (pos / every + 1) * every;
        }
    }

    pub fn inc(&self, delta: u64) {
        self.set_position(self.bar.position() + delta);
    }

    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    pub fn set_message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        if let Some(p) = &self.plain {
            p.lock().unwrap().message = msg.clone();
        }
        self.bar.set_message(msg);
    }

    /// Run `f` with the bar hidden (work that prints, or has progress of its own).
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// The work is done: the bar stays with `msg`; in plain mode the final line.
    pub fn finish(&self, msg: impl Into<String>) {
        let msg = msg.into();
        if let Some(p) = &self.plain {
            let mut p = p.lock().unwrap();
            p.pos = self.bar.position();
            p.message = msg.clone();
            p.line();
        }
        self.bar.finish_with_message(msg);
    }

    /// The work is done and the bar goes away; in plain mode the final line.
    pub fn finish_and_clear(&self) {
        if let Some(p) = &self.plain {
            let mut p = p.lock().unwrap();
            p.pos = self.bar.position();
            p.line();
        }
        self.bar.finish_and_clear();
    }

    /// Stopped before the end (Ctrl-C, an error): the bar stays where it is; in plain mode one
    /// line says where.
    pub fn abandon(&self) {
        if let Some(p) = &self.plain {
            let mut p = p.lock().unwrap();
            if p.printed != p.pos {
                p.line();
            }
        }
        self.bar.abandon();
    }
}
