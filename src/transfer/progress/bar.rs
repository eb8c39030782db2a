//! Progress for people: a live bar on a terminal, or (when `--progress` is forced onto a pipe
//! or a CI log) a plain line every few seconds.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Progress;
use crate::error::Error;
use crate::store::retry::{Outage, Unanswered};

/// How often a progress line is written when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(2);
/// How often a bar looks whether storage is unreachable.
const WATCH_EVERY: Duration = Duration::from_secs(1);

pub struct Bar {
    bar: Option<ProgressBar>,
    counts: Arc<Counts>,
    /// Dropping the sender stops the writer of lines (and notes of outages); the handle waits
    /// for its last line.
    lines: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

/// When a progress display says that storage is unreachable: once an outage has lasted
/// [`OutageNotes::AFTER`] (a lone reset retried at once is not news), then every
/// [`OutageNotes::EVERY`], and once more when storage answers again.
#[derive(Default)]
struct OutageNotes {
    /// When the current outage was last reported.
    noted: Option<Duration>,
}

impl OutageNotes {
    const AFTER: Duration = Duration::from_secs(2);
    const EVERY: Duration = Duration::from_secs(10);

    fn next(&mut self, now: Option<Unanswered>, budget: Duration) -> Option<String> {
        let Some(down) = now else {
            return self
                .noted
                .take()
                .map(|_| "storage answers again: resuming".to_string());
        };
        // A new outage began after an answer between two looks: its clock restarted.
        if self.noted.is_some_and(|noted| down.for_ < noted) {
            self.noted = None;
        }
        let budget = crate::duration::format(budget);
        let note = match self.noted {
            None if down.for_ >= Self::AFTER => format!(
                "storage unreachable ({}): retrying for up to {budget}",
                down.cause
            ),
            Some(noted) if down.for_ >= noted + Self::EVERY => format!(
                "storage unreachable for {}s, retrying (up to {budget}): {}",
                down.for_.as_secs(),
                down.cause
            ),
            _ => return None,
        };
        self.noted = Some(down.for_);
        Some(note)
    }
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
    /// A bar on a terminal, else lines when `show`; either also notes while `outage` (the
    /// transfer's stores) has storage unreachable.
    pub fn new(show: bool, outage: Option<Outage>) -> Self {
        let counts = Arc::new(Counts::default());
        let mut bar = None;
        let mut lines = None;
        let terminal = std::io::stderr().is_terminal();
        if show && terminal {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(8));
            b.set_style(
                ProgressStyle::with_template("{bytes}/{total_bytes} [{wide_bar}] {binary_bytes_per_sec}, ETA {eta} · files {msg}")
                    .expect("the template is static")
                    .progress_chars("=> "),
            );
            bar = Some(b);
        }
        if show && (!terminal || outage.is_some()) {
            let (stop, stopped) = mpsc::channel::<()>();
            let counts = counts.clone();
            let started = Instant::now();
            let drawn = bar.clone();
            let every = if terminal { WATCH_EVERY } else { LINE_EVERY };
            let writer = std::thread::spawn(move || {
                let mut notes = OutageNotes::default();
                let say = |line: &str| match &drawn {
                    Some(bar) => bar.suspend(|| eprintln!("{line}")),
                    None => eprintln!("{line}"),
                };
                loop {
                    let last = !matches!(
                        stopped.recv_timeout(every),
                        Err(mpsc::RecvTimeoutError::Timeout)
                    );
                    if let Some(outage) = &outage
                        && let Some(note) = notes.next(outage.current(), outage.budget())
                    {
                        say(&note);
                    }
                    if drawn.is_none() {
                        say(&counts.line(started));
                    }
                    if last {
                        return;
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn down(seconds: u64) -> Option<Unanswered> {
        Some(Unanswered {
            for_: Duration::from_secs(seconds),
            cause: "Connection refused (os error 111)".into(),
        })
    }

    #[test]
    fn an_outage_is_noted_once_it_lasts_then_every_ten_seconds_then_its_end() {
        let budget = Duration::from_secs(300);
        let mut notes = OutageNotes::default();
        assert_eq!(notes.next(None, budget), None);
        assert_eq!(notes.next(down(1), budget), None, "a blip is not news");
        assert_eq!(
            notes.next(down(2), budget).as_deref(),
            Some("storage unreachable (Connection refused (os error 111)): retrying for up to 5m")
        );
        assert_eq!(notes.next(down(5), budget), None);
        assert_eq!(
            notes.next(down(12), budget).as_deref(),
            Some(
                "storage unreachable for 12s, retrying (up to 5m): Connection refused (os error 111)"
            )
        );
        assert_eq!(
            notes.next(None, budget).as_deref(),
            Some("storage answers again: resuming")
        );
        assert_eq!(notes.next(None, budget), None);
        // A new outage seen after one look missed the answer between them starts over.
        notes.next(down(30), budget);
        assert!(
            notes
                .next(down(3), budget)
                .unwrap()
                .starts_with("storage unreachable (")
        );
    }
}
