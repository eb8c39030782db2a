//! MD5, the Content-MD5 of Azure Blob: of a buffer, of a file, and of a file that is being
//! written out of order.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

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

/// Hashes a file that parallel ranged downloads fill out of order: told how far the file is
/// complete from its start, it hashes up to there (from the page cache) while the rest is
/// still arriving, so the digest is ready moments after the last byte.
pub struct OrderedHasher {
    complete_upto: std::sync::mpsc::Sender<u64>,
    digest: tokio::task::JoinHandle<std::io::Result<[u8; 16]>>,
}

impl OrderedHasher {
    pub fn spawn(file: Arc<File>) -> Self {
        let (complete_upto, progress) = std::sync::mpsc::channel::<u64>();
        let digest = tokio::task::spawn_blocking(move || {
            let mut hasher = md5::Md5::new();
            let mut pos = 0;
            for upto in progress {
                hash_range(&file, pos, upto, &mut hasher)?;
                pos = upto.max(pos);
            }
            Ok(hasher.finalize().into())
        });
        OrderedHasher {
            complete_upto,
            digest,
        }
    }

    /// The file's bytes `0..upto` are all written.
    pub fn complete_upto(&self, upto: u64) {
        let _ = self.complete_upto.send(upto);
    }

    /// The digest of everything reported complete.
    pub async fn finish(self) -> std::io::Result<[u8; 16]> {
        drop(self.complete_upto);
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
        let hasher = OrderedHasher::spawn(Arc::new(File::open(&path).unwrap()));
        for upto in [0, 1_000_000, 1_000_000, 2_500_000, 3_000_000] {
            hasher.complete_upto(upto);
        }
        assert_eq!(hasher.finish().await.unwrap(), md5_of(&data));
        assert_eq!(hash_file(path, 3_000_000).await.unwrap(), md5_of(&data));
    }
}
