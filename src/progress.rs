//! Progress for long commands: an indicatif bar on a terminal, plain periodic lines otherwise (logs, SLURM).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a plain line is printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    start: Instant,
    last_line: Instant,
    bytes: bool,
}

impl Progress {
    /// A progress over `total` bytes.
    pub fn bytes(label: &str, total: u64, enabled: bool) -> Self {
        Self::new(label, total, true, enabled)
    }

    /// A progress over `total` steps of some unit.
    pub fn steps(label: &str, total: u64, enabled: bool) -> Self {
        Self::new(label, total, false, enabled)
    }

    fn new(label: &str, total: u64, bytes: bool, enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let tpl = if bytes {
                "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
            } else {
                "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} ETA {eta}"
            };
            let b = ProgressBar::new(total);
            b.set_style(ProgressStyle::with_template(tpl).unwrap_or_else(|_| ProgressStyle::default_bar()));
            b.set_message(label.to_string());
            b
        });
        let now = Instant::now();
        Progress {
            bar,
            label: if enabled { label.to_string() } else { String::new() },
            total,
            start: now,
            last_line: now,
            bytes,
        }
    }

    pub fn set(&mut self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        } else if !self.label.is_empty() && self.last_line.elapsed() >= PLAIN_EVERY {
            self.last_line = Instant::now();
            let secs = self.start.elapsed().as_secs_f64();
            let pct = if self.total > 0 { 100.0 * pos as f64 / self.total as f64 } else { 0.0 };
            if self.bytes {
                eprintln!(
                    "{}: {:.1}% ({:.1} MB, {:.1} MB/s)",
                    self.label,
                    pct,
                    pos as f64 / 1e6,
                    pos as f64 / 1e6 / secs
                );
            } else {
                eprintln!("{}: {pos}/{} ({pct:.1}%, {:.1}/s)", self.label, self.total, pos as f64 / secs);
            }
        }
    }

    /// A short status shown in the bar (loss, learning rate, ...); plain mode prints it with its lines.
    pub fn set_message(&mut self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(format!("{} {msg}", self.label));
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// Print a line without tearing the bar.
    pub fn println(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }
}
