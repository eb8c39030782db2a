//! Safety: nothing written outside the target, nothing partial under a final name, corruption
//! detected, bounded retries.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use datastore_operator::store::azure::{BlockIds, Body};

#[tokio::test(flavor = "multi_thread")]
async fn traversal_names_are_refused_and_nothing_is_written() {
    let listing = listing_xml(&[
        ("fine.txt", 5, false),
        ("../escape.txt", 5, false),
        ("ok/../../escape2.txt", 5, false),
        ("/abs.txt", 5, false),
        ("nul%00byte.txt", 5, true),
        ("win\\..\\escape3.txt", 5, false),
    ]);
    let server = FakeServer::listing(listing, b"pwned".to_vec(), Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    let target = dir.path().join("deep/target");
    let out = download_fake(ds, target, &[]).await;
    assert_exit(&out, 8);
    let err = stderr(&out);
    for name in [
        "../escape.txt",
        "ok/../../escape2.txt",
        "/abs.txt",
        "nul\\0byte.txt",
    ] {
        assert!(err.contains(name), "the error names {name}: {err}");
    }
    assert!(err.contains("nothing was written"), "{err}");
    // Not even the safe blob was fetched: the plan is refused before any transfer.
    assert!(
        server.requests().iter().all(|r| r.contains("comp=list")),
        "{:?}",
        server.requests()
    );
    let mut left: Vec<_> = walk(dir.path());
    left.sort();
    assert_eq!(
        left,
        ["fake.yaml"],
        "not even the target directory is created"
    );
}

/// `datastore download` of the scripted datastore `fake` (from `ds`) into `target`.
async fn download_fake(
    ds: std::path::PathBuf,
    target: std::path::PathBuf,
    extra: &[&'static str],
) -> std::process::Output {
    with_fake("download", ds, "--target-path", target, extra).await
}

/// `datastore upload` of `src` to the scripted datastore `fake` (from `ds`).
async fn upload_fake(
    ds: std::path::PathBuf,
    src: std::path::PathBuf,
    extra: &[&'static str],
) -> std::process::Output {
    with_fake("upload", ds, "--src-dir", src, extra).await
}

async fn with_fake(
    command: &'static str,
    ds: std::path::PathBuf,
    flag: &'static str,
    dir: std::path::PathBuf,
    extra: &[&'static str],
) -> std::process::Output {
    let extra = extra.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut args = vec![command, "--datastores", ds.to_str().unwrap()];
        args.extend(["--datastore", "fake", flag, dir.to_str().unwrap()]);
        args.extend(extra);
        args.push("--no-progress");
        datastore(&args)
    })
    .await
    .unwrap()
}

fn walk(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).unwrap().flatten() {
        out.push(e.file_name().to_string_lossy().into_owned());
        if e.file_type().unwrap().is_dir() {
            out.extend(
                walk(&e.path())
                    .into_iter()
                    .map(|s| format!("{}/{s}", e.file_name().to_string_lossy())),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_colliding_with_a_directory_is_reported_not_merged() {
    let f = Fixture::new().await;
    for name in ["set/a", "set/a/b", "set/c"] {
        f.client
            .put_blob(
                name,
                Body::Bytes(name.as_bytes().to_vec().into()),
                md5(name.as_bytes()),
                false,
            )
            .await
            .unwrap();
    }
    let out = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        f.path("out").to_str().unwrap(),
    ]);
    assert_exit(&out, 8);
    let err = stderr(&out);
    assert!(
        err.contains("'set/a' is both a file and the directory of 'set/a/b'"),
        "{err}"
    );
    assert!(
        read_tree(&f.path("out")).is_empty(),
        "nothing is written when the plan is refused"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_content_md5_mismatch_fails_loudly_and_leaves_no_file() {
    let f = Fixture::new().await;
    // Put Block List stores x-ms-blob-content-md5 without checking it: a way to make a blob
    // whose bytes and Content-MD5 disagree, as corruption at rest would.
    let wrong = md5(b"something else");
    for (name, data) in [
        ("small.bin", bytes(1000, 1)),
        ("medium.bin", bytes(2 * 1024 * 1024, 2)),
        ("large.bin", bytes(9 * 1024 * 1024, 3)),
    ] {
        let ids = BlockIds::new();
        f.client
            .put_block(name, &ids, 0, Body::Bytes(data.into()))
            .await
            .unwrap();
        f.client
            .put_block_list(name, &ids, 1, wrong, false)
            .await
            .unwrap();
    }
    f.client
        .put_blob("good.txt", Body::Bytes("good".into()), md5(b"good"), false)
        .await
        .unwrap();

    let out = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        f.path("out").to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_exit(&out, 7);
    let s = summary(&out);
    assert_eq!(
        (s["transferred"].as_u64(), s["failed"].as_u64()),
        (Some(1), Some(3)),
        "{s}"
    );
    assert_eq!(s["error"]["reason"], "IntegrityError");
    let err = stderr(&out);
    for name in ["small.bin", "medium.bin", "large.bin"] {
        assert!(
            err.contains(&format!("blob '{name}' does not match its Content-MD5")),
            "{err}"
        );
    }
    // Only the good file is there: no corrupt file under its final name, no temporary file.
    assert_eq!(walk(&f.path("out")), ["good.txt"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_download_leaves_only_complete_files_and_a_rerun_finishes() {
    let f = Fixture::new().await;
    let files: Vec<(String, Vec<u8>)> = (0..48)
        .map(|i| (format!("f{i:02}.bin"), bytes(3 * 1024 * 1024 + i, i as u64)))
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    write_tree(&f.path("src"), &refs);
    assert_exit(
        &f.cli(&[
            "upload",
            "--datastore",
            "blob",
            "--src-dir",
            f.path("src").to_str().unwrap(),
            "--concurrency",
            "8",
        ]),
        0,
    );

    let out_dir = f.path("out");
    let ds = f.datastores();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_datastore"))
        .args([
            "download",
            "--datastore",
            "blob",
            "--concurrency",
            "1",
            "--no-progress",
        ])
        .args([
            "--datastores",
            ds.to_str().unwrap(),
            "--target-path",
            out_dir.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it (SIGKILL: no cleanup runs) as soon as the first file is complete.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !files.iter().any(|(n, _)| out_dir.join(n).exists()) {
        assert!(
            Instant::now() < deadline,
            "the download never produced a file"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let present: Vec<&(String, Vec<u8>)> = files
        .iter()
        .filter(|(n, _)| out_dir.join(n).exists())
        .collect();
    assert!(
        present.len() < files.len(),
        "the download was interrupted before it finished"
    );
    for (name, data) in &present {
        assert!(
            std::fs::read(out_dir.join(name)).unwrap() == *data,
            "{name} under its final name is complete"
        );
    }

    let rerun = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        out_dir.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_exit(&rerun, 0);
    let s = summary(&rerun);
    assert_eq!(s["skipped"].as_u64(), Some(present.len() as u64));
    assert_eq!(
        s["transferred"].as_u64(),
        Some((files.len() - present.len()) as u64)
    );
    let mut expected: Vec<(String, Vec<u8>)> = files.clone();
    expected.sort();
    // SIGKILL runs no cleanup: the killed run's temporary files may remain, hidden and under
    // their own names only; every final name holds its complete file.
    let (temps, finals): (Vec<_>, Vec<_>) = read_tree(&out_dir)
        .into_iter()
        .partition(|(name, _)| name.starts_with(".datastore-partial-"));
    assert!(finals == expected, "every file is complete");
    assert!(
        temps.len() <= 1,
        "at most the one file in flight was left: {}",
        temps.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_is_retried_within_the_retry_budget_honouring_retry_after() {
    // Throttled twice, then an empty listing: the run succeeds after three requests.
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let c = calls.clone();
    let server = FakeServer::start(Arc::new(move |_| {
        if c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
            (
                503,
                vec![("x-ms-error-code".into(), "ServerBusy".into())],
                vec![],
            )
        } else {
            (200, vec![], listing_xml(&[]))
        }
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    let target = dir.path().join("t");
    let (ds2, t2) = (ds.clone(), target.clone());
    let ok = download_fake(ds2, t2, &[]).await;
    assert_exit(&ok, 0);
    assert_eq!(server.requests().len(), 3);

    // Throttled once with Retry-After: 2, then answered: the second request waits as asked.
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let c = calls.clone();
    let server = FakeServer::start(Arc::new(move |_| {
        if c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 1 {
            (
                503,
                vec![
                    ("x-ms-error-code".into(), "ServerBusy".into()),
                    ("Retry-After".into(), "2".into()),
                ],
                vec![],
            )
        } else {
            (200, vec![], listing_xml(&[]))
        }
    }))
    .await;
    let ds = fake_datastores(dir.path(), server.port);
    let started = std::time::Instant::now();
    let waited = download_fake(ds, target.clone(), &[]).await;
    assert_exit(&waited, 0);
    assert_eq!(server.requests().len(), 2);
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "Retry-After honoured: {:?}",
        started.elapsed()
    );

    // Always throttled: the run gives up once the budget is spent, with the service's code
    // and the budget in its message.
    let server = FakeServer::start(Arc::new(|_| {
        (
            503,
            vec![("x-ms-error-code".into(), "ServerBusy".into())],
            vec![],
        )
    }))
    .await;
    let ds = fake_datastores(dir.path(), server.port);
    let started = std::time::Instant::now();
    let failed = download_fake(ds, target, &["--retry-budget", "3s"]).await;
    let took = started.elapsed();
    assert_exit(&failed, 9);
    let err = stderr(&failed);
    assert!(
        err.contains("ServerBusy") && err.contains("retry budget of 3s"),
        "{err}"
    );
    let tries = server.requests().len();
    assert!((3..=12).contains(&tries), "{tries} tries in 3s");
    assert!(
        took >= std::time::Duration::from_secs(1) && took < std::time::Duration::from_secs(15),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_bounds_the_requests_in_flight() {
    let names: Vec<String> = (0..40).map(|i| format!("f{i}")).collect();
    let entries: Vec<(&str, u64, bool)> = names.iter().map(|n| (n.as_str(), 2, false)).collect();
    let listing = listing_xml(&entries);
    let server = FakeServer::listing(listing, b"ok".to_vec(), Duration::from_millis(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    let target = dir.path().join("t");
    let out = tokio::task::spawn_blocking(move || {
        datastore(&[
            "download",
            "--datastores",
            ds.to_str().unwrap(),
            "--datastore",
            "fake",
            "--target-path",
            target.to_str().unwrap(),
            "--no-progress",
            "--concurrency",
            "3",
        ])
    })
    .await
    .unwrap();
    assert_exit(&out, 0);
    assert_eq!(server.requests().len(), 41);
    let max = server
        .max_in_flight
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(max <= 3, "at most 3 requests in flight, saw {max}");
    assert!(max >= 2, "requests do run in parallel (saw at most {max})");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_path_cannot_climb_into_another_container() {
    let f = Fixture::new().await;
    let other = unique_container();
    client(&other).create_container().await.unwrap();
    write_tree(&f.path("src"), &[("f.txt", b"x".to_vec())]);
    // A backslash is the separator the service turns it into.
    let backslashed = format!("a\\..\\..\\{other}\\escaped");
    for target in [
        "../other/escaped",
        &format!("../{other}/escaped"),
        "a/./b",
        &backslashed,
    ] {
        let out = f.cli(&[
            "upload",
            "--datastore",
            "blob",
            "--src-dir",
            f.path("src").to_str().unwrap(),
            "--target-path",
            target,
            "--overwrite",
        ]);
        assert_exit(&out, 3);
        assert!(
            stderr(&out).contains("has a `.` or `..` segment"),
            "{}",
            stderr(&out)
        );
    }
    assert!(
        client(&other).list("").await.unwrap().is_empty(),
        "nothing landed in the other container"
    );
    assert!(f.client.list("").await.unwrap().is_empty());
    // The client refuses such names itself, whoever calls it.
    let err = f
        .client
        .put_blob(
            &format!("../{other}/x"),
            Body::Bytes("x".into()),
            md5(b"x"),
            true,
        )
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 8, "{err}");
    assert!(client(&other).list("").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_run_with_its_exit_code_and_no_partial_file() {
    let names: Vec<String> = (0..200).map(|i| format!("f{i:03}")).collect();
    let entries: Vec<(&str, u64, bool)> = names.iter().map(|n| (n.as_str(), 2, false)).collect();
    let listing = listing_xml(&entries);
    let server = FakeServer::listing(listing, b"ok".to_vec(), Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    let target = dir.path().join("t");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_datastore"))
        .args([
            "download",
            "--datastores",
            ds.to_str().unwrap(),
            "--datastore",
            "fake",
            "--no-progress",
            "--concurrency",
            "1",
        ])
        .args(["--target-path", target.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.requests().len() < 10 {
        assert!(Instant::now() < deadline, "the download never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    let files = read_tree(&target);
    assert!(files.len() < names.len(), "stopped before the end");
    assert!(
        files
            .iter()
            .filter(|(n, _)| !n.starts_with(".datastore-partial-"))
            .all(|(_, d)| d == b"ok"),
        "only complete files under final names"
    );
}

/// A blob whose name ends in `/` is a folder marker when empty (skipped), but one that holds
/// data cannot be written as a file: the download is refused naming it, not silently short.
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_named_like_a_folder_that_holds_data_is_refused_not_dropped() {
    let listing = listing_xml(&[
        ("fine.txt", 5, false),
        ("empty-marker/", 0, false),
        ("data-marker/", 5, false),
    ]);
    let server = FakeServer::listing(listing, b"12345".to_vec(), Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    let target = dir.path().join("target");
    let out = download_fake(ds, target, &[]).await;
    assert_exit(&out, 8);
    let err = stderr(&out);
    assert!(
        err.contains("'data-marker/': the name ends in `/` but the blob holds 5 bytes"),
        "{err}"
    );
    assert!(
        !err.contains("empty-marker"),
        "an empty marker is no problem: {err}"
    );
}

/// A blob without Content-MD5 replaced after its first range was read: the later ranges are
/// pinned to the listed ETag, so the service refuses them (412) instead of sending the new
/// version's bytes to stitch onto the old ones.
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_replaced_between_its_ranges_fails_instead_of_mixing_versions() {
    const SIZE: usize = 24 * 1024 * 1024; // three 8 MiB ranges
    let versions = Arc::new([bytes(SIZE, 1), bytes(SIZE, 2)]);
    let current = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listing = format!(
        r#"<?xml version="1.0" encoding="utf-8"?><EnumerationResults><Blobs><Blob><Name>big.bin</Name><Properties><Content-Length>{SIZE}</Content-Length><Etag>"v0"</Etag></Properties></Blob></Blobs><NextMarker /></EnumerationResults>"#
    )
    .into_bytes();
    let server = FakeServer::start(Arc::new(move |request: &Request| {
        if request.target.contains("comp=list") {
            return (200, vec![], listing.clone());
        }
        // The blob as the service holds it now; the first read replaces it afterwards.
        let now = current.fetch_max(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(wanted) = request.header("If-Match")
            && wanted != format!("\"v{now}\"")
        {
            return (412, error_code("ConditionNotMet"), vec![]);
        }
        let (start, end) = request.range();
        let etag = ("ETag".to_string(), format!("\"v{now}\""));
        (206, vec![etag], versions[now][start..end].to_vec())
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    let target = dir.path().join("target");
    let t = target.clone();
    let out = download_fake(ds, t, &["--concurrency", "3"]).await;
    assert_exit(&out, 7);
    let err = stderr(&out);
    assert!(
        err.contains("blob 'big.bin' was replaced while it was being downloaded")
            && err.contains("run again"),
        "{err}"
    );
    assert_eq!(
        walk(&target),
        Vec::<String>::new(),
        "nothing is left behind"
    );
}

/// Runs `datastore download` of the scripted endpoint into `target`, which is a fresh tmpfs
/// mounted with `mount_options` in a private mount namespace (so nothing outlives the run).
/// Needs root, as the end-to-end tests do.
fn download_into_tmpfs(
    ds: &std::path::Path,
    target: &std::path::Path,
    mount_options: &str,
) -> std::process::Output {
    std::fs::create_dir_all(target).unwrap();
    std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o "$1" tmpfs "$2" && shift 2 && exec "$@""#)
        .arg("sh")
        .args([mount_options, target.to_str().unwrap()])
        .arg(env!("CARGO_BIN_EXE_datastore"))
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
            "--no-progress",
        ])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_or_read_only_disk_stops_the_run_with_one_message() {
    let names: Vec<String> = (0..60).map(|i| format!("f{i:02}.bin")).collect();
    let listing = listing_xml(
        &names
            .iter()
            .map(|n| (n.as_str(), 256 * 1024, false))
            .collect::<Vec<_>>(),
    );
    let server = FakeServer::listing(listing, bytes(256 * 1024, 7), Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    for (options, says) in [
        ("size=2m", "No space left on device"),
        ("ro", "Read-only file system"),
    ] {
        let target = dir.path().join(options.replace('=', "-"));
        let (d, t) = (ds.clone(), target.clone());
        let out = tokio::task::spawn_blocking(move || download_into_tmpfs(&d, &t, options))
            .await
            .unwrap();
        assert_exit(&out, 10);
        assert_eq!(
            stderr(&out),
            "",
            "{options}: no line per file; the one error is in the summary"
        );
        let summary = summary(&out);
        let err = summary["error"]["message"].as_str().unwrap_or_default();
        assert!(
            err.contains(says) && err.contains("free space"),
            "{options}: {summary}"
        );
        assert!(
            summary["failed"] == 1,
            "{options}: the failing file is counted: {summary}"
        );
        assert!(
            summary["seconds"].as_f64().unwrap() > 0.0,
            "{options}: the time spent is reported: {summary}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_link_inside_the_target_is_never_written_through() {
    let listing = listing_xml(&[("ok.txt", 5, false), ("sub/deep/x.txt", 5, false)]);
    let server = FakeServer::listing(listing, b"pwned".to_vec(), Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    let (target, outside) = (dir.path().join("target"), dir.path().join("outside"));
    std::fs::create_dir_all(&target).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("sub")).unwrap();
    let t = target.clone();
    let out = download_fake(ds, t, &[]).await;
    assert_exit(&out, 8);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{} is a symbolic link to",
            target.join("sub").display()
        )) && err.contains("remove the link"),
        "{err}"
    );
    assert_eq!(
        walk(&outside),
        Vec::<String>::new(),
        "nothing landed outside"
    );
    assert_eq!(walk(&target), ["sub"], "nothing was written");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_subdirectory_is_named_and_entries_that_are_not_files_are_counted() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (src, store) = (dir.path().join("src"), dir.path().join("store"));
    write_tree(
        &src,
        &[("a.txt", b"a".to_vec()), ("locked/b.txt", b"b".to_vec())],
    );
    std::fs::create_dir_all(&store).unwrap();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink(dir.path().join("nowhere"), src.join("dangling")).unwrap();
    let fifo = src.join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let ds = dir.path().join("local.yaml");
    std::fs::write(
        &ds,
        format!(
            "apiVersion: datastore.dev/v1alpha1\nkind: Datastore\nmetadata: {{name: ws}}\nspec:\n  local:\n    path: {}\n",
            store.display()
        ),
    )
    .unwrap();
    let upload = |as_nobody: bool| {
        let mut cmd = if as_nobody {
            // Root reads every directory; an unprivileged user meets the locked one.
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(env!("CARGO_BIN_EXE_datastore"));
            c
        } else {
            std::process::Command::new(env!("CARGO_BIN_EXE_datastore"))
        };
        cmd.args([
            "upload",
            "--datastores",
            ds.to_str().unwrap(),
            "--datastore",
            "ws",
        ])
        .args(["--src-dir", src.to_str().unwrap(), "--target-path", "up"])
        .args(["--output", "json", "--no-progress"])
        .output()
        .unwrap()
    };

    std::fs::set_permissions(src.join("locked"), std::fs::Permissions::from_mode(0o000)).unwrap();
    let out = upload(true);
    assert_exit(&out, 10);
    let msg = summary(&out)["error"]["message"].to_string();
    assert!(
        msg.contains(&format!("{}", src.join("locked").display())),
        "the directory that failed is named, not the top one: {msg}"
    );

    std::fs::set_permissions(src.join("locked"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = upload(false);
    assert_exit(&out, 0);
    assert_eq!(summary(&out)["transferred"], 2);
    assert_eq!(summary(&out)["ignored"], 2, "{}", stdout(&out));
    let err = stderr(&out);
    for (name, what) in [("fifo", "a FIFO"), ("dangling", "a dangling symbolic link")] {
        let line = format!("{} is {what}, not a file", src.join(name).display());
        assert!(err.contains(&line), "{line} in: {err}");
    }
}

/// Blob names come from the service, and a name may hold ESC or a newline: in every message
/// they are escaped, so a name can neither drive the terminal nor forge a line of output.
#[tokio::test(flavor = "multi_thread")]
async fn control_characters_in_blob_names_never_reach_the_terminal_raw() {
    // The service percent-encodes names XML cannot hold (Encoded="true").
    let esc = "red%1B%5B31m%1B%5D0%3Btitle%07.txt";
    let newline = "two%0Aerror%3A%20forged%20line.txt";
    let download = |port: u16, dir: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            let ds = fake_datastores(&dir, port);
            datastore(&[
                "download",
                "--datastores",
                ds.to_str().unwrap(),
                "--datastore",
                "fake",
                "--target-path",
                dir.join("target").to_str().unwrap(),
                "--no-progress",
            ])
        })
    };
    let check = |err: &str| {
        assert!(!err.contains('\u{1b}'), "a raw ESC: {err:?}");
        assert!(!err.contains('\u{7}'), "a raw BEL: {err:?}");
        assert!(
            !err.lines().any(|l| l.starts_with("error: forged")),
            "a raw newline: {err:?}"
        );
    };

    // Listed, then gone when fetched: the service's refusal names each blob.
    let listing = listing_xml(&[(esc, 5, true), (newline, 5, true)]);
    let server = FakeServer::start(Arc::new(move |request: &Request| {
        if request.target.contains("comp=list") {
            (200, vec![], listing.clone())
        } else {
            (
                404,
                vec![("x-ms-error-code".to_string(), "BlobNotFound".to_string())],
                b"<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>BlobNotFound</Code><Message>The specified blob does not exist.</Message></Error>".to_vec(),
            )
        }
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = download(server.port, dir.path().to_path_buf())
        .await
        .unwrap();
    assert_exit(&out, 5);
    let err = stderr(&out);
    check(&err);
    assert!(
        err.contains("blob 'red\\u{1b}[31m\\u{1b}]0;title\\u{7}.txt' no longer exists"),
        "{err}"
    );
    assert!(
        err.contains("blob 'two\\nerror: forged line.txt' no longer exists"),
        "{err}"
    );

    // Refused before anything moves: a folder-looking name holding data, and a file that is
    // also a folder.
    let listing = listing_xml(&[
        (&format!("{esc}/"), 5, true),
        (newline, 5, true),
        (&format!("{newline}/inside"), 5, true),
    ]);
    let server = FakeServer::listing(listing, b"12345".to_vec(), Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let out = download(server.port, dir.path().to_path_buf())
        .await
        .unwrap();
    assert_exit(&out, 8);
    let err = stderr(&out);
    check(&err);
    assert!(
        err.contains("'red\\u{1b}[31m\\u{1b}]0;title\\u{7}.txt/': the name ends in `/`"),
        "{err}"
    );
    assert!(
        err.contains("'two\\nerror: forged line.txt' is both a file and the directory of 'two\\nerror: forged line.txt/inside'"),
        "{err}"
    );
}

/// One file fails: its error is printed once, not once as it fails and again at the end.
#[tokio::test(flavor = "multi_thread")]
async fn one_failed_file_is_reported_once() {
    let f = Fixture::new().await;
    let ids = BlockIds::new();
    f.client
        .put_block("bad.bin", &ids, 0, Body::Bytes(bytes(1000, 1).into()))
        .await
        .unwrap();
    let wrong = md5(b"something else");
    f.client
        .put_block_list("bad.bin", &ids, 1, wrong, false)
        .await
        .unwrap();
    let out = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        f.path("out").to_str().unwrap(),
    ]);
    assert_exit(&out, 7);
    let err = stderr(&out);
    assert_eq!(
        err.matches("does not match its Content-MD5").count(),
        1,
        "{err}"
    );
}

/// The blob endpoint for one small upload whose first Put Blob commits but answers 500 (its
/// answer lost, as after a timeout); the retry then meets the blob it created.
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_put_that_had_committed_counts_as_transferred_not_skipped() {
    use base64::Engine;
    let data = b"ours".to_vec();
    let ours = base64::engine::general_purpose::STANDARD.encode(md5(&data));
    let puts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let server = FakeServer::start(Arc::new(move |request: &Request| {
        match request.method.as_str() {
            "GET" => (200, vec![], listing_xml(&[])),
            "HEAD" => (200, vec![("Content-MD5".to_string(), ours.clone())], vec![]),
            _ if puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 => {
                (500, error_code("OperationTimedOut"), vec![])
            }
            _ => (409, error_code("BlobAlreadyExists"), vec![]),
        }
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    write_tree(&dir.path().join("src"), &[("x.txt", data)]);
    let src = dir.path().join("src");
    let out = upload_fake(ds, src, &["--output", "json"]).await;
    assert_exit(&out, 0);
    let s = summary(&out);
    assert_eq!(
        (s["transferred"].as_u64(), s["skipped"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );
}

/// Two `--overwrite` uploads of one large file race; the loser's Put Block List meets the
/// winner's commit, which discarded its staged blocks.
#[tokio::test(flavor = "multi_thread")]
async fn losing_a_race_of_two_overwriting_uploads_says_another_writer_replaced_the_blob() {
    let server = FakeServer::start(Arc::new(|request: &Request| {
        if request.target.contains("comp=blocklist") && request.method == "PUT" {
            (400, error_code("InvalidBlockList"), vec![])
        } else if request.target.contains("comp=blocklist") {
            (404, error_code("BlobNotFound"), vec![])
        } else if request.method == "GET" {
            (200, vec![], listing_xml(&[]))
        } else {
            (201, vec![], vec![])
        }
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    write_tree(
        &dir.path().join("src"),
        &[("big.bin", bytes(9 * 1024 * 1024, 5))],
    );
    let src = dir.path().join("src");
    let out = upload_fake(ds, src, &["--overwrite"]).await;
    assert_exit(&out, 9);
    let err = stderr(&out);
    assert!(
        err.contains("blob 'big.bin' was replaced by another writer while we uploaded it")
            && err.matches("error").count() == 1,
        "{err}"
    );
}
