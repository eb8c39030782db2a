//! Resume: a transfer killed at about 90% (the network cut there, then `kill -9`) moves only
//! what is missing when run again, and leaves nothing behind once complete.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::cut::CutProxy;
use common::*;

const MIB: u64 = 1024 * 1024;

/// Starts `datastore <args>` against the datastores file `ds`.
fn start(ds: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_datastore"))
        .args(args)
        .args(["--datastores", ds.to_str().unwrap(), "--datastore", "blob"])
        .args(["--no-progress", "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `counter` reaches `bytes` (the cut), lets the bytes in flight land, then kills
/// the process as `kill -9` would.
async fn kill_at_the_cut(mut child: Child, counter: &std::sync::atomic::AtomicU64, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while counter.load(Ordering::SeqCst) < bytes {
        assert!(
            Instant::now() < deadline,
            "the transfer never reached the cut"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "it ended before the cut"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".datastore-partial-"))
                .collect()
        })
        .unwrap_or_default()
}

/// A fixture holding `big.bin` (`size` bytes from `seed`), and a cutting proxy in front of
/// Azurite that its datastores file now points at.
async fn blob_behind_a_proxy(size: u64, seed: u64) -> (Fixture, Vec<u8>, CutProxy) {
    let f = Fixture::new().await;
    let data = bytes(size as usize, seed);
    write_tree(&f.path("src"), &[("big.bin", data.clone())]);
    let up = f.cli(&[
        "upload",
        "--datastore",
        "blob",
        "--src-dir",
        f.path("src").to_str().unwrap(),
    ]);
    assert_exit(&up, 0);
    let proxy = behind_a_proxy(&f).await;
    (f, data, proxy)
}

/// A cutting proxy in front of Azurite, which the fixture's datastores file now points at.
async fn behind_a_proxy(f: &Fixture) -> CutProxy {
    let proxy = CutProxy::start(azurite_port()).await;
    let endpoint = format!("http://127.0.0.1:{}/{ACCOUNT}", proxy.port);
    f.write_datastores(&f.container, &endpoint, &format!("accountKey: {KEY}"));
    proxy
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_killed_at_90_percent_fetches_only_the_rest_when_run_again() {
    let size = 64 * MIB;
    let (f, data, proxy) = blob_behind_a_proxy(size, 90).await;
    let target = f.path("out");
    let download = ["download", "--target-path", target.to_str().unwrap()];

    proxy.cut_down_after(size * 9 / 10);
    let child = start(&f.datastores(), &download);
    kill_at_the_cut(child, &proxy.down, size * 9 / 10).await;
    assert!(
        !target.join("big.bin").exists(),
        "nothing under the final name"
    );
    assert_eq!(
        partials(&target).len(),
        2,
        "the partial file and its journal stay to resume"
    );

    proxy.mend();
    let before = proxy.down.load(Ordering::SeqCst);
    let started = Instant::now();
    let out = start(&f.datastores(), &download)
        .wait_with_output()
        .unwrap();
    let (moved, took) = (
        proxy.down.load(Ordering::SeqCst) - before,
        started.elapsed(),
    );
    assert_exit(&out, 0);
    let summary = summary(&out);
    eprintln!(
        "resume figure (download): the re-run moved {:.1} MiB of {} MiB ({:.0}%) in {:.2}s; resumed {:.1} MiB",
        moved as f64 / MIB as f64,
        size / MIB,
        100.0 * moved as f64 / size as f64,
        took.as_secs_f64(),
        summary["resumed_bytes"].as_u64().unwrap() as f64 / MIB as f64,
    );
    assert!(
        moved < size / 5,
        "about a tenth moves again, not all: {moved} bytes"
    );
    assert!(
        summary["resumed_bytes"].as_u64().unwrap() > size * 7 / 10,
        "{summary}"
    );
    assert!(
        std::fs::read(target.join("big.bin")).unwrap() == data,
        "byte exact"
    );
    assert_eq!(
        partials(&target),
        Vec::<String>::new(),
        "nothing left behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_killed_at_90_percent_sends_only_the_missing_blocks_when_run_again() {
    let f = Fixture::new().await;
    let size = 96 * MIB;
    let data = bytes(size as usize, 91);
    write_tree(&f.path("src"), &[("big.bin", data.clone())]);
    let proxy = behind_a_proxy(&f).await;
    let src = f.path("src");
    let upload = [
        "upload",
        "--src-dir",
        src.to_str().unwrap(),
        "--concurrency",
        "1",
    ];

    proxy.cut_up_after(size * 9 / 10);
    let child = start(&f.datastores(), &upload);
    kill_at_the_cut(child, &proxy.up, size * 9 / 10).await;
    assert!(
        f.client.list("").await.unwrap().is_empty(),
        "nothing committed"
    );

    proxy.mend();
    let before = proxy.up.load(Ordering::SeqCst);
    let started = Instant::now();
    let out = start(&f.datastores(), &upload).wait_with_output().unwrap();
    let (moved, took) = (proxy.up.load(Ordering::SeqCst) - before, started.elapsed());
    assert_exit(&out, 0);
    let summary = summary(&out);
    eprintln!(
        "resume figure (upload): the re-run sent {:.1} MiB of {} MiB ({:.0}%) in {:.2}s; resumed {:.1} MiB",
        moved as f64 / MIB as f64,
        size / MIB,
        100.0 * moved as f64 / size as f64,
        took.as_secs_f64(),
        summary["resumed_bytes"].as_u64().unwrap() as f64 / MIB as f64,
    );
    assert!(
        moved < size / 4,
        "the missing blocks move again, not all: {moved} bytes"
    );
    let got = f
        .client
        .get("big.bin", None, None)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got[..] == data[..], "the committed blob is byte exact");
    let listed = f.client.list("").await.unwrap();
    assert_eq!(
        listed[0].md5,
        Some(md5(&data)),
        "with the whole file's Content-MD5"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn leftovers_of_killed_runs_are_removed_but_not_a_file_another_run_is_writing() {
    use std::os::unix::io::AsRawFd;
    let f = Fixture::new().await;
    write_tree(&f.path("src"), &[("a.txt", b"a".to_vec())]);
    assert_exit(
        &f.cli(&[
            "upload",
            "--datastore",
            "blob",
            "--src-dir",
            f.path("src").to_str().unwrap(),
        ]),
        0,
    );
    let target = f.path("out");
    std::fs::create_dir_all(&target).unwrap();
    // What kill -9 leaves: a full-length partial file (unlocked), a journal of a resumable
    // file since removed; and a file a live run holds its lock on.
    std::fs::write(
        target.join(".datastore-partial-00000000deadbeef"),
        vec![0; 1 << 20],
    )
    .unwrap();
    std::fs::write(target.join(".datastore-partial-0123.journal"), "x").unwrap();
    let live = target.join(".datastore-partial-00000000000a11fe");
    let held = std::fs::File::create(&live).unwrap();
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);

    let out = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        target.to_str().unwrap(),
    ]);
    assert_exit(&out, 0);
    assert_eq!(
        partials(&target),
        [".datastore-partial-00000000000a11fe"],
        "only the file a live run holds is left"
    );
    drop(held);
}

/// Connections cut mid-body are retried from the last byte written: nothing is fetched twice,
/// and progress ends at the total, never past it.
#[tokio::test(flavor = "multi_thread")]
async fn a_cut_mid_body_resumes_the_range_and_progress_never_passes_the_total() {
    let size = 32 * MIB;
    let (f, data, proxy) = blob_behind_a_proxy(size, 92).await;

    proxy.cut_down_after(size / 2);
    let target = f.path("out");
    let child = Command::new(env!("CARGO_BIN_EXE_datastore"))
        .args([
            "download",
            "--datastores",
            f.datastores().to_str().unwrap(),
            "--datastore",
            "blob",
        ])
        .args(["--target-path", target.to_str().unwrap(), "--progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.down.load(Ordering::SeqCst) < size / 2 {
        assert!(
            Instant::now() < deadline,
            "the download never reached the cut"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.mend();
    let out = child.wait_with_output().unwrap();
    assert_exit(&out, 0);
    assert!(
        std::fs::read(target.join("big.bin")).unwrap() == data,
        "byte exact"
    );
    let moved = proxy.down.load(Ordering::SeqCst);
    assert!(
        moved < size + size / 20,
        "nothing fetched twice: {moved} bytes for {size}"
    );
    let err = stderr(&out);
    let last = err
        .lines()
        .rfind(|l| l.starts_with("progress: "))
        .unwrap_or_default();
    let (done, total) = last
        .trim_start_matches("progress: ")
        .split_once(", ")
        .and_then(|(bytes, _)| bytes.split_once(" of "))
        .unwrap_or_else(|| panic!("a progress line in {err}"));
    assert_eq!(done, total, "{err}");
}

/// The resumable file's name is predictable from the listing: a link planted under it is
/// never followed (the download uses a fresh file instead), so nothing outside is touched.
#[tokio::test(flavor = "multi_thread")]
async fn a_link_planted_under_the_resumable_name_is_not_followed() {
    use sha2::Digest;
    let f = Fixture::new().await;
    let data = bytes(3 * MIB as usize, 93);
    write_tree(&f.path("src"), &[("big.bin", data.clone())]);
    let up = f.cli(&[
        "upload",
        "--datastore",
        "blob",
        "--src-dir",
        f.path("src").to_str().unwrap(),
    ]);
    assert_exit(&up, 0);
    let meta = f.client.list("").await.unwrap().remove(0);
    let etag = meta.etag.unwrap();
    let key: String = sha2::Sha256::digest(format!("big.bin\0{etag}\0{}", meta.size))[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let target = f.path("out");
    std::fs::create_dir_all(&target).unwrap();
    let victim = f.path("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let planted = target.join(format!(".datastore-partial-{key}"));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    std::os::unix::fs::symlink(
        &victim,
        target.join(format!(".datastore-partial-{key}.journal")),
    )
    .unwrap();

    let out = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        target.to_str().unwrap(),
    ]);
    assert_exit(&out, 0);
    assert!(
        std::fs::read(&victim).unwrap() == b"keep me",
        "the file the link points to is untouched"
    );
    assert!(std::fs::read(target.join("big.bin")).unwrap() == data);
    assert!(
        !target
            .join("big.bin")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink(),
        "the target is a file, not the planted link"
    );
}

/// A blob without Content-MD5 (as azcopy and the SDKs write large blobs) whose last range keeps
/// failing: the run fails, and the next one fetches only that range. Its progress was
/// journaled only after the data was synced, the one guard such a blob has.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_download_of_a_blob_without_md5_resumes_when_run_again() {
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};
    let size = 24 * MIB as usize; // three 8 MiB ranges
    let data = Arc::new(bytes(size, 94));
    let broken = Arc::new(AtomicBool::new(true));
    let served = Arc::new(Mutex::new(Vec::<usize>::new()));
    let listing = format!(
        r#"<?xml version="1.0" encoding="utf-8"?><EnumerationResults><Blobs><Blob><Name>big.bin</Name><Properties><Content-Length>{size}</Content-Length><Etag>"v1"</Etag></Properties></Blob></Blobs><NextMarker /></EnumerationResults>"#
    )
    .into_bytes();
    let (d, b, s) = (data.clone(), broken.clone(), served.clone());
    let server = FakeServer::start(Arc::new(move |request: &Request| {
        if request.target.contains("comp=list") {
            return (200, vec![], listing.clone());
        }
        let (start, end) = request.range();
        if b.load(Ordering::SeqCst) && start >= 16 * MIB as usize {
            return (500, error_code("InternalError"), vec![]);
        }
        s.lock().unwrap().push(end - start);
        (206, vec![], d[start..end].to_vec())
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    let target = dir.path().join("out");
    let t = target.clone();
    let run = move || {
        let target = &t;
        Command::new(env!("CARGO_BIN_EXE_datastore"))
            .args([
                "download",
                "--datastores",
                ds.to_str().unwrap(),
                "--datastore",
                "fake",
            ])
            .args([
                "--target-path",
                target.to_str().unwrap(),
                "--output",
                "json",
            ])
            // The range's 500s fail the run once this is spent, not after minutes.
            .args(["--retry-budget", "2s"])
            .args(["--no-progress", "--concurrency", "3"])
            .output()
            .unwrap()
    };
    let failed = tokio::task::spawn_blocking(run.clone()).await.unwrap();
    assert_exit(&failed, 9);
    assert!(!target.join("big.bin").exists());

    broken.store(false, Ordering::SeqCst);
    served.lock().unwrap().clear();
    let out = tokio::task::spawn_blocking(run).await.unwrap();
    assert_exit(&out, 0);
    assert_eq!(
        served.lock().unwrap().iter().sum::<usize>(),
        8 * MIB as usize,
        "only the range that failed is fetched again"
    );
    assert_eq!(summary(&out)["resumed_bytes"], 16 * MIB);
    assert!(
        std::fs::read(target.join("big.bin")).unwrap() == *data,
        "byte exact"
    );
}

/// An upload to a local datastore killed with -9 leaves its temporary file in the datastore's
/// folder; the next upload there removes it.
#[tokio::test(flavor = "multi_thread")]
async fn leftovers_in_a_local_datastore_are_removed_by_the_next_upload() {
    let f = Fixture::new().await;
    write_tree(&f.path("src"), &[("a.txt", b"a".to_vec())]);
    let folder = f.path("localstore/up");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join(".datastore-partial-00000000deadbeef"),
        vec![0; 1 << 20],
    )
    .unwrap();
    let src = f.path("src");
    let out = f.cli(&[
        "upload",
        "--datastore",
        "local",
        "--src-dir",
        src.to_str().unwrap(),
        "--target-path",
        "up",
    ]);
    assert_exit(&out, 0);
    assert_eq!(
        partials(&folder),
        Vec::<String>::new(),
        "the leftover is gone"
    );
    assert_eq!(std::fs::read(folder.join("a.txt")).unwrap(), b"a");
}
