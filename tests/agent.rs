//! `datastore agent download|upload`, the in-pod commands of the generated containers, against a
//! real Azurite (and a scripted endpoint for names Azurite cannot be made to list).

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use datastore_operator::store::azure::Body;

async fn put(f: &Fixture, name: &str, data: &[u8]) {
    f.client
        .put_blob(name, Body::Bytes(data.to_vec().into()), md5(data), true)
        .await
        .unwrap();
}

/// `datastore agent download ...` with the datastores file of the fixture, in a blocking task.
async fn agent(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        datastore(&args)
    })
    .await
    .unwrap()
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

async fn agent_download(f: &Fixture, path: &str, target: &Path, report: &Path) -> Output {
    agent(vec![
        "agent".into(),
        "download".into(),
        "--datastores".into(),
        s(&f.datastores()),
        "--datastore".into(),
        "blob".into(),
        "--path".into(),
        path.into(),
        "--target".into(),
        s(target),
        "--report".into(),
        s(report),
    ])
    .await
}

fn report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.len() <= 4096, "{text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("report is JSON ({e}): {text:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn download_lands_the_folder_contents_and_reports_what_it_saw() {
    let f = Fixture::new().await;
    let big = bytes(3 * 1024 * 1024 + 5, 7);
    put(&f, "data/files/a.txt", b"hello").await;
    put(&f, "data/files/sub/b.bin", &big).await;
    put(&f, "data/files/empty", b"").await;
    // Siblings that share the prefix but are not inside the folder.
    put(&f, "data/files2/nope.txt", b"no").await;
    put(&f, "data/filesx", b"no").await;
    put(&f, "other/c.txt", b"no").await;

    let out = f.path("mnt/training_data");
    let rep = f.path("termination-log");
    let o = agent_download(&f, "/data/files/", &out, &rep).await;
    assert_exit(&o, 0);
    let sum = summary(&o);
    assert_eq!(sum["transferred"], 3, "{sum}");
    assert_eq!(sum["skipped"], 0, "{sum}");

    assert_eq!(
        read_tree(&out),
        vec![
            ("a.txt".to_string(), b"hello".to_vec()),
            ("empty".to_string(), Vec::new()),
            ("sub/b.bin".to_string(), big.clone()),
        ]
    );
    let r = report(&rep);
    assert_eq!(r["files"], 3);
    assert_eq!(r["bytes"], 5 + big.len());
    let digest = expected_digest(&[("a.txt", b"hello"), ("sub/b.bin", &big), ("empty", b"")]);
    assert_eq!(r["digest"], digest.as_str());
    assert_eq!(
        r.as_object().unwrap().len(),
        3,
        "exactly files, bytes, digest: {r}"
    );

    // Same data, fresh directory: the same digest.
    let rep2 = f.path("report2");
    assert_exit(
        &agent_download(&f, "data/files", &f.path("again"), &rep2).await,
        0,
    );
    assert_eq!(report(&rep2)["digest"], digest.as_str());

    // Same directory: everything is skipped (never overwritten), and the record is the same.
    let rep3 = f.path("report3");
    let o = agent_download(&f, "data/files", &out, &rep3).await;
    assert_exit(&o, 0);
    assert_eq!(summary(&o)["skipped"], 3);
    assert_eq!(report(&rep3), r);

    // One blob changes: the digest changes, the skipped local file is left as it was.
    put(&f, "data/files/a.txt", b"HELLO").await;
    let rep4 = f.path("report4");
    let o = agent_download(&f, "data/files", &out, &rep4).await;
    assert_exit(&o, 0);
    let r4 = report(&rep4);
    assert_ne!(r4["digest"], digest.as_str());
    assert_eq!(
        r4["digest"],
        expected_digest(&[("a.txt", b"HELLO"), ("sub/b.bin", &big), ("empty", b"")]).as_str()
    );
    assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"hello");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_folder_does_not_pick_up_its_prefix_siblings_and_empty_is_the_container() {
    let f = Fixture::new().await;
    put(&f, "data/x.txt", b"x").await;
    put(&f, "data2/y.txt", b"y").await;
    put(&f, "data", b"a blob, not the folder").await;

    let rep = f.path("r1");
    assert_exit(&agent_download(&f, "data", &f.path("one"), &rep).await, 0);
    assert_eq!(
        read_tree(&f.path("one")),
        vec![("x.txt".to_string(), b"x".to_vec())]
    );
    assert_eq!(report(&rep)["files"], 1);

    // At the container root the blob `data` and the folder `data/` clash: refused, reported.
    let rep = f.path("r2");
    let o = agent_download(&f, "", &f.path("clash"), &rep).await;
    assert_exit(&o, 8);
    let msg = std::fs::read_to_string(&rep).unwrap();
    assert!(
        msg.contains("'data' is both a file and the directory of 'data/x.txt'"),
        "{msg}"
    );

    // `""` and `/` mean the whole container.
    let g = Fixture::new().await;
    put(&g, "data/x.txt", b"x").await;
    put(&g, "data2/y.txt", b"y").await;
    for (i, root) in ["", "/"].into_iter().enumerate() {
        let rep = g.path(&format!("r{i}"));
        let out = g.path(&format!("all{i}"));
        assert_exit(&agent_download(&g, root, &out, &rep).await, 0);
        let names: Vec<String> = read_tree(&out).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["data/x.txt", "data2/y.txt"].map(String::from));
        assert_eq!(report(&rep)["files"], 2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_or_missing_folder_reports_zero_files() {
    let f = Fixture::new().await;
    let rep = f.path("r");
    let o = agent_download(&f, "nothing/here", &f.path("out"), &rep).await;
    assert_exit(&o, 0);
    let r = report(&rep);
    assert_eq!(
        (r["files"].as_u64(), r["bytes"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(r["digest"], expected_digest(&[]).as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_lands_the_directory_contents_under_the_path() {
    let f = Fixture::new().await;
    let src = f.path("outputs");
    write_tree(
        &src,
        &[
            ("model.pkl", bytes(2000, 1)),
            ("logs/run.txt", b"epoch 1".to_vec()),
        ],
    );
    let upload = |overwrite: bool| {
        let mut args = vec![
            "agent".to_string(),
            "upload".into(),
            "--datastores".into(),
            s(&f.datastores()),
            "--datastore".into(),
            "blob".into(),
            "--src-dir".into(),
            s(&src),
            "--path".into(),
            "/outputs/run1/".into(),
            "--concurrency".into(),
            "4".into(),
        ];
        if overwrite {
            args.push("--overwrite".into());
        }
        agent(args)
    };
    let o = upload(false).await;
    assert_exit(&o, 0);
    assert_eq!(summary(&o)["transferred"], 2);
    let mut names: Vec<String> = f
        .client
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["outputs/run1/logs/run.txt", "outputs/run1/model.pkl"].map(String::from)
    );

    // Without --overwrite what exists is skipped; with it, replaced.
    write_tree(&src, &[("logs/run.txt", b"epoch 2".to_vec())]);
    let o = upload(false).await;
    assert_exit(&o, 0);
    assert_eq!(summary(&o)["skipped"], 2);
    let listed = f.client.list("outputs/run1/logs/").await.unwrap();
    assert_eq!(listed[0].md5, Some(md5(b"epoch 1")));
    let o = upload(true).await;
    assert_exit(&o, 0);
    assert_eq!(summary(&o)["transferred"], 2);
    let listed = f.client.list("outputs/run1/logs/").await.unwrap();
    assert_eq!(listed[0].md5, Some(md5(b"epoch 2")));
}

#[tokio::test(flavor = "multi_thread")]
async fn relative_names_that_would_leave_the_target_are_refused_and_reported() {
    // The scripted endpoint lists these whatever the prefix asked for.
    let listing = listing_xml(&[
        ("in/fine.txt", 5, false),
        ("in/../escape.txt", 5, false),
        ("in/ok/../../escape2.txt", 5, false),
        ("in//abs.txt", 5, false),
        ("in2/sibling.txt", 5, false),
    ]);
    let server = FakeServer::listing(listing, b"pwned".to_vec(), Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    let target = dir.path().join("deep/target");
    let rep = dir.path().join("termination-log");
    let o = agent(vec![
        "agent".into(),
        "download".into(),
        "--datastores".into(),
        s(&ds),
        "--datastore".into(),
        "fake".into(),
        "--path".into(),
        "in".into(),
        "--target".into(),
        s(&target),
        "--report".into(),
        s(&rep),
    ])
    .await;
    assert_exit(&o, 8);
    let msg = std::fs::read_to_string(&rep).unwrap();
    for name in ["in/../escape.txt", "in/ok/../../escape2.txt", "in//abs.txt"] {
        assert!(msg.contains(name), "the report names {name}: {msg}");
    }
    assert!(!msg.contains("sibling"), "outside the folder: {msg}");
    assert!(msg.contains("nothing was written"), "{msg}");
    assert_eq!(summary(&o)["error"]["reason"], "UnsafeBlobName");
    assert!(
        server.requests().iter().all(|r| r.contains("comp=list")),
        "nothing fetched: {:?}",
        server.requests()
    );
    assert!(!target.exists(), "nothing written");
    assert!(!dir.path().join("deep/escape.txt").exists());
    assert!(!dir.path().join("escape2.txt").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_writes_the_reason_to_the_report_and_exits_non_zero() {
    let f = Fixture::new().await;
    // A datastore that does not exist: a configuration error.
    let rep = f.path("r1");
    let o = agent(vec![
        "agent".into(),
        "download".into(),
        "--datastores".into(),
        s(&f.datastores()),
        "--datastore".into(),
        "nope".into(),
        "--path".into(),
        "data".into(),
        "--target".into(),
        s(&f.path("out")),
        "--report".into(),
        s(&rep),
    ])
    .await;
    assert_exit(&o, 3);
    let msg = std::fs::read_to_string(&rep).unwrap();
    assert!(msg.contains("no datastore named 'nope'"), "{msg}");
    assert_eq!(summary(&o)["error"]["message"], msg.as_str());

    // The container is gone: not found, with the reason in the report and no credential.
    f.write_datastores(
        "no-such-container",
        &endpoint(),
        &format!("accountKey: {KEY}"),
    );
    let rep = f.path("r2");
    let o = agent_download(&f, "data", &f.path("out"), &rep).await;
    assert_exit(&o, 5);
    let msg = std::fs::read_to_string(&rep).unwrap();
    assert!(msg.contains("no-such-container"), "{msg}");
    assert!(msg.len() <= 4096);
    for text in [msg.as_str(), &stdout(&o), &stderr(&o)] {
        assert!(!text.contains(KEY), "{text}");
    }

    // An unwritable target: a local error, reported.
    f.write_datastores(&f.container, &endpoint(), &format!("accountKey: {KEY}"));
    put(&f, "data/a.txt", b"a").await;
    std::fs::write(f.path("file"), b"").unwrap();
    let rep = f.path("r3");
    let o = agent_download(&f, "data", &f.path("file/sub"), &rep).await;
    assert_exit(&o, 10);
    assert!(
        std::fs::read_to_string(&rep).unwrap().contains("file/sub"),
        "{}",
        std::fs::read_to_string(&rep).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_are_json_lines_and_stdout_is_progress_lines_then_one_json_summary() {
    let f = Fixture::new().await;
    put(&f, "d/a", b"a").await;
    let o = agent(vec![
        "--log-level".into(),
        "info".into(),
        "agent".into(),
        "download".into(),
        "--datastores".into(),
        s(&f.datastores()),
        "--datastore".into(),
        "blob".into(),
        "--path".into(),
        "d".into(),
        "--target".into(),
        s(&f.path("out")),
    ])
    .await;
    assert_exit(&o, 0);
    let out = stdout(&o);
    let (summary_line, progress) = out
        .trim()
        .lines()
        .collect::<Vec<_>>()
        .split_last()
        .map(|(l, p)| (*l, p.to_vec()))
        .unwrap();
    assert!(summary_line.contains("\"transferred\":1"), "{out}");
    // Progress lines (at least the last state, on the end of the transfer) come before it.
    let last = progress
        .last()
        .unwrap_or_else(|| panic!("no progress line: {out}"));
    for line in &progress {
        assert!(line.starts_with("{\"progress\":"), "{line}");
    }
    assert!(
        last.contains("\"files\":1,\"filesTotal\":1,\"bytes\":1,\"bytesTotal\":1"),
        "{last}"
    );
    assert_eq!(summary(&o)["transferred"], 1);
    let err = stderr(&o);
    assert!(!err.trim().is_empty(), "info logs are written");
    for line in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    assert!(err.contains("sha256:"), "the report is logged too: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_a_download_reports_it_and_leaves_nothing_partial() {
    let listing = listing_xml(&[("in/slow.bin", 5, false)]);
    let server = FakeServer::listing(listing, b"slow!".to_vec(), Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    let target = dir.path().join("target");
    let rep = dir.path().join("termination-log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_datastore"))
        .args(["agent", "download", "--datastores", &s(&ds)])
        .args([
            "--datastore",
            "fake",
            "--path",
            "in",
            "--target",
            &s(&target),
        ])
        .args(["--report", &s(&rep)])
        .env_remove("DATASTORE_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Once the blob is being fetched, the pod is told to stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !server.requests().iter().any(|r| !r.contains("comp=list")) {
        assert!(std::time::Instant::now() < deadline, "the blob is fetched");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(143));
    let msg = std::fs::read_to_string(&rep).unwrap();
    assert!(msg.contains("interrupted by signal 15"), "{msg}");
    assert!(read_tree(&target).is_empty(), "nothing partial is left");
}

/// A script could link its outputs to the agent's credentials (mounted in the upload pod): the
/// agent refuses links that lead outside the folder, uploads nothing, and says why in its
/// report. A link inside the folder is fine.
#[tokio::test(flavor = "multi_thread")]
async fn upload_reports_what_it_kept_and_refuses_a_symlink_out_of_the_outputs_folder() {
    let f = Fixture::new().await;
    let src = f.path("outputs");
    write_tree(&src, &[("model.bin", b"weights".to_vec())]);
    std::os::unix::fs::symlink(src.join("model.bin"), src.join("latest.bin")).unwrap();
    let report_path = f.path("report");
    let upload = |src: std::path::PathBuf, report: std::path::PathBuf| {
        agent(vec![
            "agent".into(),
            "upload".into(),
            "--datastores".into(),
            s(&f.datastores()),
            "--datastore".into(),
            "blob".into(),
            "--src-dir".into(),
            s(&src),
            "--path".into(),
            "outputs".into(),
            "--report".into(),
            s(&report),
        ])
    };

    // Inside: uploaded, as the file it points to.
    let ok = upload(src.clone(), report_path.clone()).await;
    assert_exit(&ok, 0);
    let names: Vec<String> = f
        .client
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["outputs/latest.bin", "outputs/model.bin"]);
    let report = |path: &std::path::Path| {
        datastore_operator::plan::contract::UploadReport::parse(
            &std::fs::read_to_string(path).unwrap(),
        )
        .expect("a success report")
    };
    assert_eq!(
        (report(&report_path).uploaded, report(&report_path).skipped),
        (2, 0)
    );
    // Again, as a retried upload Job does: both exist with the same bytes, so nothing is
    // uploaded and nothing counts as kept (the controller would keep the outputs volume for
    // outputs only it holds).
    assert_exit(&upload(src.clone(), report_path.clone()).await, 0);
    let again = report(&report_path);
    assert_eq!((again.uploaded, again.skipped, again.identical), (0, 0, 2));
    // Other contents: both exist, both are kept, and the report says so.
    std::fs::write(src.join("model.bin"), b"retrained").unwrap();
    assert_exit(&upload(src.clone(), report_path.clone()).await, 0);
    let changed = report(&report_path);
    assert_eq!(
        (changed.uploaded, changed.skipped, changed.identical),
        (0, 2, 0)
    );

    // Outside: refused before anything is sent.
    let leaky = f.path("leaky");
    write_tree(&leaky, &[("a.txt", b"a".to_vec())]);
    std::os::unix::fs::symlink(f.datastores(), leaky.join("creds.yaml")).unwrap();
    let refused = upload(leaky, report_path.clone()).await;
    assert_exit(&refused, 8);
    let message = std::fs::read_to_string(&report_path).unwrap();
    assert!(
        message.contains("creds.yaml is a symbolic link") && message.contains("outside the folder"),
        "{message}"
    );
    let names: Vec<String> = f
        .client
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(
        names,
        ["outputs/latest.bin", "outputs/model.bin"],
        "nothing more was uploaded"
    );
}

/// Downloads land on the run's staging volume: a folder that lists more than is left of it
/// (its size less what earlier downloads put there, and no more than its disk has free) is
/// refused before anything is written, with the numbers and the way out.
#[tokio::test(flavor = "multi_thread")]
async fn a_download_that_does_not_fit_the_staging_volume_is_refused_up_front() {
    let f = Fixture::new().await;
    put(&f, "small/a.bin", &bytes(1000, 1)).await;
    put(&f, "big/b.bin", &bytes(3000, 2)).await;
    put(&f, "big/c.bin", &bytes(2000, 3)).await;
    // The staging volume's mount.
    let staging = f.path("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let download = |path: &str, target: &str, size: &str| {
        agent(vec![
            "agent".into(),
            "download".into(),
            "--datastores".into(),
            s(&f.datastores()),
            "--datastore".into(),
            "blob".into(),
            "--path".into(),
            path.into(),
            "--target".into(),
            s(&staging.join(target)),
            "--report".into(),
            s(&f.path(&format!("report-{target}"))),
            "--staging-dir".into(),
            s(&staging),
            "--staging-size".into(),
            size.into(),
        ])
    };
    // 1000 bytes fit in 5500.
    assert_exit(&download("small", "download-0", "5500").await, 0);
    // 5000 more do not: 4500 are left.
    let refused = download("big", "download-1", "5500").await;
    assert_exit(&refused, 3);
    let message = std::fs::read_to_string(f.path("report-download-1")).unwrap();
    assert!(
        message.contains("lists 4.88 KiB in 2 file(s), more than the 4.39 KiB there is room for")
            && message.contains(
                "the staging volume holds 5.37 KiB (spec.staging.size), 1000 B of it used"
            )
            && message.contains("nothing was downloaded: raise spec.staging.size"),
        "{message}"
    );
    assert!(
        !staging.join("download-1").exists() || read_tree(&staging.join("download-1")).is_empty()
    );
    // With room for both, it lands.
    assert_exit(&download("big", "download-1", "6000").await, 0);
    assert_eq!(read_tree(&staging.join("download-1")).len(), 2);
}
