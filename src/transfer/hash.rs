//! MD5, the Content-MD5 of Azure Blob: of a buffer, of a file, and of a file that is being
//! written out of order.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use md5::Digest;

/// Bytes read per step when hashing from a file.
const READ_SIZE: usize = 1024 * 1024;

pub fn md5_of(data: &[u8]) -> [u8; 16] {
    md5::Md5::digest(data).into()
}

/// The MD5 of the first `len` bytes of a file, read sequentially off the async threads.
pub async fn hash_file(path: PathBuf, len: u64) -> std::io::Result<[u8; 16]> {
    tokio::task::spawn_blocking(move || {
        let file = File::open(&path)?;
        let mut hasher = md5::Md5::new();
        hash_range(&file, 0, len, &mut hasher)?;
        Ok(hasher.finalize().into())
    })
    .await
    .expect("hashing does not panic")
}

fn hash_range(file: &File, mut pos: u64, end: u64, hasher: &mut md5::Md5) -> std::io::Result<()> {
    let mut buf = vec![0u8; READ_SIZE.min((end - pos) as usize)];
    while pos < end {
        let n = buf.len().min((end - pos) as usize);
        file.read_exact_at(&mut buf[..n], pos).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("the file ended before byte {end}: was it changed while being read? ({e})"),
            )
        })?;
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(())
}

/// Hashes a file that parallel ranged downloads fill out of order. Each range reports how far
/// it has written; the hasher reads the complete prefix of the file (from the page cache) as it
/// grows, so the digest is ready moments after the last byte lands.
pub struct OrderedHasher {
    written: Arc<[AtomicU64]>,
    wake: std::sync::mpsc::Sender<()>,
    digest: tokio::task::JoinHandle<std::io::Result<[u8; 16]>>,
}

impl OrderedHasher {
    /// `ranges` are the `(start, end)` byte ranges, in order, that tile the file.
    pub fn spawn(file: Arc<File>, ranges: Vec<(u64, u64)>) -> Self {
        let written: Arc<[AtomicU64]> = ranges
            .iter()
            .map(|&(start, _)| AtomicU64::new(start))
            .collect();
        let (wake, woken) = std::sync::mpsc::channel::<()>();
        let progress = written.clone();
        let digest = tokio::task::spawn_blocking(move || {
            let mut hasher = md5::Md5::new();
            let (mut pos, mut current) = (0, 0);
            loop {
                while let Some(&(_, end)) = ranges.get(current) {
                    let upto = progress[current].load(Ordering::Acquire);
                    if upto > pos {
                        hash_range(&file, pos, upto, &mut hasher)?;
                        pos = upto;
                    }
                    if upto < end {
                        break;
                    }
                    current += 1;
                }
                // Done, or the download gave up (the sender is gone): stop either way.
                if current == ranges.len() || woken.recv().is_err() {
                    break;
                }
            }
            Ok(hasher.finalize().into())
        });
        OrderedHasher {
            written,
            wake,
            digest,
        }
    }

    /// Range `index` has its bytes up to `upto` (absolute offset) written.
    pub fn written(&self, index: usize, upto: u64) {
        // A retried range writes the same bytes again: the mark never moves back.
        self.written[index].fetch_max(upto, Ordering::Release);
        let _ = self.wake.send(());
    }

    /// The digest of the prefix written so far (the whole file after a complete download).
    pub async fn finish(self) -> std::io::Result<[u8; 16]> {
        drop(self.wake);
        self.digest.await.expect("hashing does not panic")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ordered_hashing_matches_the_whole_file_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let ranges = vec![
            (0, 1_000_000),
            (1_000_000, 2_000_000),
            (2_000_000, 3_000_000),
        ];
        let hasher = OrderedHasher::spawn(Arc::new(File::open(&path).unwrap()), ranges);
        // Out of order and in pieces, as parallel ranges report.
        for (range, upto) in [
            (2, 2_500_000),
            (1, 2_000_000),
            (0, 400_000),
            (2, 3_000_000),
            (0, 1_000_000),
        ] {
            hasher.written(range, upto);
        }
        assert_eq!(hasher.finish().await.unwrap(), md5_of(&data));
        assert_eq!(hash_file(path, 3_000_000).await.unwrap(), md5_of(&data));
    }
}
