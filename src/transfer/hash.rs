//! MD5, the Content-MD5 of Azure Blob: of a buffer, and of files, including files that parallel
//! downloads are still writing out of order.
//!
//! Every file of a run is hashed by one thread ([`Hashers`]): MD5 is sequential within a file,
//! but the files of a run are independent, and that thread hashes up to eight of them at once
//! in the lanes of AVX2 registers (about six times the throughput of one scalar stream here).
//! It reads each file back from the page cache as its complete prefix grows, so hashing
//! overlaps the transfer and holds no bytes in memory for it.

mod md5;
#[cfg(target_arch = "x86_64")]
mod md5x8;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Bytes read per file per step of the hashing thread (a multiple of 64, MD5's block).
const STEP: usize = 256 * 1024;
/// Files hashed together in one step.
pub const LANES: usize = 8;
/// How far a file's hashing may fall behind its writing while the thread waits to fill lanes.
const BACKLOG: u64 = 16 * 1024 * 1024;

pub fn md5_of(data: &[u8]) -> [u8; 16] {
    md5::digest(data)
}

/// The hashing thread of a run. It starts with the first file tracked and ends when the last
/// handle to it is gone.
#[derive(Clone)]
pub struct Hashers {
    worker: Arc<Mutex<Option<mpsc::Sender<Msg>>>>,
    lanes: bool,
}

impl Default for Hashers {
    fn default() -> Self {
        Hashers {
            worker: Arc::default(),
            lanes: simd_available(),
        }
    }
}

impl Hashers {
    /// Scalar only, one file at a time: the reference the lanes are tested against.
    #[cfg(test)]
    fn scalar() -> Self {
        Hashers {
            worker: Arc::default(),
            lanes: false,
        }
    }

    /// Hashes `file`, which the caller fills through `ranges` (the `(start, end)` byte ranges,
    /// in order, that tile it), following the complete prefix as [`Tracked::written`] reports
    /// it.
    pub fn track(&self, file: Arc<File>, ranges: Vec<(u64, u64)>) -> Tracked {
        let shared = Arc::new(Shared {
            written: ranges
                .iter()
                .map(|&(start, _)| AtomicU64::new(start))
                .collect(),
            finishing: AtomicBool::new(false),
        });
        let (done, digest) = oneshot::channel();
        let job = Job {
            file,
            ranges,
            shared: shared.clone(),
            done: Some(done),
            current: 0,
            pos: 0,
            state: md5::INIT,
        };
        let wake = self.sender();
        // A worker that is gone drops the job, and with it `done`: `finish` reports that.
        let _ = wake.send(Msg::Track(Box::new(job)));
        Tracked {
            shared,
            wake,
            digest,
        }
    }

    /// The MD5 of the first `len` bytes of the file at `path`.
    pub async fn hash_file(&self, path: PathBuf, len: u64) -> std::io::Result<[u8; 16]> {
        let file = tokio::task::spawn_blocking(move || File::open(&path))
            .await
            .expect("opening does not panic")?;
        let tracked = self.track(Arc::new(file), vec![(0, len)]);
        tracked.written(0, len);
        tracked.finish().await
    }

    fn sender(&self) -> mpsc::Sender<Msg> {
        let mut worker = self.worker.lock().expect("the lock is never poisoned");
        if let Some(tx) = worker.as_ref() {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel();
        let lanes = self.lanes;
        std::thread::Builder::new()
            .name("md5".into())
            .spawn(move || run_worker(rx, lanes))
            .expect("a thread can be started");
        // The worker ends when this and every tracked file's sender are gone.
        *worker = Some(tx.clone());
        tx
    }
}

impl Drop for Hashers {
    fn drop(&mut self) {
        // The last clone lets the thread go once the files it still tracks are finished.
        if Arc::strong_count(&self.worker) == 1 {
            self.worker
                .lock()
                .expect("the lock is never poisoned")
                .take();
        }
    }
}

/// A file being hashed as it is written.
pub struct Tracked {
    shared: Arc<Shared>,
    wake: mpsc::Sender<Msg>,
    digest: oneshot::Receiver<std::io::Result<[u8; 16]>>,
}

impl Tracked {
    /// Range `index` has its bytes up to `upto` (absolute offset) written.
    pub fn written(&self, index: usize, upto: u64) {
        // A retried range writes the same bytes again: the mark never moves back.
        self.shared.written[index].fetch_max(upto, Ordering::Release);
        let _ = self.wake.send(Msg::Wake);
    }

    /// The digest of the prefix written so far (the whole file after a complete transfer).
    pub async fn finish(mut self) -> std::io::Result<[u8; 16]> {
        self.shared.finishing.store(true, Ordering::Release);
        let _ = self.wake.send(Msg::Wake);
        (&mut self.digest)
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("the hashing thread stopped")))
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Unfinished: the transfer gave up, and the worker can let go of the file now.
        let _ = self.wake.send(Msg::Wake);
    }
}

/// What a [`Tracked`] handle and the worker share.
struct Shared {
    written: Box<[AtomicU64]>,
    finishing: AtomicBool,
}

enum Msg {
    Track(Box<Job>),
    Wake,
}

struct Job {
    file: Arc<File>,
    ranges: Vec<(u64, u64)>,
    shared: Arc<Shared>,
    done: Option<oneshot::Sender<std::io::Result<[u8; 16]>>>,
    /// The range holding `pos`.
    current: usize,
    /// Bytes hashed so far: always whole 64-byte blocks until the final step.
    pos: u64,
    state: [u32; 4],
}

impl Job {
    /// The end of the complete prefix written so far.
    fn prefix(&mut self) -> u64 {
        while let Some(&(_, end)) = self.ranges.get(self.current) {
            let upto = self.shared.written[self.current].load(Ordering::Acquire);
            if upto < end {
                return upto;
            }
            self.current += 1;
        }
        self.ranges.last().map_or(0, |&(_, end)| end)
    }

    /// Bytes written and not yet hashed.
    fn backlog(&mut self) -> u64 {
        self.prefix() - self.pos
    }

    /// The handle is gone without finishing: the transfer gave up.
    fn abandoned(&self) -> bool {
        Arc::strong_count(&self.shared) == 1 && !self.shared.finishing.load(Ordering::Acquire)
    }

    /// Whole blocks to hash now (at most one step's worth).
    fn ready(&mut self) -> usize {
        let available = self.prefix() - self.pos;
        (available.min(STEP as u64) / 64 * 64) as usize
    }

    /// Finishes the digest when the handle asked for it and every written byte is hashed.
    fn try_finish(&mut self) -> bool {
        if !self.shared.finishing.load(Ordering::Acquire) {
            return false;
        }
        let end = self.prefix();
        if end - self.pos >= 64 {
            return false;
        }
        let result = self.finalize(end);
        if let Some(done) = self.done.take() {
            let _ = done.send(result);
        }
        true
    }

    /// Hashes the last bytes, fewer than a block, with MD5's padding.
    fn finalize(&mut self, end: u64) -> std::io::Result<[u8; 16]> {
        let mut tail = [0u8; 64];
        let tail = &mut tail[..(end - self.pos) as usize];
        read_at(&self.file, tail, self.pos)?;
        Ok(md5::finish(self.state, tail, end))
    }

    fn fail(&mut self, e: std::io::Error) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Err(e));
        }
    }
}

fn read_at(file: &File, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
    file.read_exact_at(buf, pos).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "the file ended before byte {}: was it changed while being read? ({e})",
                pos + buf.len() as u64
            ),
        )
    })
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return md5x8::available();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// The hashing thread: each step reads the next bytes of up to [`LANES`] files that have some
/// ready and hashes them together.
fn run_worker(rx: mpsc::Receiver<Msg>, lanes: bool) {
    let width = if lanes { LANES } else { 1 };
    let mut jobs: Vec<Job> = Vec::new();
    let mut buffers: Vec<Vec<u8>> = (0..width).map(|_| vec![0u8; STEP]).collect();
    loop {
        // Sleep until a step is worth taking, then take what arrived.
        if !worth_a_step(&mut jobs, width) {
            match rx.recv() {
                Ok(Msg::Track(job)) => jobs.push(*job),
                Ok(Msg::Wake) => {}
                Err(_) => return,
            }
        }
        for msg in rx.try_iter() {
            if let Msg::Track(job) = msg {
                jobs.push(*job);
            }
        }
        jobs.retain_mut(|j| !j.abandoned() && !j.try_finish());
        if !worth_a_step(&mut jobs, width) {
            continue;
        }

        // Round robin: the files served this step go to the back of the line.
        let mut picked = Vec::with_capacity(width);
        for (i, job) in jobs.iter_mut().enumerate() {
            if picked.len() == width {
                break;
            }
            let n = job.ready();
            if n > 0 {
                picked.push((i, n));
            }
        }
        for (lane, &(i, n)) in picked.iter().enumerate() {
            let job = &mut jobs[i];
            if let Err(e) = read_at(&job.file, &mut buffers[lane][..n], job.pos) {
                job.fail(e);
            }
        }
        hash_lanes(&mut jobs, &picked, &buffers);
        for &(i, n) in &picked {
            jobs[i].pos += n as u64;
        }
        let served: Vec<usize> = picked.iter().map(|&(i, _)| i).collect();
        rotate_to_back(&mut jobs, &served);
        jobs.retain_mut(|j| j.done.is_some() && !j.try_finish());
    }
}

/// Whether to hash now. With lanes and several files, wait until enough of them have a full
/// step ready to fill the lanes: hashing whatever one file has as soon as it lands would run
/// the scalar code most of the time. Waiting costs no memory (the bytes are in the file) and
/// ends when a file is finishing or one falls [`BACKLOG`] behind.
fn worth_a_step(jobs: &mut [Job], width: usize) -> bool {
    let mut full = 0;
    for job in jobs.iter_mut() {
        let ready = job.ready();
        if ready > 0 && (job.shared.finishing.load(Ordering::Acquire) || job.backlog() >= BACKLOG) {
            return true;
        }
        full += usize::from(ready == STEP);
    }
    let wanted = jobs.len().min(width);
    if wanted <= 1 {
        return jobs.iter_mut().any(|j| j.ready() > 0);
    }
    full >= wanted
}

/// Hashes `picked` (job index, bytes) out of the lane buffers: lanes of AVX2 when two or more
/// files have bytes, scalar for one.
fn hash_lanes(jobs: &mut [Job], picked: &[(usize, usize)], buffers: &[Vec<u8>]) {
    #[cfg(target_arch = "x86_64")]
    if picked.len() > 1 {
        let mut states = [md5::INIT; LANES];
        for (lane, &(i, _)) in picked.iter().enumerate() {
            states[lane] = jobs[i].state;
        }
        let mut done = vec![0usize; picked.len()];
        // Lanes advance together by the shortest remainder; empty lanes replay another lane's
        // bytes into a state that is thrown away.
        let remainder = |done: &[usize]| {
            picked
                .iter()
                .zip(done)
                .map(|(&(_, n), &d)| n - d)
                .filter(|&r| r > 0)
                .min()
        };
        while let Some(step) = remainder(&done) {
            let filler = picked
                .iter()
                .zip(&done)
                .position(|(&(_, n), &d)| n > d)
                .expect("a lane has bytes left");
            let slices: [&[u8]; LANES] = std::array::from_fn(|lane| match picked.get(lane) {
                Some(&(_, n)) if n > done[lane] => &buffers[lane][done[lane]..n],
                _ => &buffers[filler][done[filler]..picked[filler].1],
            });
            let mut work = states;
            // SAFETY: the worker uses lanes only when `md5x8::available()` said yes.
            unsafe { md5x8::compress8(&mut work, slices, step / 64) };
            for lane in 0..picked.len() {
                if picked[lane].1 > done[lane] {
                    states[lane] = work[lane];
                    done[lane] += step;
                }
            }
        }
        for (lane, &(i, _)) in picked.iter().enumerate() {
            jobs[i].state = states[lane];
        }
        return;
    }
    for (lane, &(i, n)) in picked.iter().enumerate() {
        md5::compress_all(&mut jobs[i].state, &buffers[lane][..n]);
    }
}

/// Moves the jobs at `served` (ascending indices) behind the others, keeping both groups'
/// order.
fn rotate_to_back(jobs: &mut Vec<Job>, served: &[usize]) {
    let mut taken = Vec::with_capacity(served.len());
    for &i in served.iter().rev() {
        if i < jobs.len() {
            taken.push(jobs.remove(i));
        }
    }
    jobs.extend(taken.into_iter().rev());
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::md5::Digest;

    /// The md-5 crate's digest: a reference independent of ours.
    fn reference(data: &[u8]) -> [u8; 16] {
        ::md5::Md5::digest(data).into()
    }

    fn data(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2654435761).max(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn file_of(dir: &std::path::Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[tokio::test]
    async fn ordered_hashing_matches_the_whole_file_digest() {
        let dir = tempfile::tempdir().unwrap();
        let data = data(3_000_000, 1);
        let path = file_of(dir.path(), "f", &data);
        let ranges = vec![
            (0, 1_000_000),
            (1_000_000, 2_000_000),
            (2_000_000, 3_000_000),
        ];
        for hashers in [Hashers::default(), Hashers::scalar()] {
            let tracked = hashers.track(Arc::new(File::open(&path).unwrap()), ranges.clone());
            // Out of order and in pieces, as parallel ranges report.
            for (range, upto) in [
                (2, 2_500_000),
                (1, 2_000_000),
                (0, 400_000),
                (2, 3_000_000),
                (0, 1_000_000),
            ] {
                tracked.written(range, upto);
            }
            assert_eq!(tracked.finish().await.unwrap(), reference(&data));
        }
    }

    /// Many files at once, of lengths around MD5's block and padding edges and beyond one
    /// step, take the lanes together and each gets its own digest.
    #[tokio::test]
    async fn files_hashed_together_each_get_their_own_digest() {
        let dir = tempfile::tempdir().unwrap();
        let lens = [
            0,
            1,
            55,
            56,
            63,
            64,
            65,
            119,
            120,
            4096,
            STEP - 1,
            STEP,
            STEP + 64,
            3 * STEP + 17,
            1_000_003,
            2_500_000,
            77,
            STEP * 2,
        ];
        let files: Vec<(PathBuf, Vec<u8>)> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let bytes = data(len, i as u32 + 7);
                (file_of(dir.path(), &format!("f{i}"), &bytes), bytes)
            })
            .collect();
        for hashers in [Hashers::default(), Hashers::scalar()] {
            let digests = futures::future::join_all(
                files
                    .iter()
                    .map(|(path, bytes)| hashers.hash_file(path.clone(), bytes.len() as u64)),
            )
            .await;
            for ((_, bytes), digest) in files.iter().zip(digests) {
                assert_eq!(digest.unwrap(), reference(bytes), "{} bytes", bytes.len());
            }
        }
    }

    #[test]
    fn eight_lanes_match_the_scalar_code() {
        if !simd_available() {
            return;
        }
        let lanes: Vec<Vec<u8>> = (0..8).map(|l| data(64 * 37, l + 1)).collect();
        let mut states = [md5::INIT; LANES];
        for (l, s) in states.iter_mut().enumerate() {
            s[0] ^= l as u32; // distinct starting states, as files part way through have
        }
        let mut expected = states;
        #[cfg(target_arch = "x86_64")]
        unsafe {
            md5x8::compress8(&mut states, std::array::from_fn(|l| &lanes[l][..]), 37)
        };
        for (l, e) in expected.iter_mut().enumerate() {
            md5::compress_all(e, &lanes[l]);
        }
        assert_eq!(states, expected);
    }

    /// With lanes, one file's fresh bytes alone do not start a step (it would run scalar)
    /// until a full set of files has a step ready, a file is finishing or one falls behind.
    #[test]
    fn steps_wait_to_fill_the_lanes() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_of(dir.path(), "f", &data(64, 1));
        let job = |written: u64| Job {
            file: Arc::new(File::open(&path).unwrap()),
            ranges: vec![(0, 1 << 30)],
            shared: Arc::new(Shared {
                written: vec![AtomicU64::new(written)].into(),
                finishing: AtomicBool::new(false),
            }),
            done: None,
            current: 0,
            pos: 0,
            state: md5::INIT,
        };
        let step = STEP as u64;
        let mut jobs = vec![job(step), job(100_000), job(0)];
        assert!(!worth_a_step(&mut jobs, LANES), "one full file of three");
        assert!(worth_a_step(&mut jobs, 1), "without lanes, anything ready");
        jobs[1].shared.written[0].store(step, Ordering::Release);
        jobs[2].shared.written[0].store(step + 5, Ordering::Release);
        assert!(worth_a_step(&mut jobs, LANES), "every file has a step");
        let mut jobs = vec![job(100_000), job(0)];
        jobs[0].shared.finishing.store(true, Ordering::Release);
        assert!(worth_a_step(&mut jobs, LANES), "a finishing file");
        let mut jobs = vec![job(BACKLOG), job(0)];
        assert!(worth_a_step(&mut jobs, LANES), "a file fallen behind");
        let mut jobs = vec![job(64)];
        assert!(worth_a_step(&mut jobs, LANES), "a file alone");
    }

    #[tokio::test]
    async fn a_file_shorter_than_it_was_said_to_be_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_of(dir.path(), "short", &data(1000, 3));
        let err = Hashers::default().hash_file(path, 5000).await.unwrap_err();
        assert!(
            err.to_string().contains("changed while being read"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_abandoned_file_does_not_hold_up_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(1_000_000, 9);
        let path = file_of(dir.path(), "f", &bytes);
        let hashers = Hashers::default();
        let gone = hashers.track(Arc::new(File::open(&path).unwrap()), vec![(0, 1_000_000)]);
        gone.written(0, 300_000);
        drop(gone);
        assert_eq!(
            hashers.hash_file(path, 1_000_000).await.unwrap(),
            reference(&bytes)
        );
    }
}
