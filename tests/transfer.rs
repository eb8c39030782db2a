//! `datastore upload` / `datastore download` against a real Azurite.

mod common;

use common::*;
use datastore_operator::store::azure::Body;

/// Small, medium (one streamed Put Blob) and large (Put Block + Put Block List) files, an empty
/// one, and names the URL encoding must survive.
fn varied_tree() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("a.txt", b"hello".to_vec()),
        ("empty.bin", Vec::new()),
        ("with space/ünïcödé 名前.txt", bytes(1000, 1)),
        ("odd/100% #1 ?.csv", bytes(4097, 2)),
        ("odd/&<>'\".txt", bytes(10, 3)),
        ("medium.bin", bytes(3 * 1024 * 1024 + 7, 4)),
        ("deep/er/large.bin", bytes(20 * 1024 * 1024 + 3, 5)),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_is_byte_exact_and_every_blob_has_its_md5() {
    let f = Fixture::new().await;
    let tree = varied_tree();
    write_tree(&f.path("src"), &tree);

    let up = f.cli(&[
        "upload",
        "--datastore",
        "blob",
        "--src-dir",
        f.path("src").to_str().unwrap(),
        "--target-path",
        "/data/files/",
        "--output",
        "json",
    ]);
    assert_exit(&up, 0);
    let s = summary(&up);
    assert_eq!(s["transferred"], tree.len());
    assert_eq!(s["bytes"], tree.iter().map(|(_, d)| d.len()).sum::<usize>());

    // Content-MD5 is set on every blob, block uploads included, and is the real one.
    let listed = f.client.list("data/files/").await.unwrap();
    assert_eq!(listed.len(), tree.len());
    for (rel, data) in &tree {
        let blob = listed
            .iter()
            .find(|b| b.name == format!("data/files/{rel}"))
            .unwrap_or_else(|| panic!("{rel} uploaded"));
        assert_eq!(blob.size, data.len() as u64, "{rel}");
        assert_eq!(blob.md5, Some(md5(data)), "{rel} carries its Content-MD5");
    }

    let down = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        f.path("out").to_str().unwrap(),
        "--prefix",
        "/data",
        "--output",
        "json",
    ]);
    assert_exit(&down, 0);
    assert_eq!(summary(&down)["transferred"], tree.len());
    // The SDK keeps each blob's full name under the target directory.
    let expected: Vec<(String, Vec<u8>)> = {
        let mut v: Vec<_> = tree
            .iter()
            .map(|(r, d)| (format!("data/files/{r}"), d.clone()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(read_tree(&f.path("out")), expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn large_blob_downloads_in_parallel_ranges_byte_exact() {
    let f = Fixture::new().await;
    let data = bytes(40 * 1024 * 1024 + 11, 9);
    write_tree(&f.path("src"), &[("big.bin", data.clone())]);
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
    let down = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        f.path("out").to_str().unwrap(),
        "--concurrency",
        "4",
    ]);
    assert_exit(&down, 0);
    assert!(std::fs::read(f.path("out/big.bin")).unwrap() == data);
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_without_overwrite_skips_existing_blobs_and_with_it_replaces_them() {
    let f = Fixture::new().await;
    write_tree(
        &f.path("src"),
        &[
            ("keep.txt", b"v1".to_vec()),
            ("big.bin", bytes(9 * 1024 * 1024, 1)),
        ],
    );
    let src = f.path("src");
    let src = src.to_str().unwrap();
    assert_exit(
        &f.cli(&[
            "upload",
            "--datastore",
            "blob",
            "--src-dir",
            src,
            "--target-path",
            "t",
        ]),
        0,
    );

    write_tree(
        &f.path("src"),
        &[
            ("keep.txt", b"v2".to_vec()),
            ("big.bin", bytes(9 * 1024 * 1024, 2)),
            ("new.txt", b"n".to_vec()),
        ],
    );
    let again = f.cli(&[
        "upload",
        "--datastore",
        "blob",
        "--src-dir",
        src,
        "--target-path",
        "t",
        "--output",
        "json",
    ]);
    assert_exit(&again, 0);
    let s = summary(&again);
    assert_eq!(
        (s["transferred"].as_u64(), s["skipped"].as_u64()),
        (Some(1), Some(2))
    );
    let blob = |name: &'static str| {
        let c = f.client.clone();
        async move {
            c.get(name, None, None)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec()
        }
    };
    assert_eq!(
        blob("t/keep.txt").await,
        b"v1",
        "an existing blob is never replaced without --overwrite"
    );
    assert_eq!(blob("t/big.bin").await, bytes(9 * 1024 * 1024, 1));

    let forced = f.cli(&[
        "upload",
        "--datastore",
        "blob",
        "--src-dir",
        src,
        "--target-path",
        "t",
        "--overwrite",
        "--output",
        "json",
    ]);
    assert_exit(&forced, 0);
    assert_eq!(summary(&forced)["transferred"], 3);
    assert_eq!(blob("t/keep.txt").await, b"v2");
    assert_eq!(blob("t/big.bin").await, bytes(9 * 1024 * 1024, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_created_after_the_listing_is_still_not_replaced() {
    // The skip decision comes from the listing; the service's If-None-Match guards the race.
    let f = Fixture::new().await;
    f.client
        .put_blob("x.txt", Body::Bytes("theirs".into()), md5(b"theirs"), false)
        .await
        .unwrap();
    let outcome = f
        .client
        .put_blob("x.txt", Body::Bytes("ours".into()), md5(b"ours"), false)
        .await
        .unwrap();
    assert_eq!(
        outcome,
        datastore_operator::store::azure::PutOutcome::AlreadyExists
    );
    let got = f
        .client
        .get("x.txt", None, None)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&got[..], b"theirs");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_pinned_to_the_listed_version_is_refused_once_the_blob_is_replaced() {
    let f = Fixture::new().await;
    let put = |data: &'static [u8]| {
        f.client
            .put_blob("x.bin", Body::Bytes(data.into()), md5(data), true)
    };
    put(b"first").await.unwrap();
    let listed = f.client.list("").await.unwrap().remove(0);
    let etag = listed.etag.expect("the listing gives each blob's ETag");
    let pinned = f.client.get("x.bin", None, Some(&etag)).await.unwrap();
    assert_eq!(&pinned.bytes().await.unwrap()[..], b"first");

    put(b"second").await.unwrap();
    let err = f.client.get("x.bin", None, Some(&etag)).await.unwrap_err();
    assert_eq!(err.exit_code(), 7, "{err}");
    assert!(
        err.to_string()
            .contains("blob 'x.bin' was replaced while it was being downloaded"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn download_without_overwrite_keeps_local_files_and_with_it_replaces_them() {
    let f = Fixture::new().await;
    write_tree(
        &f.path("src"),
        &[
            ("a.txt", b"remote".to_vec()),
            ("b.txt", b"remote-b".to_vec()),
        ],
    );
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
    write_tree(&f.path("out"), &[("a.txt", b"local edit".to_vec())]);
    let out = f.path("out");
    let out = out.to_str().unwrap();

    let down = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        out,
        "--output",
        "json",
    ]);
    assert_exit(&down, 0);
    let s = summary(&down);
    assert_eq!(
        (s["transferred"].as_u64(), s["skipped"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(std::fs::read(f.path("out/a.txt")).unwrap(), b"local edit");

    assert_exit(
        &f.cli(&[
            "download",
            "--datastore",
            "blob",
            "--target-path",
            out,
            "--overwrite",
        ]),
        0,
    );
    assert_eq!(std::fs::read(f.path("out/a.txt")).unwrap(), b"remote");
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_is_a_name_prefix_and_a_leading_slash_is_normalized() {
    let f = Fixture::new().await;
    for name in ["data/a/1.txt", "data/ab.txt", "data2/x.txt", "other/y.txt"] {
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
    let names = |o: &str| {
        read_tree(&f.path(o))
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    };
    assert_exit(
        &f.cli(&[
            "download",
            "--datastore",
            "blob",
            "--target-path",
            f.path("o1").to_str().unwrap(),
            "--prefix",
            "/data/",
        ]),
        0,
    );
    assert_eq!(names("o1"), ["data/a/1.txt", "data/ab.txt"]);
    assert_exit(
        &f.cli(&[
            "download",
            "--datastore",
            "blob",
            "--target-path",
            f.path("o2").to_str().unwrap(),
            "--prefix",
            "data",
        ]),
        0,
    );
    assert_eq!(names("o2"), ["data/a/1.txt", "data/ab.txt", "data2/x.txt"]);
    assert_exit(
        &f.cli(&[
            "download",
            "--datastore",
            "blob",
            "--target-path",
            f.path("o3").to_str().unwrap(),
            "--prefix",
            "nothing-here",
        ]),
        0,
    );
    assert!(names("o3").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn more_than_one_listing_page_of_blobs() {
    let f = Fixture::new().await;
    let n = 5_100;
    let src = f.path("src");
    for i in 0..n {
        let p = src.join(format!("d{}/f{i:05}.txt", i % 10));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, i.to_string()).unwrap();
    }
    let up = f.cli(&[
        "upload",
        "--datastore",
        "blob",
        "--src-dir",
        src.to_str().unwrap(),
        "--target-path",
        "many",
        "--concurrency",
        "32",
        "--output",
        "json",
    ]);
    assert_exit(&up, 0);
    assert_eq!(summary(&up)["transferred"], n);
    assert_eq!(f.client.list("many/").await.unwrap().len(), n);
    // A second upload lists every page to find that nothing is left to do.
    let again = f.cli(&[
        "upload",
        "--datastore",
        "blob",
        "--src-dir",
        src.to_str().unwrap(),
        "--target-path",
        "many",
        "--output",
        "json",
    ]);
    assert_eq!(summary(&again)["skipped"], n);
    let down = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        f.path("out").to_str().unwrap(),
        "--prefix",
        "many",
        "--concurrency",
        "32",
        "--output",
        "json",
    ]);
    assert_exit(&down, 0);
    assert_eq!(summary(&down)["transferred"], n);
    assert_eq!(read_tree(&f.path("out/many")), read_tree(&src));
}

#[tokio::test(flavor = "multi_thread")]
async fn local_datastore_round_trip() {
    let f = Fixture::new().await;
    let tree = varied_tree();
    write_tree(&f.path("src"), &tree);
    assert_exit(
        &f.cli(&[
            "upload",
            "--datastore",
            "local",
            "--src-dir",
            f.path("src").to_str().unwrap(),
            "--target-path",
            "/in",
        ]),
        0,
    );
    assert_eq!(
        read_tree(&f.path("localstore/in")),
        read_tree(&f.path("src"))
    );
    let again = f.cli(&[
        "upload",
        "--datastore",
        "local",
        "--src-dir",
        f.path("src").to_str().unwrap(),
        "--target-path",
        "/in",
        "--output",
        "json",
    ]);
    assert_eq!(summary(&again)["skipped"], tree.len());
    assert_exit(
        &f.cli(&[
            "download",
            "--datastore",
            "local",
            "--target-path",
            f.path("out").to_str().unwrap(),
            "--prefix",
            "in/",
        ]),
        0,
    );
    assert_eq!(read_tree(&f.path("out/in")), read_tree(&f.path("src")));
}

#[tokio::test(flavor = "multi_thread")]
async fn forced_progress_on_a_pipe_prints_plain_lines_and_the_summary_ends_the_run() {
    let f = Fixture::new().await;
    write_tree(
        &f.path("src"),
        &[
            ("a.txt", b"a".to_vec()),
            ("b/c.txt", bytes(2 * 1024 * 1024, 1)),
        ],
    );
    let ds = f.datastores();
    let out = datastore(&[
        "upload",
        "--datastores",
        ds.to_str().unwrap(),
        "--datastore",
        "blob",
        "--src-dir",
        f.path("src").to_str().unwrap(),
        "--progress",
    ]);
    assert_exit(&out, 0);
    let err = stderr(&out);
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("progress: 2.00 MiB of 2.00 MiB, 2 of 2 files,"),
        "{err}"
    );
    assert!(
        !err.contains('\x1b'),
        "no terminal control codes on a pipe: {err:?}"
    );
    let summary_line = stdout(&out);
    assert!(
        summary_line
            .trim()
            .starts_with("2 transferred, 0 skipped, 2.00 MiB in "),
        "{summary_line}"
    );
}
