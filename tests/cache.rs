//! The download cache against a real Azurite, reached through a proxy that counts the blob
//! reads: a hit reads nothing, a changed blob is a new entry, concurrent fetches download once,
//! eviction spares what is in use, a restart keeps the entries, a broken entry is replaced,
//! and credentials that cannot list the folder get nothing.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::proxy::{self, Pace, Proxy};

use datastore_operator::cache::Cache;
use datastore_operator::store::azure::{Body, Tuning};
use datastore_operator::store::{AzureBlobConfig, AzureCredential, BlobClient, Secret, Store};
use datastore_operator::transfer::{NoProgress, Options};

fn store_at(port: u16, container: &str, key: &str) -> Store {
    let config = AzureBlobConfig {
        account: common::ACCOUNT.into(),
        container: container.into(),
        endpoint: format!("http://127.0.0.1:{port}/{}", common::ACCOUNT)
            .parse()
            .unwrap(),
        credential: AzureCredential::AccountKey(Secret::new(key)),
        credential_source: "test".into(),
        read_only: false,
    };
    Store::Azure(BlobClient::new(config, Tuning::default()).unwrap())
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
