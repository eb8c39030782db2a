//! Progress for machines: a JSON line on stdout every interval while a transfer runs
//! (`{"progress": {...}}`), the agent containers' way to tell the controller how far they are
//! (it reads the newest line of the container's log). The closing summary line follows as before.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Progress;
use crate::store::retry::Outage;

/// How far a transfer is, as one progress line says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub files: u64,
    pub files_total: u64,
    pub bytes: u64,
    pub bytes_total: u64,
    /// Over the last few seconds (0 while nothing moves).
    pub bytes_per_second: u64,
    pub elapsed_seconds: u64,
    /// While storage fails every request and the agent retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<Unreachable>,
}

/// Storage has failed every request for `seconds`; the agent retries within its budget.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Unreachable {
    pub seconds: u64,
    pub budget_seconds: u64,
    /// The last fault, e.g. `Connection refused (os error 111)` or `503 ServerBusy`.
    pub cause: String,
}

#[derive(Serialize)]
struct Line<'a> {
    progress: &'a Snapshot,
}

#[derive(Deserialize)]
struct ParsedLine {
    progress: Snapshot,
}

impl Snapshot {
    /// The progress line for this snapshot.
    pub fn line(&self) -> String {
        serde_json::to_string(&Line { progress: self }).expect("a snapshot serializes")
    }

    /// The snapshot a line holds, if it is a progress line (a log line may also be the
    /// closing summary, or a warning).
    pub fn parse(line: &str) -> Option<Snapshot> {
        serde_json::from_str::<ParsedLine>(line.trim())
            .ok()
            .map(|l| l.progress)
    }
}

/// The window the rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(5);

pub struct Lines {
    counts: Arc<Counts>,
    /// Dropping the sender stops the writer; the handle waits for its last line.
    writer: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

#[derive(Default)]
struct Counts {
    started: AtomicBool,
    files: AtomicU64,
    files_total: AtomicU64,
    bytes: AtomicU64,
    bytes_total: AtomicU64,
}

impl Lines {
    /// Writes a line to `out` every `every` once the transfer has started, and a last one when
    /// dropped; each says whether `outage` (the transfer's store) has storage unreachable.
    pub fn new(
        every: Duration,
        outage: Option<Outage>,
        mut out: impl FnMut(&str) + Send + 'static,
    ) -> Lines {
        let counts = Arc::new(Counts::default());
        let (stop, stopped) = mpsc::channel::<()>();
        let shared = counts.clone();
        let writer = std::thread::spawn(move || {
            let begun = Instant::now();
            let mut rate = Rate::default();
            // The first line's rate is the average since the writer began.
            rate.sample(begun, 0);
            loop {
                let last = !matches!(
                    stopped.recv_timeout(every),
                    Err(mpsc::RecvTimeoutError::Timeout)
                );
                if shared.started.load(Ordering::Relaxed) {
                    let bytes = shared.bytes.load(Ordering::Relaxed);
                    let snapshot = Snapshot {
                        files: shared.files.load(Ordering::Relaxed),
                        files_total: shared.files_total.load(Ordering::Relaxed),
                        bytes,
                        bytes_total: shared.bytes_total.load(Ordering::Relaxed),
                        bytes_per_second: rate.sample(Instant::now(), bytes),
                        elapsed_seconds: begun.elapsed().as_secs(),
                        unreachable: outage.as_ref().and_then(|o| {
                            let down = o.current()?;
                            Some(Unreachable {
                                seconds: down.for_.as_secs(),
                                budget_seconds: o.budget().as_secs(),
                                cause: down.cause,
                            })
                        }),
                    };
                    out(&snapshot.line());
                }
                if last {
                    return;
                }
            }
        });
        Lines {
            counts,
            writer: Mutex::new(Some((stop, writer))),
        }
    }

    /// Lines on stdout.
    pub fn stdout(every: Duration, outage: Option<Outage>) -> Lines {
        Self::new(every, outage, |line| println!("{line}"))
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        if let Some((stop, writer)) = self.writer.lock().expect("not poisoned").take() {
            drop(stop);
            let _ = writer.join();
        }
    }
}

impl Progress for Lines {
    fn start(&self, files: u64, bytes: u64) {
        self.counts.files_total.store(files, Ordering::Relaxed);
        self.counts.bytes_total.store(bytes, Ordering::Relaxed);
        self.counts.started.store(true, Ordering::Relaxed);
    }

    fn bytes(&self, n: u64) {
        self.counts.bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn file_done(&self) {
        self.counts.files.fetch_add(1, Ordering::Relaxed);
    }
}

/// The rate over the last [`RATE_WINDOW`], from samples of the byte count.
#[derive(Default)]
struct Rate {
    samples: VecDeque<(Instant, u64)>,
}

impl Rate {
    fn sample(&mut self, now: Instant, bytes: u64) -> u64 {
        self.samples.push_back((now, bytes));
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= RATE_WINDOW {
            self.samples.pop_front();
        }
        let (then, before) = self.samples[0];
        let seconds = now.duration_since(then).as_secs_f64();
        if seconds <= 0.0 {
            return 0;
        }
        (bytes.saturating_sub(before) as f64 / seconds) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_round_trips_and_other_lines_are_not_progress() {
        let snapshot = Snapshot {
            files: 3,
            files_total: 10,
            bytes: 3 << 30,
            bytes_total: 10 << 30,
            bytes_per_second: 100 << 20,
            elapsed_seconds: 31,
            unreachable: None,
        };
        let line = snapshot.line();
        assert_eq!(
            line,
            r#"{"progress":{"files":3,"filesTotal":10,"bytes":3221225472,"bytesTotal":10737418240,"bytesPerSecond":104857600,"elapsedSeconds":31}}"#
        );
        assert_eq!(
            Snapshot::parse(&format!("{line}\n")),
            Some(snapshot.clone())
        );
        // While storage fails, the line says so, and a line without it still parses.
        let waiting = Snapshot {
            unreachable: Some(Unreachable {
                seconds: 40,
                budget_seconds: 300,
                cause: "Connection refused (os error 111)".into(),
            }),
            ..snapshot
        };
        let line = waiting.line();
        assert!(
            line.contains(r#""unreachable":{"seconds":40,"budgetSeconds":300,"cause":"Connection refused (os error 111)"}"#),
            "{line}"
        );
        assert_eq!(Snapshot::parse(&line), Some(waiting));
        assert_eq!(Snapshot::parse(r#"{"transferred":3,"bytes":10}"#), None);
        assert_eq!(Snapshot::parse("WARN retrying"), None);
    }

    #[test]
    fn lines_follow_the_transfer_and_end_with_its_last_state() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let sink = written.clone();
        let lines = Lines::new(Duration::from_millis(20), None, move |l| {
            sink.lock().unwrap().push(Snapshot::parse(l).unwrap())
        });
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            written.lock().unwrap().is_empty(),
            "nothing before the start"
        );
        lines.start(2, 100);
        lines.bytes(40);
        std::thread::sleep(Duration::from_millis(60));
        lines.bytes(60);
        lines.file_done();
        lines.file_done();
        drop(lines);
        let written = written.lock().unwrap();
        assert!(written.len() >= 2, "{written:?}");
        assert_eq!(written[0].bytes, 40);
        let last = written.last().unwrap();
        assert_eq!(
            (last.files, last.files_total, last.bytes, last.bytes_total),
            (2, 2, 100, 100)
        );
    }

    #[test]
    fn the_rate_is_over_the_last_seconds() {
        let mut rate = Rate::default();
        let t0 = Instant::now();
        assert_eq!(rate.sample(t0, 0), 0);
        assert_eq!(rate.sample(t0 + Duration::from_secs(1), 100), 100);
        assert_eq!(rate.sample(t0 + Duration::from_secs(2), 200), 100);
        // Then it stalls: the rate falls to 0 once the window holds no movement.
        for s in 3..=8 {
            rate.sample(t0 + Duration::from_secs(s), 200);
        }
        assert_eq!(rate.sample(t0 + Duration::from_secs(9), 200), 0);
    }
}
