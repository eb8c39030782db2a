//! csi-sanity, the CSI community's conformance suite (github.com/kubernetes-csi/csi-test), run
//! against the CSI node plugin: built from Go modules by `make test-deps` (tests/csi,
//! `.tools/csi-sanity-<version>/csi-sanity`). See tests/csi/README.md for what it checks.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use bpfman_csi::v1 as csi;
use bpfman_csi::v1::node_client::NodeClient;
use tonic::transport::Channel;

/// A NodePublishVolume request of a mount volume (single-node writer, as the kubelet asks for
/// an ephemeral inline volume) with `context` (the volume's attributes) and `secrets`.
pub fn publish_request(
    volume_id: &str,
    target: &Path,
    context: HashMap<String, String>,
    secrets: HashMap<String, String>,
    readonly: bool,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(csi::VolumeCapability {
            access_mode: Some(csi::volume_capability::AccessMode { mode: 2 }),
            access_type: Some(csi::volume_capability::AccessType::Mount(
                csi::volume_capability::MountVolume::default(),
            )),
        }),
        readonly,
        secrets,
        volume_context: context,
        ..Default::default()
    }
}

/// A client of the Node service of the CSI plugin listening on the unix socket `socket`, once it
/// accepts connections (within 10 s).
pub async fn node_client(socket: &Path) -> NodeClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let socket = socket.to_path_buf();
        let connected = tonic::transport::Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                tokio::net::UnixStream::connect(socket.clone())
            }))
            .await;
        match connected {
            Ok(channel) => return NodeClient::new(channel),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the CSI plugin does not accept connections: {e}"),
        }
    }
}

/// The csi-test release, as tests/csi/go.mod pins it; the Makefile reads the same line.
fn csi_test_version() -> String {
    let go_mod = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/csi/go.mod");
    std::fs::read_to_string(&go_mod)
        .unwrap()
        .lines()
        .find_map(|l| {
            let l = l.trim();
            // `go mod tidy` writes a lone direct requirement as `require <path> <version>`.
            let l = l.strip_prefix("require ").map_or(l, str::trim_start);
            l.strip_prefix("github.com/kubernetes-csi/csi-test/v5 ")
        })
        .and_then(|v| v.split_whitespace().next())
        .expect("tests/csi/go.mod requires github.com/kubernetes-csi/csi-test/v5")
        .to_string()
}

/// The `csi-sanity` binary `make test-deps` builds.
fn csi_sanity_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".tools")
        .join(format!("csi-sanity-{}", csi_test_version()))
        .join("csi-sanity");
    assert!(
        bin.exists(),
        "{} is missing: run `make test-deps` (make test-deps builds it from tests/csi with Go, about a minute the first time)",
        bin.display()
    );
    bin
}

/// Runs csi-sanity against the node-only driver listening on the unix socket `endpoint`
/// (Identity + Node services, no Controller), with its mount and staging directories under
/// `work` (`work/mount`, `work/staging`: csi-sanity creates and removes them around each test,
/// so they must not exist yet). `extra` is appended (e.g. `--ginkgo.focus=NodePublishVolume`,
/// `--ginkgo.json-report=<file>`).
///
/// The specs that need a Controller service are skipped: everything named `[Controller
/// Server]`, and `NodeUnpublishVolume should remove target path`, which calls CreateVolume
/// unconditionally. Exit status 0 means every spec that ran passed; stdout names each spec
/// (`--ginkgo.v`) and ends with `Ran N of M Specs` and `SUCCESS!` or `FAIL!`.
///
/// The driver must be listening already: csi-sanity waits up to a minute per spec for a
/// socket it cannot connect to.
pub fn csi_sanity(endpoint: &Path, work: &Path, extra: &[&str]) -> Output {
    let bin = csi_sanity_bin();
    let endpoint = std::path::absolute(endpoint).unwrap();
    assert!(
        endpoint.exists(),
        "no CSI driver socket at {}: start the driver before csi-sanity",
        endpoint.display()
    );
    let work = std::path::absolute(work).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let (mount, staging) = (work.join("mount"), work.join("staging"));
    for dir in [&mount, &staging] {
        assert!(
            !dir.exists(),
            "{} exists: csi-sanity creates it for each test and fails if it is there already",
            dir.display()
        );
    }
    Command::new(&bin)
        .arg(format!("--csi.endpoint=unix://{}", endpoint.display()))
        .arg(format!("--csi.mountdir={}", mount.display()))
        .arg(format!("--csi.stagingdir={}", staging.display()))
        .args([
            r"--ginkgo.skip=\[Controller Server\]",
            "--ginkgo.skip=NodeUnpublishVolume should remove target path",
            "--ginkgo.fail-on-empty",
            "--ginkgo.timeout=5m",
            "--ginkgo.no-color",
            "--ginkgo.v",
        ])
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()))
}
