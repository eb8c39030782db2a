//! The download cache against a real Azurite, reached through a proxy that counts the blob
//! reads: a hit reads nothing, a changed blob is a new entry, concurrent fetches download once,
//! eviction spares what is in use, a restart keeps the entries, a broken entry is replaced,
//! and credentials that cannot list the folder, or may list but not read it, get nothing.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::proxy::{self, Pace, Proxy};

use datastore_operator::cache::Cache;
use datastore_operator::plan::contract::Report;
use datastore_operator::store::azure::{Body, Tuning};
use datastore_operator::store::sas::Permissions;
use datastore_operator::store::{AzureBlobConfig, AzureCredential, BlobClient, Secret, Store};
use datastore_operator::transfer::{NoProgress, Options};
use k8s_openapi::jiff::Timestamp;

fn store_at(port: u16, container: &str, key: &str) -> Store {
    store_with(
        port,
        container,
        AzureCredential::AccountKey(Secret::new(key)),
    )
}

fn store_with(port: u16, container: &str, credential: AzureCredential) -> Store {
    let config = AzureBlobConfig {
        account: common::ACCOUNT.into(),
        container: container.into(),
        endpoint: format!("http://127.0.0.1:{port}/{}", common::ACCOUNT)
            .parse()
            .unwrap(),
        credential,
        credential_source: "test".into(),
        read_only: false,
    };
    Store::Azure(BlobClient::new(config, Tuning::default()).unwrap())
}

/// A store reaching `container` through port `port` with a container SAS of `permissions`.
fn sas_store_at(port: u16, container: &str, permissions: Permissions) -> Store {
    let token = common::sas(container, permissions);
    store_with(
        port,
        container,
        AzureCredential::SasToken(Secret::new(token)),
    )
}

async fn put(blobs: &BlobClient, name: &str, data: &[u8]) {
    blobs
        .put_blob(
            name,
            Body::Bytes(data.to_vec().into()),
            common::md5(data),
            true,
        )
        .await
        .unwrap();
}

/// A container holding `data/{a.txt, sub/b.bin}`, and a store reaching it through a counting
/// proxy.
async fn setup() -> (BlobClient, Store, Proxy, String) {
    let container = common::unique_container();
    let blobs = common::client(&container);
    blobs.create_container().await.unwrap();
    put(&blobs, "data/a.txt", b"alpha\n").await;
    put(&blobs, "data/sub/b.bin", &vec![7u8; 300_000]).await;
    put(&blobs, "other/c.txt", b"not in the folder\n").await;
    let proxy = proxy::start(Pace::default()).await;
    let store = store_at(proxy.port, &container, common::KEY);
    (blobs, store, proxy, container)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_fetch_reads_nothing_and_a_changed_blob_is_a_new_entry() {
    let (blobs, store, proxy, _) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path(), 1 << 30).unwrap();
    let fetch = || cache.fetch(&store, "data", Options::default(), Arc::new(NoProgress));

    let first = fetch().await.unwrap();
    assert!(!first.hit);
    assert_eq!((first.files, first.bytes), (2, 300_006));
    assert_eq!(read(&first.path.join("a.txt")), b"alpha\n");
    assert_eq!(read(&first.path.join("sub/b.bin")), vec![7u8; 300_000]);
    assert!(!first.path.join("c.txt").exists() && !first.path.join("other").exists());
    assert_eq!(proxy.reads(), 2, "one read per file");
    // Read-only: the tree is shared.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(first.path.join("a.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o222, 0, "{mode:o}");

    let second = fetch().await.unwrap();
    assert!(second.hit);
    assert_eq!(second.path, first.path);
    assert_eq!(proxy.reads(), 2, "a hit reads no blob");

    put(&blobs, "data/a.txt", b"beta\n").await;
    let changed = fetch().await.unwrap();
    assert!(!changed.hit);
    assert_ne!(changed.key, first.key);
    assert_eq!(read(&changed.path.join("a.txt")), b"beta\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_fetches_download_once() {
    let (_, store, proxy, _) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path(), 1 << 30).unwrap();
    let fetch = || cache.fetch(&store, "data", Options::default(), Arc::new(NoProgress));
    let (a, b, c) = tokio::join!(fetch(), fetch(), fetch());
    let entries = [a.unwrap(), b.unwrap(), c.unwrap()];
    assert_eq!(entries.iter().filter(|e| !e.hit).count(), 1, "{entries:?}");
    assert_eq!(proxy.reads(), 2);
    // Another process's view: the same root opened again (a restart) serves it too.
    drop(entries);
    let reopened = Cache::open(dir.path(), 1 << 30).unwrap();
    let again = reopened
        .fetch(&store, "data", Options::default(), Arc::new(NoProgress))
        .await
        .unwrap();
    assert!(again.hit);
    assert_eq!(proxy.reads(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn eviction_removes_the_least_recently_used_entry_not_in_use() {
    let (blobs, store, _, _) = setup().await;
    put(&blobs, "more/d.bin", &vec![1u8; 300_000]).await;
    put(&blobs, "most/e.bin", &vec![2u8; 300_000]).await;
    let dir = tempfile::tempdir().unwrap();
    // Room for about one folder.
    let cache = Cache::open(dir.path(), 400_000).unwrap();
    let fetch = |folder: &'static str| {
        cache.fetch(&store, folder, Options::default(), Arc::new(NoProgress))
    };
    let data = fetch("data").await.unwrap();
    let data_path = data.path.clone();
    // `data` is in use: fetching `more` goes over the limit, and `data` stays.
    let more = fetch("more").await.unwrap();
    assert!(data_path.exists() && more.path.exists());
    let more_path = more.path.clone();
    drop(data);
    drop(more);
    // Neither in use: `most` evicts the least recently used (`data`), then `more`, to fit.
    let most = fetch("most").await.unwrap();
    assert!(!data_path.exists(), "the least recently used goes first");
    assert!(!more_path.exists(), "and the next, until the rest fits");
    assert!(
        most.path.exists(),
        "never the one just fetched while in use"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_entry_is_replaced_not_served() {
    let (_, store, proxy, _) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path(), 1 << 30).unwrap();
    let fetch = || cache.fetch(&store, "data", Options::default(), Arc::new(NoProgress));
    let first = fetch().await.unwrap();
    let path = first.path.join("sub/b.bin");
    drop(first);
    // A truncated file (a disk error, or someone writing as root).
    std::fs::write(&path, b"short").unwrap();
    let again = fetch().await.unwrap();
    assert!(!again.hit);
    assert_eq!(read(&again.path.join("sub/b.bin")), vec![7u8; 300_000]);
    assert_eq!(proxy.reads(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_that_cannot_list_the_folder_get_nothing() {
    let (_, store, proxy, container) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path(), 1 << 30).unwrap();
    let cached = cache
        .fetch(&store, "data", Options::default(), Arc::new(NoProgress))
        .await
        .unwrap();
    assert!(cached.path.exists());
    let other = proxy::start(Pace::default()).await;
    let wrong = "d3Jvbmcga2V5IGZvciB0aGlzIGFjY291bnQ=";
    let err = cache
        .fetch(
            &store_at(other.port, &container, wrong),
            "data",
            Options::default(),
            Arc::new(NoProgress),
        )
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 4, "{err}");
    assert_eq!(proxy.reads(), 2);
}

/// Issue 27's case: a SAS that may only list (`l`) cannot download the folder; once an account
/// key has cached it, that SAS must not be served the cached tree either, though its listing
/// names the entry. A hit proves read access with the caller's credentials: one Get Blob
/// Properties for a container SAS, whatever the number of files.
#[tokio::test(flavor = "multi_thread")]
async fn a_sas_that_may_only_list_is_not_served_a_folder_another_credential_cached() {
    let (_, store, proxy, container) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path(), 1 << 30).unwrap();
    let fetch = |store| cache.fetch(store, "data", Options::default(), Arc::new(NoProgress));
    let list_only = sas_store_at(proxy.port, &container, common::LIST_ONLY);
    let err = fetch(&list_only).await.unwrap_err();
    assert_eq!(err.exit_code(), 4, "it cannot download the folder: {err}");

    let cached = fetch(&store).await.unwrap();
    assert!(!cached.hit);
    let (reads, heads) = (proxy.reads(), proxy.heads());
    let err = fetch(&list_only).await.unwrap_err();
    assert_eq!(err.exit_code(), 4, "{err}");
    let message = err.to_string();
    assert!(
        message.contains("blob 'data/a.txt'")
            && message.contains("may list the folder but not read it")
            && message.contains("read (r)"),
        "{message}"
    );
    assert_eq!(proxy.reads(), reads, "nothing was read for it");
    assert_eq!(proxy.heads(), heads + 1, "one proof, refused");

    // Read and list: the same tree, after one proof for the two files, without a blob read.
    let read_list = sas_store_at(proxy.port, &container, common::READ_LIST);
    let hit = fetch(&read_list).await.unwrap();
    assert!(hit.hit);
    assert_eq!(hit.path, cached.path);
    assert_eq!(proxy.reads(), reads, "a hit reads no blob");
    assert_eq!(proxy.heads(), heads + 2, "one proof for the two files");

    // An empty folder has nothing to read, so nothing to prove: a list-only SAS gets it, from
    // the cache too, with no request but the listing.
    let empty = || {
        cache.fetch(
            &list_only,
            "empty",
            Options::default(),
            Arc::new(NoProgress),
        )
    };
    let missed = empty().await.unwrap();
    let heads = proxy.heads();
    let hit = empty().await.unwrap();
    assert!(!missed.hit && hit.hit);
    assert_eq!((hit.files, hit.bytes, proxy.heads()), (0, 0, heads));
}

/// `datastore agent download` (the real binary), `--cached` or not, of the fixture's `blob`
/// datastore's `folder` into `target`: asserts its exit code, returns the report's text.
async fn download_report(
    f: &common::Fixture,
    folder: &str,
    target: &Path,
    cached: bool,
    code: i32,
) -> String {
    let report = tempfile::NamedTempFile::new().unwrap();
    let mut args: Vec<String> = [
        "agent",
        "download",
        "--datastores",
        f.datastores().to_str().unwrap(),
        "--datastore",
        "blob",
        "--path",
        folder,
        "--target",
        target.to_str().unwrap(),
        "--report",
        report.path().to_str().unwrap(),
    ]
    .map(String::from)
    .into();
    if cached {
        args.push("--cached".into());
    }
    let out = tokio::task::spawn_blocking(move || {
        common::datastore(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    common::assert_exit(&out, code);
    std::fs::read_to_string(report.path()).unwrap()
}

fn parse_report(text: &str) -> Report {
    Report::parse(text).unwrap_or_else(|| panic!("a report: {text:?}"))
}

/// Copies the files under `from` into `to` (created), keeping their relative names.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_tree_is_checked_against_the_listing_and_reported_with_when_it_was_cached() {
    let f = common::Fixture::new().await;
    let big = common::bytes(300_000, 3);
    let files: [(&str, &[u8]); 3] = [
        ("a.txt", b"alpha\n"),
        ("b.txt", b"bravo, a little longer\n"),
        ("sub/c.bin", &big),
    ];
    for (name, data) in files {
        put(&f.client, &format!("data/{name}"), data).await;
    }
    put(&f.client, "other/d.txt", b"not in the folder\n").await;
    let bytes_n: u64 = files.iter().map(|(_, data)| data.len() as u64).sum();

    // The node plugin's side: the folder fetched into a cache publishes its tree.
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path(), 1 << 30).unwrap();
    let store = store_at(common::azurite_port(), &f.container, common::KEY);
    let before = SystemTime::now();
    let entry = cache
        .fetch(&store, "data", Options::default(), Arc::new(NoProgress))
        .await
        .unwrap();
    let after = SystemTime::now();
    assert!(!entry.hit);
    // Written before the entry was published (see the cache's layout), and not touched since.
    let manifest_written = std::fs::metadata(entry.path.parent().unwrap().join("manifest.json"))
        .unwrap()
        .modified()
        .unwrap();

    // The pod's side: the tree checked against the listing, reported as a download would.
    let cached = parse_report(&download_report(&f, "data", &entry.path, true, 0).await);
    let fresh = tempfile::tempdir().unwrap();
    let downloaded = parse_report(&download_report(&f, "data", fresh.path(), false, 0).await);
    assert_eq!(downloaded.cached_at, None, "{downloaded:?}");
    assert_eq!((cached.files, cached.bytes), (3, bytes_n), "{cached:?}");
    assert_eq!(
        (cached.files, cached.bytes, &cached.digest),
        (downloaded.files, downloaded.bytes, &downloaded.digest)
    );
    assert_eq!(cached.digest, common::expected_digest(&files));
    // When it was cached: the publication, within the fetch, after its manifest was written.
    let cached_at: Timestamp = cached
        .cached_at
        .as_deref()
        .expect("cachedAt")
        .parse()
        .unwrap();
    let cached_at = SystemTime::from(cached_at);
    let slack = Duration::from_secs(1);
    assert!(
        before - slack <= cached_at && cached_at <= after + slack,
        "{cached_at:?} not within {before:?}..{after:?}"
    );
    assert!(
        cached_at >= manifest_written,
        "stamped at publication ({cached_at:?}), not when the tree was written (its manifest {manifest_written:?})"
    );

    // A tree holding a file the folder does not list is refused; the same tree without it is not.
    let copy = tempfile::tempdir().unwrap();
    copy_tree(&entry.path, copy.path());
    let same = parse_report(&download_report(&f, "data", copy.path(), true, 0).await);
    assert_eq!(same.digest, cached.digest);
    std::fs::write(copy.path().join("sub/stray.txt"), b"not listed\n").unwrap();
    let refused = download_report(&f, "data", copy.path(), true, 7).await;
    assert!(
        refused.contains("differs from the folder now")
            && refused.contains("it holds 4 files, the folder 3"),
        "{refused}"
    );

    // The folder changes after the node cached it: its tree no longer matches.
    put(&f.client, "data/b.txt", b"bravo\n").await;
    let refused = download_report(&f, "data", &entry.path, true, 7).await;
    assert!(Report::parse(&refused).is_none(), "{refused}");
    assert!(
        refused.contains("differs from the folder now")
            && refused.contains("b.txt has 23 bytes, the folder 6"),
        "{refused}"
    );
}
