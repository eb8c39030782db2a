//! The contract between the controller and the agent containers it renders: the containers'
//! names, and what each agent writes to its termination message (read back into the
//! Experiment's status). Both sides use this module; neither retypes it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::ObjectMeta;

/// The run Job's init container that fetches `spec.code`.
pub const CODE_CONTAINER: &str = "code";
/// The run Job's container that runs the script.
pub const MAIN_CONTAINER: &str = "main";
/// The prefix of the run Job's init containers that fetch download references.
const DOWNLOAD_PREFIX: &str = "download-";

/// The init container that fetches download reference `n`.
pub fn download_container(n: usize) -> String {
    format!("{DOWNLOAD_PREFIX}{n}")
}

/// Whether `name` is the container of a download reference.
pub fn is_download_container(name: &str) -> bool {
    matches!(agent_of(name), Some(Agent::Download(_)))
}

/// The prefix of the upload Job's containers that store upload references.
const UPLOAD_PREFIX: &str = "upload-";

/// The upload Job's container that stores upload reference `n`.
pub fn upload_container(n: usize) -> String {
    format!("{UPLOAD_PREFIX}{n}")
}

/// What an agent container transfers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agent {
    Code,
    /// Download reference `n` (in the order of `scriptParams`).
    Download(usize),
    /// Upload reference `n`.
    Upload(usize),
}

/// The agent container `name` is, if it is one.
pub fn agent_of(name: &str) -> Option<Agent> {
    let index = |prefix| name.strip_prefix(prefix)?.parse::<usize>().ok();
    if name == CODE_CONTAINER {
        Some(Agent::Code)
    } else if let Some(n) = index(DOWNLOAD_PREFIX) {
        Some(Agent::Download(n))
    } else {
        index(UPLOAD_PREFIX).map(Agent::Upload)
    }
}

/// The CSI driver of the node cache (`datastore csi-node`): the run pod's inline volume of a
/// cached download reference names it, and so does the CSIDriver object the chart creates.
pub const NODE_CACHE_DRIVER: &str = "cache.datastore.dev";

/// The run pod's annotation saying why download container `container` does or does not read
/// from the node cache (present only when the cache was asked for).
pub fn cache_annotation(container: &str) -> String {
    format!("datastore.dev/cache.{container}")
}

/// What an agent writes on stdout every few seconds while it transfers (one JSON line each),
/// read back by the controller from the container's log.
pub use crate::transfer::progress::Snapshot as ProgressLine;

/// Where an agent writes its report: the container's termination message, which the controller
/// reads from the pod's status.
pub const REPORT_FILE: &str = "/dev/termination-log";

/// Kubernetes keeps at most this many bytes of a termination message.
pub const REPORT_LIMIT: usize = 4096;

/// What a successful download saw, as the termination message: `{"files":N,"bytes":N,"digest":"sha256:<hex>"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Files under the folder (those that were already there and skipped included).
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// `sha256:<hex>` over the sorted lines `<relative name>\t<size>\t<content-md5 hex or empty>\n`.
    pub digest: String,
    /// From the node cache: when the node cache published the tree the pod reads (RFC 3339);
    /// the controller compares it with the pod's creation to tell a hit from a miss.
    #[serde(default, rename = "cachedAt", skip_serializing_if = "Option::is_none")]
    pub cached_at: Option<String>,
}

impl Report {
    /// The report of a folder's listing (names relative to the folder).
    pub fn of(blobs: &[ObjectMeta]) -> Report {
        Report {
            files: blobs.len() as u64,
            bytes: blobs.iter().map(|b| b.size).sum(),
            digest: digest(blobs),
            cached_at: None,
        }
    }

    /// Reads a termination message written by a successful download; `None` when the message
    /// is something else (the error sentence of a failed one).
    pub fn parse(message: &str) -> Option<Report> {
        serde_json::from_str(message.trim()).ok()
    }
}

/// What a successful upload did, as the termination message:
/// `{"uploaded":N,"skipped":N,"identical":N,"bytes":N}`. `skipped` counts outputs whose blob
/// existed with other contents and was kept (no `--overwrite`): the controller keeps the
/// outputs volume then, so nothing is lost. `identical` counts those whose blob already held
/// the same bytes (an upload retried after a partial attempt): nothing to keep for them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadReport {
    pub uploaded: u64,
    pub skipped: u64,
    #[serde(default)]
    pub identical: u64,
    pub bytes: u64,
}

impl UploadReport {
    pub fn parse(message: &str) -> Option<UploadReport> {
        serde_json::from_str(message.trim()).ok()
    }
}

/// `sha256:<hex>` over the sorted lines `<name>\t<size>\t<content-md5 hex or empty>\n`: a record
/// of which data a run saw, the same whatever order the listing came in.
pub fn digest(blobs: &[ObjectMeta]) -> String {
    let mut lines: Vec<String> = blobs
        .iter()
        .map(|b| {
            let md5 = b
                .md5
                .map(|m| m.iter().map(|x| format!("{x:02x}")).collect::<String>())
                .unwrap_or_default();
            format!("{}\t{}\t{md5}\n", b.name, b.size)
        })
        .collect();
    lines.sort_unstable();
    let mut hasher = Sha256::new();
    for line in &lines {
        hasher.update(line.as_bytes());
    }
    let hash: String = hasher
        .finalize()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    format!("sha256:{hash}")
}

/// `text` cut to at most `limit` bytes, on a character boundary.
pub fn truncate(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(name: &str, size: u64, md5: Option<[u8; 16]>) -> ObjectMeta {
        ObjectMeta {
            name: name.into(),
            size,
            md5,
            etag: None,
        }
    }

    #[test]
    fn digest_is_sha256_of_the_sorted_lines_whatever_the_order() {
        let a = blob("a.txt", 5, Some([0xab; 16]));
        let b = blob("sub/b.bin", 0, None);
        let expected = {
            let text = format!("a.txt\t5\t{}\nsub/b.bin\t0\t\n", "ab".repeat(16));
            let hash = Sha256::digest(text.as_bytes());
            format!(
                "sha256:{}",
                hash.iter().map(|x| format!("{x:02x}")).collect::<String>()
            )
        };
        assert_eq!(digest(&[a.clone(), b.clone()]), expected);
        assert_eq!(digest(&[b.clone(), a.clone()]), expected);
        assert_ne!(digest(&[a.clone(), blob("sub/b.bin", 1, None)]), expected);
        assert_ne!(digest(&[blob("a.txt", 5, Some([0xac; 16])), b]), expected);
        assert_eq!(
            digest(&[]),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn report_is_the_json_the_controller_reads() {
        let report = Report::of(&[blob("a", 3, None), blob("b", 4, None)]);
        assert_eq!((report.files, report.bytes), (2, 7));
        let text = serde_json::to_string(&report).unwrap();
        assert!(
            text.starts_with(r#"{"files":2,"bytes":7,"digest":"sha256:"#),
            "{text}"
        );
        assert!(text.len() < REPORT_LIMIT);
        assert_eq!(Report::parse(&text), Some(report));
        assert_eq!(Report::parse("cannot reach the storage"), None);
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        // `é` is two bytes: cutting inside it drops it whole.
        assert_eq!(truncate("aé", 2), "a");
        let long = "ü".repeat(REPORT_LIMIT);
        let cut = truncate(&long, REPORT_LIMIT);
        assert!(cut.len() <= REPORT_LIMIT && cut.len() > REPORT_LIMIT - 2);
    }
}
