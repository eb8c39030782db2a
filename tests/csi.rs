//! The CSI node plugin (`datastore csi-node`) over its unix socket, against a real Azurite
//! reached through a proxy that counts blob reads. The plugin runs in a private mount
//! namespace (`unshare --mount`), so its bind mounts vanish with it; the test looks at them
//! through `/proc/<pid>/root`.

mod common;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bpfman_csi::v1 as csi;
use common::proxy::{self, Pace};
use csi::node_client::NodeClient;
use datastore_operator::store::azure::Body;
use futures::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

/// The plugin, in a mount namespace of its own, serving on a socket in `dir`.
struct Plugin {
    child: Child,
    socket: PathBuf,
    /// Where it serves /metrics.
    http: u16,
}

impl Plugin {
    fn start(dir: &Path) -> Plugin {
        let socket = dir.join("csi.sock");
        let http = common::free_port();
        let child = Command::new("unshare")
            .process_group(0)
            .args(["--mount", "--propagation", "private", "--"])
            .arg(env!("CARGO_BIN_EXE_datastore"))
            .args(["csi-node", "--node-id", "node-1", "--cache-size", "1Gi"])
            .arg(format!("--http-addr=127.0.0.1:{http}"))
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .spawn()
            .expect("unshare runs (util-linux)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the plugin did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Plugin {
            child,
            socket,
            http,
        }
    }

    /// A client of the plugin's Node service, once it accepts connections.
    async fn node(&self) -> NodeClient<Channel> {
        common::csi::node_client(&self.socket).await
    }

    /// What it serves on /metrics.
    async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.http);
        reqwest::get(&url).await.unwrap().text().await.unwrap()
    }

    /// `path` as the plugin's mount namespace sees it.
    fn seen(&self, path: &Path) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.child.id())).join(path.strip_prefix("/").unwrap())
    }
}

impl Drop for Plugin {
    /// Kills its whole process group: a shell that restarts the plugin, and the plugin.
    fn drop(&mut self) {
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

fn publish(
    volume: &str,
    target: &Path,
    attributes: &HashMap<String, String>,
    key: &str,
) -> csi::NodePublishVolumeRequest {
    common::csi::publish_request(
        volume,
        target,
        attributes.clone(),
        HashMap::from([("accountKey".to_string(), key.to_string())]),
        true,
    )
}

/// A volume's attributes: folder `path` of `container`, reached at `endpoint`.
fn volume_attributes(container: &str, endpoint: &str, path: &str) -> HashMap<String, String> {
    HashMap::from([
        ("accountName".to_string(), common::ACCOUNT.to_string()),
        ("containerName".to_string(), container.to_string()),
        ("endpoint".to_string(), endpoint.to_string()),
        ("path".to_string(), path.to_string()),
    ])
}

/// Publishes until the plugin answers other than `Unavailable` (the kubelet's retries).
async fn publish_until_ready(
    node: &mut NodeClient<Channel>,
    request: csi::NodePublishVolumeRequest,
) -> (Result<(), tonic::Status>, usize) {
    for attempt in 1..=60 {
        match node.node_publish_volume(request.clone()).await {
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return (other.map(|_| ()), attempt),
        }
    }
    panic!("still unavailable after 60 attempts")
}

/// A new container holding `data/a.txt` and `data/sub/b.csv`.
async fn container_with_a_folder() -> String {
    let container = common::unique_container();
    let blobs = common::client(&container);
    blobs.create_container().await.unwrap();
    for (name, data) in [
        ("data/a.txt", &b"alpha\n"[..]),
        ("data/sub/b.csv", b"x,y\n"),
    ] {
        blobs
            .put_blob(
                name,
                Body::Bytes(data.to_vec().into()),
                common::md5(data),
                false,
            )
            .await
            .unwrap();
    }
    container
}

#[tokio::test(flavor = "multi_thread")]
async fn a_published_folder_comes_from_the_cache_read_only_and_a_second_pod_reads_no_blob() {
    let container = container_with_a_folder().await;
    let proxy = proxy::start(Pace::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(dir.path());
    let mut node = plugin.node().await;
    let attributes = volume_attributes(&container, &proxy.endpoint(), "data");

    let first = dir.path().join("pods/one/volume");
    let (published, _) = publish_until_ready(
        &mut node,
        publish("vol-1", &first, &attributes, common::KEY),
    )
    .await;
    published.unwrap();
    assert_eq!(
        std::fs::read(plugin.seen(&first).join("a.txt")).unwrap(),
        b"alpha\n"
    );
    assert_eq!(
        std::fs::read(plugin.seen(&first).join("sub/b.csv")).unwrap(),
        b"x,y\n"
    );
    let write = std::fs::write(plugin.seen(&first).join("new.txt"), b"x");
    assert!(write.is_err(), "a published tree is read-only");
    assert_eq!(proxy.reads(), 2);

    // Another pod, the same folder: mounted from the cache, no blob read.
    let second = dir.path().join("pods/two/volume");
    let (published, attempts) = publish_until_ready(
        &mut node,
        publish("vol-2", &second, &attributes, common::KEY),
    )
    .await;
    published.unwrap();
    assert_eq!(attempts, 1, "a hit is answered in the first call");
    assert_eq!(
        std::fs::read(plugin.seen(&second).join("a.txt")).unwrap(),
        b"alpha\n"
    );
    assert_eq!(proxy.reads(), 2, "a hit reads no blob");

    // Publishing again is a repeat, not an error.
    node.node_publish_volume(publish("vol-2", &second, &attributes, common::KEY))
        .await
        .unwrap();

    // Credentials that cannot list the folder get nothing, though the tree is cached.
    let third = dir.path().join("pods/three/volume");
    let wrong = "d3Jvbmcga2V5IGZvciB0aGlzIGFjY291bnQ=";
    let (refused, _) =
        publish_until_ready(&mut node, publish("vol-3", &third, &attributes, wrong)).await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(!plugin.seen(&third).join("a.txt").exists());

    // Unpublish: unmounted and removed; a repeat is fine.
    for _ in 0..2 {
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: "vol-1".into(),
            target_path: first.display().to_string(),
        })
        .await
        .unwrap();
    }
    assert!(!plugin.seen(&first).exists());
    assert!(
        plugin.seen(&second).join("a.txt").exists(),
        "the other pod keeps its volume"
    );

    // The node's metrics, after one more hit: one miss, two hits (the refused publish is
    // neither), their bytes, and the one cached tree.
    let fourth = dir.path().join("pods/four/volume");
    let (published, _) = publish_until_ready(
        &mut node,
        publish("vol-4", &fourth, &attributes, common::KEY),
    )
    .await;
    published.unwrap();
    let metrics = plugin.metrics().await;
    for line in [
        "datastore_node_cache_misses_total 1",
        "datastore_node_cache_hits_total 2",
        "datastore_node_cache_downloaded_bytes_total 10",
        "datastore_node_cache_hit_bytes_total 20",
        "datastore_node_cache_entries 1",
        "datastore_node_cache_size_bytes 10",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
}

/// Issue 27's case on a shared node: a pod whose Secret holds a SAS that may only list (`l`) is
/// not served the folder another pod's volume cached, though its listing names the entry: its
/// publish is PermissionDenied and nothing is mounted. A SAS that reads and lists is served it.
#[tokio::test(flavor = "multi_thread")]
async fn a_sas_that_may_only_list_is_not_served_a_folder_another_volume_cached() {
    let container = container_with_a_folder().await;
    let proxy = proxy::start(Pace::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(dir.path());
    let mut node = plugin.node().await;
    let attributes = volume_attributes(&container, &proxy.endpoint(), "data");
    let cached = dir.path().join("pods/key/volume");
    let (published, _) = publish_until_ready(
        &mut node,
        publish("vol-key", &cached, &attributes, common::KEY),
    )
    .await;
    published.unwrap();
    let reads = proxy.reads();
    let with_sas = |volume: &str, target: &Path, permissions| {
        common::csi::publish_request(
            volume,
            target,
            attributes.clone(),
            HashMap::from([("sasToken".to_string(), common::sas(&container, permissions))]),
            true,
        )
    };

    let refused_target = dir.path().join("pods/list-only/volume");
    let (refused, _) = publish_until_ready(
        &mut node,
        with_sas("vol-list-only", &refused_target, common::LIST_ONLY),
    )
    .await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("may list the folder but not read it"),
        "{refused:?}"
    );
    assert!(!plugin.seen(&refused_target).join("a.txt").exists());
    assert_eq!(proxy.reads(), reads);

    let served = dir.path().join("pods/read-list/volume");
    let (published, attempts) = publish_until_ready(
        &mut node,
        with_sas("vol-read-list", &served, common::READ_LIST),
    )
    .await;
    published.unwrap();
    assert_eq!(attempts, 1, "a hit");
    assert_eq!(
        std::fs::read(plugin.seen(&served).join("a.txt")).unwrap(),
        b"alpha\n"
    );
    assert_eq!(proxy.reads(), reads, "a hit reads no blob");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_download_is_retried_by_the_kubelet_not_held_in_one_call() {
    let container = common::unique_container();
    let blobs = common::client(&container);
    blobs.create_container().await.unwrap();
    let data = vec![3u8; 2 << 20];
    blobs
        .put_blob(
            "data/big.bin",
            Body::Bytes(data.clone().into()),
            common::md5(&data),
            false,
        )
        .await
        .unwrap();
    // Every piece of every answer waits 200 ms: the download takes well over the 5 s a
    // publish call waits.
    let proxy = proxy::start(Pace {
        delay: Duration::from_millis(200),
        ..Pace::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(dir.path());
    let mut node = plugin.node().await;
    let attributes = volume_attributes(&container, &proxy.endpoint(), "data");
    let target = dir.path().join("pods/slow/volume");
    let started = Instant::now();
    let first = node
        .node_publish_volume(publish("vol-slow", &target, &attributes, common::KEY))
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::Unavailable, "{first:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "one call is bounded"
    );
    let (published, _) = publish_until_ready(
        &mut node,
        publish("vol-slow", &target, &attributes, common::KEY),
    )
    .await;
    published.unwrap();
    assert_eq!(
        std::fs::read(plugin.seen(&target).join("big.bin")).unwrap(),
        data
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_publish_lacks_is_an_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(dir.path());
    let mut node = plugin.node().await;
    let attributes = HashMap::from([("accountName".to_string(), "a".to_string())]);
    let target = dir.path().join("t");
    let mut no_volume = publish("", &target, &attributes, "k");
    no_volume.volume_id.clear();
    let mut no_target = publish("v", &target, &attributes, "k");
    no_target.target_path.clear();
    let mut no_capability = publish("v", &target, &attributes, "k");
    no_capability.volume_capability = None;
    let no_container = publish("v", &target, &attributes, "k");
    for request in [no_volume, no_target, no_capability, no_container] {
        let status = node.node_publish_volume(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
}

/// csi-sanity, the CSI community's conformance suite, against the plugin: every spec that
/// applies to a node-only driver of ephemeral volumes (tests/csi/README.md lists them).
#[test]
fn csi_sanity_passes() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(dir.path());
    let out = common::csi::csi_sanity(&plugin.socket, &dir.path().join("sanity"), &[]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains("SUCCESS!"),
        "csi-sanity failed:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("10 Passed"), "{report}");
}

/// A restart of the plugin keeps the pods' bind mounts (the kubelet does not publish them
/// again) but not its leases: the new process finds the mounted trees in its mount table and
/// leases them, so eviction does not empty a running pod's volume.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_restart_a_mounted_tree_is_still_never_evicted() {
    let container = common::unique_container();
    let blobs = common::client(&container);
    blobs.create_container().await.unwrap();
    let data = vec![9u8; 200_000];
    for name in ["a/one.bin", "b/two.bin"] {
        blobs
            .put_blob(
                name,
                Body::Bytes(data.clone().into()),
                common::md5(&data),
                false,
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    // One mount namespace for both runs of the plugin: a shell restarts it when it dies.
    let http = common::free_port();
    let script = format!(
        "while true; do {} csi-node --node-id n --cache-size 100Ki --http-addr=127.0.0.1:{http} --endpoint=unix://{} --cache-dir {}; done",
        env!("CARGO_BIN_EXE_datastore"),
        socket.display(),
        dir.path().join("cache").display()
    );
    let shell = Command::new("unshare")
        .process_group(0)
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .spawn()
        .unwrap();
    let plugin = Plugin {
        child: shell,
        socket: socket.clone(),
        http,
    };
    let wait_for_socket = || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the plugin did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for_socket();
    let attributes = |path: &str| volume_attributes(&container, &common::endpoint(), path);
    let first = dir.path().join("pods/a/volume");
    let mut node = plugin.node().await;
    let (published, _) = publish_until_ready(
        &mut node,
        publish("vol-a", &first, &attributes("a"), common::KEY),
    )
    .await;
    published.unwrap();

    // Kill the plugin (not the shell): it restarts in the same mount namespace.
    let pids = Command::new("pgrep")
        .args(["-P", &plugin.child.id().to_string()])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&pids.stdout).trim().to_string();
    assert!(
        Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    // The new run replaces the socket file the killed one left; `node` waits until it answers.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Another folder, over the 100 KiB the cache keeps: eviction runs, and spares `a`.
    let second = dir.path().join("pods/b/volume");
    let mut node = plugin.node().await;
    let (published, _) = publish_until_ready(
        &mut node,
        publish("vol-b", &second, &attributes("b"), common::KEY),
    )
    .await;
    published.unwrap();
    assert_eq!(
        std::fs::read(plugin.seen(&first).join("one.bin")).unwrap(),
        data
    );
    // Unpublishing releases the adopted lease too.
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: "vol-a".into(),
        target_path: first.display().to_string(),
    })
    .await
    .unwrap();
}

/// The node cache's numbers (not a timed test: `cargo test --release --test csi -- --ignored
/// --nocapture`): W1 (10,000 x 16 KiB) and W2 (16 x 64 MiB), a miss (NodePublishVolume until
/// mounted) against `datastore download` of the same folder, then a hit.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn numbers_of_a_miss_and_a_hit_against_a_download() {
    let container = common::unique_container();
    let blobs = Arc::new(common::client(&container));
    blobs.create_container().await.unwrap();
    let workloads: [(&str, usize, usize); 2] = [("w1", 10_000, 16 << 10), ("w2", 16, 64 << 20)];
    for (name, files, size) in workloads {
        let data = Arc::new(vec![5u8; size]);
        let md5 = common::md5(&data);
        let puts = (0..files).map(|i| {
            let (blobs, data) = (blobs.clone(), data.clone());
            async move {
                blobs
                    .put_blob(
                        &format!("{name}/f{i:05}"),
                        Body::Bytes(data.to_vec().into()),
                        md5,
                        false,
                    )
                    .await
                    .unwrap()
            }
        });
        futures::stream::iter(puts)
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let datastores = dir.path().join("datastores.yaml");
    std::fs::write(
        &datastores,
        format!(
            "apiVersion: datastore.dev/v1alpha1\nkind: Datastore\nmetadata: {{name: blob}}\nspec:\n  azureBlob: {{accountName: {}, containerName: {container}, endpoint: \"{}\", credentials: {{secretRef: {{name: k}}}}}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: k}}\nstringData: {{accountKey: \"{}\"}}\n",
            common::ACCOUNT,
            common::endpoint(),
            common::KEY
        ),
    )
    .unwrap();
    let plugin = Plugin::start(dir.path());
    let mut node = plugin.node().await;
    for (name, _, _) in workloads {
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_datastore"))
            .args([
                "download",
                "--datastore",
                "blob",
                "--prefix",
                name,
                "--datastores",
            ])
            .arg(&datastores)
            .arg("--target-path")
            .arg(dir.path().join(format!("download-{name}")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let download = started.elapsed();
        let attributes = volume_attributes(&container, &common::endpoint(), name);
        let started = Instant::now();
        let target = dir.path().join(format!("pods/{name}-1/volume"));
        let (published, _) = publish_until_ready(
            &mut node,
            publish(&format!("{name}-1"), &target, &attributes, common::KEY),
        )
        .await;
        published.unwrap();
        let miss = started.elapsed();
        let started = Instant::now();
        let target = dir.path().join(format!("pods/{name}-2/volume"));
        let (published, _) = publish_until_ready(
            &mut node,
            publish(&format!("{name}-2"), &target, &attributes, common::KEY),
        )
        .await;
        published.unwrap();
        let hit = started.elapsed();
        println!(
            "{name}: datastore download {:.2} s; miss (publish until mounted) {:.2} s ({:.2}x); hit {:.3} s",
            download.as_secs_f64(),
            miss.as_secs_f64(),
            miss.as_secs_f64() / download.as_secs_f64(),
            hit.as_secs_f64()
        );
    }
}
