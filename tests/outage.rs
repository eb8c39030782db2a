//! Storage outages through `datastore download` / `upload`: an Azurite of the test's own is
//! stopped in the middle of a transfer and started again on its disk 60 s later, behind a proxy
//! that paces the traffic (so that the outage lands mid-transfer) and, while it is down, closes
//! every connection. The transfer rides through within its retry budget, resumes where it
//! stopped and ends byte-exact; an outage longer than the budget fails with the budget named.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::proxy::{self, Pace, Proxy};
use common::restartable::Restartable;
use common::*;
use datastore_operator::store::azure::Body;

/// As long as the outage: past every fixed retry count the engine had before.
const OUTAGE: Duration = Duration::from_secs(60);
/// The transfer moves this much, at [`RATE`], so that it is in the middle when storage stops.
const SIZE: usize = 32 << 20;
const RATE: u64 = 4 << 20;

/// Datastore `blob` on `container` through `proxy`, with the account key.
fn datastores_file(dir: &Path, container: &str, proxy: &Proxy) -> std::path::PathBuf {
    let path = dir.join("datastores.yaml");
    let yaml = datastores_yaml(container, &proxy.endpoint(), &format!("accountKey: {KEY}"));
    std::fs::write(&path, yaml).unwrap();
    path
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_datastore"))
        .args(args)
        .env_remove("DATASTORE_CONFIG")
        .env_remove("DATASTORE_RETRY_BUDGET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn ended(child: Child) -> Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

/// Waits until the proxy has passed `bytes` on (the transfer is under way), then stops
/// storage for [`OUTAGE`] and starts it again.
async fn outage_after(azurite: &Restartable, proxy: &Proxy, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.moved() < bytes {
        assert!(Instant::now() < deadline, "the transfer did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    azurite.stop();
    tokio::time::sleep(OUTAGE).await;
    azurite.resume();
}

#[track_caller]
fn assert_rode_through(out: &Output) {
    assert_exit(out, 0);
    let err = stderr(out);
    assert!(
        err.contains("storage unreachable (") && err.contains("retrying for up to 5m"),
        "the progress said storage was unreachable: {err}"
    );
    assert!(
        err.contains("storage unreachable for ") && err.contains("storage answers again"),
        "and how long, then that it answered again: {err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_rides_through_a_60s_outage_and_ends_byte_exact() {
    let azurite = Restartable::start();
    let container = unique_container();
    let direct = azurite.client(&container);
    direct.create_container().await.unwrap();
    let data = bytes(SIZE, 27);
    direct
        .put_blob(
            "data/big.bin",
            Body::Bytes(data.clone().into()),
            md5(&data),
            false,
        )
        .await
        .unwrap();
    let proxy = proxy::start_to(
        azurite.port,
        Pace {
            bytes_per_second: Some(RATE),
            ..Pace::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ds = datastores_file(dir.path(), &container, &proxy);
    let target = dir.path().join("out");
    let child = spawn(&[
        "download",
        "--datastores",
        ds.to_str().unwrap(),
        "--datastore",
        "blob",
        "--prefix",
        "data",
        "--target-path",
        target.to_str().unwrap(),
        "--progress",
    ]);
    let started = Instant::now();
    outage_after(&azurite, &proxy, 2 << 20).await;
    let out = ended(child).await;
    assert_rode_through(&out);
    assert!(started.elapsed() >= OUTAGE, "{:?}", started.elapsed());
    assert!(
        std::fs::read(target.join("data/big.bin")).unwrap() == data,
        "byte-exact"
    );
    assert_eq!(
        read_tree(&target).len(),
        1,
        "nothing else left: no partial file"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_rides_through_a_60s_outage_and_ends_byte_exact() {
    let azurite = Restartable::start();
    let container = unique_container();
    let direct = azurite.client(&container);
    direct.create_container().await.unwrap();
    let proxy = proxy::start_to(
        azurite.port,
        Pace {
            upload_bytes_per_second: Some(RATE),
            ..Pace::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ds = datastores_file(dir.path(), &container, &proxy);
    let data = bytes(SIZE, 28);
    let small = bytes(1000, 29);
    write_tree(
        &dir.path().join("src"),
        &[("big.bin", data.clone()), ("small.txt", small.clone())],
    );
    let child = spawn(&[
        "upload",
        "--datastores",
        ds.to_str().unwrap(),
        "--datastore",
        "blob",
        "--src-dir",
        dir.path().join("src").to_str().unwrap(),
        "--target-path",
        "outputs",
        "--progress",
    ]);
    outage_after(&azurite, &proxy, 2 << 20).await;
    let out = ended(child).await;
    assert_rode_through(&out);
    for (name, expected) in [("outputs/big.bin", &data), ("outputs/small.txt", &small)] {
        let got = direct
            .get(name, None, None)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(got == expected.as_slice(), "{name} byte-exact");
    }
    let listed = direct.list("outputs/").await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().all(|b| b.md5.is_some()), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_longer_than_the_budget_fails_with_the_budget_named() {
    let azurite = Restartable::start();
    let container = unique_container();
    azurite.client(&container).create_container().await.unwrap();
    let proxy = proxy::start_to(azurite.port, Pace::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = datastores_file(dir.path(), &container, &proxy);
    write_tree(&dir.path().join("src"), &[("a.txt", b"alpha".to_vec())]);
    azurite.stop();
    let src = dir.path().join("src");
    let target = dir.path().join("out");
    for command in [
        vec!["upload", "--src-dir", src.to_str().unwrap()],
        vec!["download", "--target-path", target.to_str().unwrap()],
    ] {
        let started = Instant::now();
        let mut args = command.clone();
        args.extend([
            "--datastores",
            ds.to_str().unwrap(),
            "--datastore",
            "blob",
            "--retry-budget",
            "5s",
            "--progress",
        ]);
        let out = ended(spawn(&args)).await;
        let took = started.elapsed();
        assert_exit(&out, 6);
        let err = stderr(&out);
        assert!(
            err.contains("retry budget of 5s") && err.contains("cannot reach"),
            "{command:?}: {err}"
        );
        assert!(
            err.contains("storage unreachable (") && err.contains("retrying for up to 5s"),
            "{command:?}: the wait was said while it lasted: {err}"
        );
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_secs(30),
            "{command:?} retried for about the budget, no longer: {took:?}"
        );
    }
    assert!(!target.exists() || read_tree(&target).is_empty());
}
