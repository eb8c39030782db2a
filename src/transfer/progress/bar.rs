//! Progress for people: a live bar on a terminal, or (when `--progress` is forced onto a pipe
//! or a CI log) a plain line every few seconds.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Progress;
use crate::error::Error;

/// How often a progress line is written when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(2);

pub struct Bar {
    bar: Option<ProgressBar>,
    counts: Arc<Counts>,
    /// Line mode: dropping the sender stops the line writer; the handle waits for its last line.
    lines: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

#[derive(Default)]
struct Counts {
    files: AtomicU64,
    total_files: AtomicU64,
    bytes: AtomicU64,
    total_bytes: AtomicU64,
}

impl Counts {
    fn line(&self, started: Instant) -> String {
        let (bytes, total) = (
            self.bytes.load(Ordering::Relaxed),
            self.total_bytes.load(Ordering::Relaxed),
        );
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let rate = bytes as f64 / secs;
        let eta = if rate > 0.0 {
            format!("{:.0}s", total.saturating_sub(bytes) as f64 / rate)
        } else {
            "?".into()
        };
        format!(
            "progress: {} of {}, {} of {} files, {}/s, ETA {eta}",
            HumanBytes(bytes),
            HumanBytes(total),
            self.files.load(Ordering::Relaxed),
            self.total_files.load(Ordering::Relaxed),
            HumanBytes(rate as u64),
        )
    }
}

impl Bar {
    pub fn new(show: bool) -> Self {
        let counts = Arc::new(Counts::default());
        let mut bar = None;
        let mut lines = None;
        if show && std::io::stderr().is_terminal() {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(8));
            b.set_style(
                ProgressStyle::with_template("{bytes}/{total_bytes} [{wide_bar}] {binary_bytes_per_sec}, ETA {eta} · files {msg}")
                    .expect("the template is static")
                    .progress_chars("=> "),
            );
            bar = Some(b);
        } else if show {
            let (stop, stopped) = mpsc::channel::<()>();
            let counts = counts.clone();
            let started = Instant::now();
            let writer = std::thread::spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(LINE_EVERY) {
                    eprintln!("{}", counts.line(started));
                }
                eprintln!("{}", counts.line(started));
            });
            lines = Some((stop, writer));
        }
        Bar {
            bar,
            counts,
            lines: Mutex::new(lines),
        }
    }

    fn show_files(&self) {
        if let Some(bar) = &self.bar {
            let c = &self.counts;
            bar.set_message(format!(
                "{}/{}",
                c.files.load(Ordering::Relaxed),
                c.total_files.load(Ordering::Relaxed)
            ));
        }
    }

    /// Prints `line` on stderr without breaking the bar.
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if let Some((stop, writer)) = self.lines.lock().expect("not poisoned").take() {
            drop(stop);
            let _ = writer.join();
        }
    }
}

impl Progress for Bar {
    fn start(&self, files: u64, bytes: u64) {
        self.counts.total_files.store(files, Ordering::Relaxed);
        self.counts.total_bytes.store(bytes, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_length(bytes);
            bar.reset_eta();
        }
        self.show_files();
    }

    fn bytes(&self, n: u64) {
        self.counts.bytes.fetch_add(n, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    fn file_done(&self) {
        self.counts.files.fetch_add(1, Ordering::Relaxed);
        self.show_files();
    }

    fn file_failed(&self, error: &Error) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("error: {error}")),
            None => eprintln!("error: {error}"),
        }
    }
}
