//! Progress on the terminal: one bar of bytes with files, throughput and ETA.

use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::Error;
use crate::transfer::Progress;

pub struct Bar {
    bar: Option<ProgressBar>,
    files: AtomicU64,
    total_files: AtomicU64,
}

impl Bar {
    /// A bar drawn on stderr when `show`; otherwise only failures are printed.
    pub fn new(show: bool) -> Self {
        let bar = show.then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(8));
            bar.set_style(
                ProgressStyle::with_template("{bytes}/{total_bytes} [{wide_bar}] {binary_bytes_per_sec}, ETA {eta} · files {msg}")
                    .expect("the template is static")
                    .progress_chars("=> "),
            );
            bar
        });
        Bar {
            bar,
            files: AtomicU64::new(0),
            total_files: AtomicU64::new(0),
        }
    }

    fn show_files(&self) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "{}/{}",
                self.files.load(Ordering::Relaxed),
                self.total_files.load(Ordering::Relaxed)
            ));
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn start(&self, files: u64, bytes: u64) {
        self.total_files.store(files, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_length(bytes);
            bar.reset_eta();
        }
        self.show_files();
    }

    fn bytes(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    fn file_done(&self) {
        self.files.fetch_add(1, Ordering::Relaxed);
        self.show_files();
    }

    fn file_failed(&self, error: &Error) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("error: {error}")),
            None => eprintln!("error: {error}"),
        }
    }
}
