//! Resuming large downloads. A large blob with an ETag downloads into a temporary file named
//! after its name, version and size, with a journal beside it recording how far each range
//! has been written. An interrupted run (killed, cut off, stopped by a signal) leaves both; the
//! next run of the same blob version fetches only what is missing. Integrity does not rest on
//! the journal alone: every read is pinned to the listed ETag, and a blob with a Content-MD5 is
//! hashed whole again, resumed bytes included.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Mutex;

use sha2::Digest;

use crate::store::ObjectMeta;

const HEADER: &str = "datastore-resume 1";

/// A blob without Content-MD5 records its progress only after syncing the data, this often
/// per range: what a crash of the machine could lose is never taken as written.
pub const SYNC_EVERY: u64 = 16 * 1024 * 1024;

/// The name part of the resumable temporary file of this version of a blob, or `None` when
/// the blob has no version to pin (local datastores).
pub fn key(meta: &ObjectMeta) -> Option<String> {
    let etag = meta.etag.as_deref()?;
    let digest = sha2::Sha256::digest(format!("{}\0{etag}\0{}", meta.name, meta.size));
    Some(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
}

/// How far each range of one file has been written, kept in a small append-only text file:
/// a header naming the file size and range size, then a line `<range> <offset>` each time a
/// range has written up to that offset.
pub struct Journal {
    file: Mutex<File>,
    /// The range size this file is cut into (an earlier run's, when resuming).
    pub range: u64,
    /// Per range, the offset up to which its bytes are on disk.
    pub done: Vec<u64>,
}

impl Journal {
    /// Opens the journal at `path` for the `size`-byte `data` file. A valid earlier journal for
    /// the same size is taken up with its range size; anything else starts over with `range`
    /// (the data file is then emptied and sized).
    pub fn open(path: &Path, data: &File, size: u64, range: u64) -> io::Result<Journal> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{} is not a regular file: remove it",
                path.display()
            )));
        }
        let mut text = String::new();
        let earlier = file
            .read_to_string(&mut text)
            .ok()
            .and_then(|_| parse(&text, size));
        if let Some((range, done)) = earlier
            && data.metadata()?.len() == size
        {
            return Ok(Journal {
                file: Mutex::new(file),
                range,
                done,
            });
        }
        file.set_len(0)?;
        writeln!(file, "{HEADER} {size} {range}")?;
        // Drop an earlier run's bytes, but never truncate an empty file: on ext4 a truncation
        // to zero makes the file's close flush every page written since (auto_da_alloc),
        // which cost a fresh 1 GiB download a third of a second.
        if data.metadata()?.len() > 0 {
            data.set_len(0)?;
        }
        data.set_len(size)?;
        Ok(Journal {
            file: Mutex::new(file),
            range,
            done: ranges(size, range)
                .iter()
                .map(|&(start, _)| start)
                .collect(),
        })
    }

    /// Range `index` has its bytes up to `upto` on disk.
    pub fn record(&self, index: usize, upto: u64) -> io::Result<()> {
        let line = format!("{index} {upto}\n");
        self.file
            .lock()
            .expect("not poisoned")
            .write_all(line.as_bytes())
    }
}

/// The `(start, end)` ranges of `range` bytes that tile a file of `size` bytes.
pub fn ranges(size: u64, range: u64) -> Vec<(u64, u64)> {
    (0..size.div_ceil(range))
        .map(|i| (i * range, ((i + 1) * range).min(size)))
        .collect()
}

/// The range size and per-range progress a journal records, if it is one for `size` bytes.
/// A torn last line (the process was killed mid-write) is ignored.
fn parse(text: &str, size: u64) -> Option<(u64, Vec<u64>)> {
    let mut lines = text.split_inclusive('\n').filter(|l| l.ends_with('\n'));
    let header = lines.next()?.trim_end().strip_prefix(HEADER)?;
    let mut fields = header.split_whitespace().map(|f| f.parse::<u64>().ok());
    let (listed, range) = (fields.next()??, fields.next()??);
    if listed != size || range == 0 {
        return None;
    }
    let tiles = ranges(size, range);
    let mut done: Vec<u64> = tiles.iter().map(|&(start, _)| start).collect();
    for line in lines {
        let mut f = line.split_whitespace().map(|f| f.parse::<u64>().ok());
        let (Some(Some(index)), Some(Some(upto))) = (f.next(), f.next()) else {
            continue;
        };
        if let Some(&(start, end)) = tiles.get(index as usize)
            && (start..=end).contains(&upto)
        {
            done[index as usize] = done[index as usize].max(upto);
        }
    }
    Some((range, done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_is_taken_up_only_for_the_same_size_and_torn_lines_are_ignored() {
        let text = format!("{HEADER} 100 40\n0 10\n1 60\n0 40\n2 90\n1 7");
        assert_eq!(parse(&text, 100), Some((40, vec![40, 60, 90])));
        assert_eq!(parse(&text, 101), None, "another size: start over");
        let out_of_range = format!("{HEADER} 100 40\n0 50\n5 10\n");
        assert_eq!(parse(&out_of_range, 100), Some((40, vec![0, 40, 80])));
        assert_eq!(parse("garbage\n0 10\n", 100), None);
    }

    #[test]
    fn reopening_resumes_and_a_fresh_journal_sizes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (data_path, journal) = (dir.path().join("d"), dir.path().join("d.journal"));
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .unwrap();
        let j = Journal::open(&journal, &data, 100, 40).unwrap();
        assert_eq!((j.range, j.done.clone()), (40, vec![0, 40, 80]));
        assert_eq!(data.metadata().unwrap().len(), 100);
        j.record(1, 70).unwrap();
        drop(j);
        let j = Journal::open(&journal, &data, 100, 8).unwrap();
        assert_eq!(
            (j.range, j.done),
            (40, vec![0, 70, 80]),
            "the earlier cut wins"
        );
    }
}
