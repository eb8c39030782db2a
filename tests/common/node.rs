//! A node for the real control plane ([`super::cluster`]): it registers a Node, keeps it Ready,
//! provisions the claims of a default StorageClass as host directories (a PersistentVolume each,
//! bound by the real PV controller), and runs the pods the real scheduler binds to it with
//! podman (runc, cgroupfs), as a kubelet would: init containers in order, then the containers;
//! volumes bind-mounted at their paths (emptyDir and claims as directories, Secrets as files),
//! the termination message file read back, and the pod's status written through the API. A
//! pod being deleted is removed once its containers are gone. Containers' output is logged as
//! it comes, with timestamps, and served as a kubelet serves it (HTTPS
//! `/containerLogs/<ns>/<pod>/<container>`), so the apiserver's `pods/log` works.
//!
//! Images: the operator's image is built from the binary under test with the Dockerfile's own
//! layout (tests/common/image.rs: binary path, user, entrypoint), `FROM scratch` with the
//! shared libraries it links; the user's image is a stand-in holding busybox. Nothing is
//! pulled. CSI inline volumes of the node cache (`cache.datastore.dev`) are published as a
//! kubelet publishes them: through the node plugin under test (`datastore csi-node`, started
//! on first use in this machine's mount namespace), with the `nodePublishSecretRef` Secret's
//! data and the pod's information, retried while it answers `Unavailable`, and unpublished when
//! the pod's containers have ended. What it cannot do (native sidecars, other CSI drivers,
//! generic ephemeral volumes, `valueFrom` variables) fails the pod saying so.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Container, Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::cluster::Cluster;

/// The node's name.
pub const NODE: &str = "e2e-node";
/// The default StorageClass whose claims this node provisions.
pub const STORAGE_CLASS: &str = "e2e-local";
/// The operator's image as this node knows it.
pub const AGENT_IMAGE: &str = "localhost/datastore:e2e";
/// The stand-in for users' images: busybox (`sh` and its applets).
pub const STANDIN_IMAGE: &str = "localhost/standin:e2e";

/// podman, as this machine runs it (root, runc, cgroupfs, no per-container ulimits).
fn podman(dir: &Path) -> Command {
    let conf = dir.join("containers.conf");
    if !conf.exists() {
        std::fs::write(&conf, "[containers]\ndefault_ulimits = []\n").unwrap();
    }
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf)
        .args(["--runtime", "runc", "--cgroup-manager=cgroupfs"]);
    cmd
}

fn run(mut cmd: Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (apt install podman runc)"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The libraries `binary` links, as `ldd` finds them.
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = run(
        {
            let mut c = Command::new("ldd");
            c.arg(binary);
            c
        },
        "ldd",
    );
    out.lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?.to_string();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Copies `file` into `context` at its own absolute path.
fn copy_into(context: &Path, file: &Path, at: &str) {
    let target = context.join(at.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(file, &target).unwrap();
}

/// Builds the operator's image from the binary under test, in the Dockerfile's layout, and
/// the stand-in image. Once per test process.
pub fn build_images(dir: &Path) {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let binary = Path::new(env!("CARGO_BIN_EXE_datastore"));
        let context = dir.join("image-datastore");
        let _ = std::fs::remove_dir_all(&context);
        copy_into(&context, binary, &super::image::binary_path());
        for lib in shared_libraries(binary) {
            copy_into(&context, &lib, lib.to_str().unwrap());
        }
        // What distroless' base brings besides the libraries: the CA certificates (the HTTP
        // client refuses to start without any).
        let bundle = "/etc/ssl/certs/ca-certificates.crt";
        copy_into(&context, Path::new(bundle), bundle);
        let entrypoint = serde_json::to_string(&super::image::entrypoint()).unwrap();
        std::fs::write(
            context.join("Containerfile"),
            format!(
                "FROM scratch\nCOPY . /\nUSER {}\nENTRYPOINT {entrypoint}\n",
                super::image::user()
            ),
        )
        .unwrap();
        let mut build = podman(dir);
        build
            .args(["build", "-q", "-t", AGENT_IMAGE, "-f"])
            .arg(context.join("Containerfile"))
            .arg(&context);
        run(build, "podman build the operator's image");

        let context = dir.join("image-standin");
        let _ = std::fs::remove_dir_all(&context);
        for applet in [
            "busybox", "sh", "ls", "cat", "cp", "mkdir", "find", "wc", "echo",
        ] {
            copy_into(
                &context,
                Path::new("/bin/busybox"),
                &format!("/bin/{applet}"),
            );
        }
        std::fs::write(context.join("Containerfile"), "FROM scratch\nCOPY . /\n").unwrap();
        let mut build = podman(dir);
        build
            .args(["build", "-q", "-t", STANDIN_IMAGE, "-f"])
            .arg(context.join("Containerfile"))
            .arg(&context);
        run(
            build,
            "podman build the stand-in image (apt install busybox-static)",
        );
    });
}

/// Starts the node on its own runtime: registration, heartbeats, the provisioner and the pods.
pub fn start(cluster: &'static Cluster) {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        build_images(&cluster.dir);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let port = serve_logs(&cluster.dir);
            KUBELET_PORT.set(port).unwrap();
            runtime.block_on(async move {
                let client = cluster.admin();
                register(&client).await;
                tx.send(()).unwrap();
                let runs = Arc::new(Mutex::new(Runs::default()));
                loop {
                    heartbeat(&client).await;
                    for _ in 0..20 {
                        provision(&client, &cluster.dir).await;
                        pods(&client, &cluster.dir, &runs).await;
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            });
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the node registers");
    });
}

async fn register(client: &kube::Client) {
    super::operator::apply(
        client,
        &json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
                "provisioner": "e2e.datastore.dev/hostpath", "volumeBindingMode": "Immediate",
                "reclaimPolicy": "Retain"}),
    )
    .await;
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux"}},
    }))
    .unwrap();
    if nodes.get_opt(NODE).await.unwrap().is_none() {
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }
    heartbeat(client).await;
}

/// The node's status (Ready, what it can hold) and its Lease, as a kubelet renews them.
async fn heartbeat(client: &kube::Client) {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let capacity =
        json!({"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "500Gi"});
    let status = json!({"status": {
        "capacity": capacity, "allocatable": capacity,
        // Where the apiserver reaches this node's log endpoint (pods/log).
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": KUBELET_PORT.get().copied().unwrap_or(10250)}},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "the e2e node runs pods with podman",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "nodeInfo": {"machineID": "e2e", "systemUUID": "e2e", "bootID": "e2e", "kernelVersion": "",
                     "osImage": "", "containerRuntimeVersion": "podman", "kubeletVersion": "v1.30.14",
                     "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
    }});
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch_status(NODE, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some(NODE.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(NODE.into()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        }),
    };
    let _ = leases
        .patch(
            NODE,
            &PatchParams::apply("e2e-node").force(),
            &Patch::Apply(&lease),
        )
        .await;
}

/// A PersistentVolume (a host directory) for each claim of [`STORAGE_CLASS`] that has none;
/// the PV controller binds them.
async fn provision(client: &kube::Client, dir: &Path) {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let Ok(list) = claims.list(&ListParams::default()).await else {
        return;
    };
    for claim in list.items {
        let spec = claim.spec.clone().unwrap_or_default();
        if spec.storage_class_name.as_deref() != Some(STORAGE_CLASS)
            || spec.volume_name.is_some()
            || claim.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let (ns, name, uid) = (
            claim.metadata.namespace.clone().unwrap(),
            claim.metadata.name.clone().unwrap(),
            claim.metadata.uid.clone().unwrap(),
        );
        let pv_name = format!("pv-{uid}");
        if volumes.get_opt(&pv_name).await.ok().flatten().is_some() {
            continue;
        }
        let path = dir.join("volumes").join(&pv_name);
        std::fs::create_dir_all(&path).unwrap();
        let size = spec
            .resources
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").cloned())
            .map(|q| q.0)
            .unwrap_or_else(|| "1Gi".into());
        let pv: PersistentVolume = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "annotations": {"pv.kubernetes.io/provisioned-by": "e2e.datastore.dev/hostpath"}},
            "spec": {"capacity": {"storage": size}, "accessModes": spec.access_modes,
                     "storageClassName": STORAGE_CLASS, "persistentVolumeReclaimPolicy": "Retain",
                     "hostPath": {"path": path, "type": "Directory"},
                     "claimRef": {"namespace": ns, "name": name, "uid": uid}},
        }))
        .unwrap();
        let _ = volumes.create(&PostParams::default(), &pv).await;
    }
}

/// Runs the pods newly bound to this node; removes those being deleted.
/// The pods this node runs and has run, by uid. A pod runs once, as under a kubelet with
/// `restartPolicy: Never`: a list taken just before a run ended still shows the pod unfinished,
/// and must not start it again.
#[derive(Default)]
struct Runs {
    running: BTreeSet<String>,
    ended: BTreeSet<String>,
}

async fn pods(client: &kube::Client, dir: &Path, runs: &Arc<Mutex<Runs>>) {
    let pods: Api<Pod> = Api::all(client.clone());
    let selector = format!("spec.nodeName={NODE}");
    let Ok(list) = pods.list(&ListParams::default().fields(&selector)).await else {
        return;
    };
    for pod in list.items {
        let uid = pod.metadata.uid.clone().unwrap();
        let ns = pod.metadata.namespace.clone().unwrap();
        let name = pod.metadata.name.clone().unwrap();
        let (busy, ended) = {
            let runs = runs.lock().unwrap();
            (runs.running.contains(&uid), runs.ended.contains(&uid))
        };
        if pod.metadata.deletion_timestamp.is_some() {
            if !busy {
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                let _ = api
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
            }
            continue;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        if busy || ended || matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue;
        }
        runs.lock().unwrap().running.insert(uid.clone());
        let (client, dir, runs) = (client.clone(), dir.to_path_buf(), runs.clone());
        tokio::spawn(async move {
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let outcome = run_pod(&client, &api, &pod, &dir).await;
            if let Err(why) = outcome {
                log(&dir, &format!("pod {ns}/{name}: {why}"));
                let status =
                    json!({"status": {"phase": "Failed", "reason": "E2ENode", "message": why}});
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await;
            }
            let mut runs = runs.lock().unwrap();
            runs.running.remove(&uid);
            runs.ended.insert(uid);
        });
    }
}

/// A line in the node's log (`node.log` in the cluster's directory).
fn log(dir: &Path, line: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))
        .unwrap();
    let _ = writeln!(f, "{} {line}", chrono::Utc::now().to_rfc3339());
}

/// A container's status entry, terminated with `code` and `message`.
fn terminated(
    c: &Container,
    image: &str,
    code: i32,
    message: &str,
    started: &str,
) -> serde_json::Value {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    json!({"name": c.name, "image": image, "imageID": image, "ready": false, "restartCount": 0,
           "state": {"terminated": {"exitCode": code, "reason": if code == 0 {"Completed"} else {"Error"},
                                    "message": message, "startedAt": started, "finishedAt": now}}})
}

fn running_status(c: &Container, image: &str, started: &str) -> serde_json::Value {
    json!({"name": c.name, "image": image, "imageID": image, "ready": false, "restartCount": 0,
           "state": {"running": {"startedAt": started}}})
}

fn waiting_status(c: &Container, image: &str) -> serde_json::Value {
    json!({"name": c.name, "image": image, "imageID": "", "ready": false, "restartCount": 0,
           "state": {"waiting": {"reason": "PodInitializing"}}})
}

/// The node cache's plugin, started once: its socket.
fn node_plugin(dir: &Path) -> &'static Path {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let socket = dir.join("csi-node.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_datastore"));
        cmd.args(["csi-node", "--node-id", NODE, "--cache-size", "1Gi"])
            .arg(format!("--http-addr=127.0.0.1:{}", super::free_port()))
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .arg("--cache-dir")
            .arg(dir.join("node-cache"));
        super::cluster::spawn_logged(cmd, &dir.join("csi-node.log"));
        socket
    })
}

/// A published CSI volume: what NodeUnpublishVolume needs.
struct Published {
    volume_id: String,
    target: PathBuf,
}

/// Publishes the node cache's inline volume `v` of `pod` at `target`, as the kubelet does: the
/// Secret's data, the volume's attributes with the pod's information, read-only as the volume
/// says; retried while the plugin answers `Unavailable` (at most 5 minutes).
async fn publish(
    client: &kube::Client,
    dir: &Path,
    pod: &Pod,
    v: &k8s_openapi::api::core::v1::Volume,
    target: &Path,
) -> Result<Published, String> {
    let source = v.csi.as_ref().expect("a CSI volume");
    if source.driver != datastore_operator::plan::contract::NODE_CACHE_DRIVER {
        return Err(format!(
            "volume {} is of the CSI driver {}, which the e2e node does not run",
            v.name, source.driver
        ));
    }
    let ns = pod.metadata.namespace.clone().unwrap();
    let uid = pod.metadata.uid.clone().unwrap();
    let mut secrets = std::collections::HashMap::new();
    if let Some(reference) = &source.node_publish_secret_ref {
        let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let secret = api
            .get(&reference.name)
            .await
            .map_err(|e| format!("Secret {} of volume {}: {e}", reference.name, v.name))?;
        for (key, value) in secret.data.iter().flatten() {
            secrets.insert(key.clone(), String::from_utf8_lossy(&value.0).to_string());
        }
    }
    let mut context: std::collections::HashMap<String, String> = source
        .volume_attributes
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    // podInfoOnMount, as the chart's CSIDriver asks.
    for (key, value) in [
        (
            "csi.storage.k8s.io/pod.name",
            pod.metadata.name.clone().unwrap(),
        ),
        ("csi.storage.k8s.io/pod.namespace", ns.clone()),
        ("csi.storage.k8s.io/pod.uid", uid.clone()),
        ("csi.storage.k8s.io/ephemeral", "true".into()),
    ] {
        context.insert(key.into(), value);
    }
    let volume_id = format!("csi-{uid}-{}", v.name);
    let request = super::csi::publish_request(
        &volume_id,
        target,
        context,
        secrets,
        source.read_only == Some(true),
    );
    let mut node = super::csi::node_client(node_plugin(dir)).await;
    for _ in 0..300 {
        match node.node_publish_volume(request.clone()).await {
            Ok(_) => {
                return Ok(Published {
                    volume_id,
                    target: target.to_path_buf(),
                });
            }
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(status) => {
                return Err(format!(
                    "MountVolume.SetUp failed for volume {}: {}",
                    v.name,
                    status.message()
                ));
            }
        }
    }
    Err(format!(
        "volume {} was not published within 5 minutes",
        v.name
    ))
}

async fn unpublish(dir: &Path, published: Vec<Published>) {
    for p in published {
        let mut node = super::csi::node_client(node_plugin(dir)).await;
        let request = bpfman_csi::v1::NodeUnpublishVolumeRequest {
            volume_id: p.volume_id,
            target_path: p.target.display().to_string(),
        };
        if let Err(status) = node.node_unpublish_volume(request).await {
            log(
                dir,
                &format!("unpublish {}: {}", p.target.display(), status.message()),
            );
        }
    }
}

/// Sets up the pod's volumes and runs its containers; `Err` is why it cannot run here. The node
/// cache's volumes are unpublished once the containers have ended.
async fn run_pod(
    client: &kube::Client,
    api: &Api<Pod>,
    pod: &Pod,
    dir: &Path,
) -> Result<(), String> {
    let mut published = Vec::new();
    let outcome = run_published(client, api, pod, dir, &mut published).await;
    unpublish(dir, published).await;
    outcome
}

async fn run_published(
    client: &kube::Client,
    api: &Api<Pod>,
    pod: &Pod,
    dir: &Path,
    published: &mut Vec<Published>,
) -> Result<(), String> {
    let name = pod.metadata.name.clone().unwrap();
    let ns = pod.metadata.namespace.clone().unwrap();
    let uid = pod.metadata.uid.clone().unwrap();
    let spec = pod.spec.clone().unwrap();
    let pod_dir = dir.join("pods").join(&uid);
    let security = spec.security_context.clone().unwrap_or_default();
    let group = security.fs_group;
    // Volumes as host directories.
    let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        let path = if v.empty_dir.is_some() {
            let p = pod_dir.join("volumes").join(&v.name);
            std::fs::create_dir_all(&p).unwrap();
            p
        } else if let Some(source) = &v.persistent_volume_claim {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
            let claim = claims
                .get(&source.claim_name)
                .await
                .map_err(|e| e.to_string())?;
            let volume = claim
                .spec
                .and_then(|s| s.volume_name)
                .ok_or_else(|| format!("claim {} is not bound", source.claim_name))?;
            let pvs: Api<PersistentVolume> = Api::all(client.clone());
            let pv = pvs.get(&volume).await.map_err(|e| e.to_string())?;
            PathBuf::from(
                pv.spec
                    .and_then(|s| s.host_path)
                    .ok_or("a volume that is not a host directory")?
                    .path,
            )
        } else if let Some(source) = &v.secret {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
            let secret = secrets
                .get(source.secret_name.as_deref().unwrap_or_default())
                .await
                .map_err(|e| format!("Secret for volume {}: {e}", v.name))?;
            let p = pod_dir.join("volumes").join(&v.name);
            std::fs::create_dir_all(&p).unwrap();
            for (key, value) in secret.data.iter().flatten() {
                std::fs::write(p.join(key), &value.0).unwrap();
            }
            p
        } else if let Some(projected) = &v.projected {
            // The service account token volume every pod gets: a token for the pod's service
            // account, the cluster's CA, the namespace.
            let p = pod_dir.join("volumes").join(&v.name);
            std::fs::create_dir_all(&p).unwrap();
            for source in projected.sources.iter().flatten() {
                if let Some(token) = &source.service_account_token {
                    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
                        Api::namespaced(client.clone(), &ns);
                    let request = k8s_openapi::api::authentication::v1::TokenRequest {
                        spec: Some(Default::default()),
                        ..Default::default()
                    };
                    let account = spec
                        .service_account_name
                        .clone()
                        .unwrap_or("default".into());
                    let issued: k8s_openapi::api::authentication::v1::TokenRequest = accounts
                        .create_subresource("token", &account, &PostParams::default(), &request)
                        .await
                        .map_err(|e| format!("a token for service account {account}: {e}"))?;
                    let value = issued.status.and_then(|s| s.token).unwrap_or_default();
                    std::fs::write(p.join(&token.path), value).unwrap();
                }
                if let Some(config_map) = &source.config_map {
                    for item in config_map.items.iter().flatten() {
                        if item.key == "ca.crt" {
                            std::fs::copy(dir.join("pki/ca.crt"), p.join(&item.path)).unwrap();
                        }
                    }
                }
                if let Some(downward) = &source.downward_api {
                    for item in downward.items.iter().flatten() {
                        std::fs::write(p.join(&item.path), &ns).unwrap();
                    }
                }
            }
            p
        } else if v.csi.is_some() {
            // The kubelet's `.../volumes/kubernetes.io~csi/<name>/mount`; the plugin creates it.
            let target = pod_dir.join("volumes").join(&v.name).join("mount");
            published.push(publish(client, dir, pod, v, &target).await?);
            // A read-only tree, shared by pods of any group (fsGroupPolicy: None).
            volumes.insert(v.name.clone(), target);
            continue;
        } else {
            return Err(format!(
                "volume {} is of a kind the e2e node cannot provide (only emptyDir, persistentVolumeClaim, secret, projected, and CSI volumes of cache.datastore.dev)",
                v.name
            ));
        };
        if let Some(gid) = group {
            // fsGroup: the volume belongs to the pod's group, group-writable.
            chown_group(&path, gid as u32);
        }
        volumes.insert(v.name.clone(), path);
    }

    let init = spec.init_containers.clone().unwrap_or_default();
    let main = spec.containers.clone();
    let started = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut init_statuses: Vec<serde_json::Value> = init
        .iter()
        .map(|c| waiting_status(c, c.image.as_deref().unwrap_or_default()))
        .collect();
    let mut statuses: Vec<serde_json::Value> = main
        .iter()
        .map(|c| waiting_status(c, c.image.as_deref().unwrap_or_default()))
        .collect();
    let write = |phase: &str, init: &[serde_json::Value], main: &[serde_json::Value]| {
        let status = json!({"status": {"phase": phase, "startTime": started,
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "initContainerStatuses": init, "containerStatuses": main}});
        let api = api.clone();
        let name = name.clone();
        async move {
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    write("Pending", &init_statuses, &statuses).await?;
    for (i, c) in init.iter().enumerate() {
        if c.restart_policy.as_deref() == Some("Always") {
            return Err(format!(
                "container {} is a native sidecar, which the e2e node does not run",
                c.name
            ));
        }
        let image = c.image.clone().unwrap_or_default();
        init_statuses[i] = running_status(c, &image, &started);
        write("Pending", &init_statuses, &statuses).await?;
        let (code, message) =
            run_container(dir, &pod_dir, (&ns, &name), &spec, c, &volumes).await?;
        init_statuses[i] = terminated(c, &image, code, &message, &started);
        if code != 0 {
            return write("Failed", &init_statuses, &statuses).await;
        }
        write("Pending", &init_statuses, &statuses).await?;
    }
    let mut failed = false;
    for (i, c) in main.iter().enumerate() {
        let image = c.image.clone().unwrap_or_default();
        statuses[i] = running_status(c, &image, &started);
        write("Running", &init_statuses, &statuses).await?;
        let (code, message) =
            run_container(dir, &pod_dir, (&ns, &name), &spec, c, &volumes).await?;
        statuses[i] = terminated(c, &image, code, &message, &started);
        failed |= code != 0;
    }
    write(
        if failed { "Failed" } else { "Succeeded" },
        &init_statuses,
        &statuses,
    )
    .await
}

fn chown_group(path: &Path, gid: u32) {
    use std::os::unix::fs::PermissionsExt;
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    unsafe {
        libc::chown(c.as_ptr(), u32::MAX, gid);
    }
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o2777));
}

/// Runs one container with podman; its exit code and termination message.
async fn run_container(
    dir: &Path,
    pod_dir: &Path,
    (namespace, pod_name): (&str, &str),
    pod: &k8s_openapi::api::core::v1::PodSpec,
    c: &Container,
    volumes: &BTreeMap<String, PathBuf>,
) -> Result<(i32, String), String> {
    let image = c.image.clone().unwrap_or_default();
    let mut cmd = podman(dir);
    cmd.args(["run", "--rm", "--network", "host", "--pull=never"]);
    let pod_security = pod.security_context.clone().unwrap_or_default();
    let security = c.security_context.clone().unwrap_or_default();
    let user = security.run_as_user.or(pod_security.run_as_user);
    let group = security.run_as_group.or(pod_security.run_as_group);
    if let Some(user) = user {
        let mut spec = format!("{user}:{}", group.unwrap_or(user));
        if let Some(fs_group) = pod_security.fs_group {
            cmd.arg(format!("--group-add={fs_group}"));
            spec = format!("{user}:{}", group.unwrap_or(fs_group));
        }
        cmd.arg(format!("--user={spec}"));
    }
    if security.read_only_root_filesystem == Some(true) {
        cmd.arg("--read-only");
    }
    if security.privileged == Some(true) {
        return Err(format!(
            "container {} is privileged, which the e2e node refuses",
            c.name
        ));
    }
    for e in c.env.iter().flatten() {
        if e.value_from.is_some() {
            return Err(format!(
                "variable {} of container {} comes from valueFrom, which the e2e node does not resolve",
                e.name, c.name
            ));
        }
        cmd.arg("-e").arg(format!(
            "{}={}",
            e.name,
            e.value.clone().unwrap_or_default()
        ));
    }
    if let Some(wd) = &c.working_dir {
        cmd.arg(format!("--workdir={wd}"));
    }
    for m in c.volume_mounts.iter().flatten() {
        let base = volumes
            .get(&m.name)
            .ok_or_else(|| format!("container {} mounts unknown volume {}", c.name, m.name))?;
        let host = match m.sub_path.as_deref() {
            Some(sub) if !sub.is_empty() => {
                let p = base.join(sub);
                std::fs::create_dir_all(&p).unwrap();
                if let Some(gid) = pod_security.fs_group {
                    chown_group(&p, gid as u32);
                }
                p
            }
            _ => base.clone(),
        };
        let ro = if m.read_only == Some(true) { ":ro" } else { "" };
        cmd.arg("-v")
            .arg(format!("{}:{}{ro}", host.display(), m.mount_path));
    }
    let log_dir = pod_dir.join("containers").join(&c.name);
    std::fs::create_dir_all(&log_dir).unwrap();
    let termination = log_dir.join("termination-log");
    std::fs::write(&termination, "").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&termination, std::fs::Permissions::from_mode(0o666)).unwrap();
    let path = c
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    cmd.arg("-v")
        .arg(format!("{}:{path}", termination.display()));
    let mut args: Vec<String> = Vec::new();
    if let Some(command) = &c.command {
        cmd.arg(format!(
            "--entrypoint={}",
            serde_json::to_string(command).unwrap()
        ));
    }
    cmd.arg(&image);
    args.extend(c.args.iter().flatten().cloned());
    cmd.args(&args);
    let log = log_dir.join("log");
    LOGS.lock()
        .unwrap()
        .insert(format!("{namespace}/{pod_name}/{}", c.name), log.clone());
    let output = tokio::task::spawn_blocking(move || logged(cmd, &log))
        .await
        .unwrap()
        .map_err(|e| format!("podman: {e}"))?;
    std::fs::write(log_dir.join("stdout"), &output.stdout).unwrap();
    std::fs::write(log_dir.join("stderr"), &output.stderr).unwrap();
    let code = output.status.code().unwrap_or(137);
    let mut message = std::fs::read_to_string(&termination).unwrap_or_default();
    if message.is_empty()
        && code != 0
        && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
    {
        // The kubelet's fallback: the last lines of the log.
        let log = String::from_utf8_lossy(&output.stderr).to_string()
            + &String::from_utf8_lossy(&output.stdout);
        let lines: Vec<&str> = log.lines().rev().take(80).collect();
        message = lines.into_iter().rev().collect::<Vec<_>>().join("\n");
    }
    if code == 125 || code == 127 {
        // podman's own failures (image, command not found): as the kubelet reports them.
        message = format!("{message}{}", String::from_utf8_lossy(&output.stderr));
    }
    Ok((code, message))
}

/// The port of this node's log endpoint.
static KUBELET_PORT: OnceLock<u16> = OnceLock::new();

/// Each container's log file, by `<namespace>/<pod>/<container>`.
static LOGS: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());

/// Runs `cmd` to its end like `Command::output`, also appending each line of its stdout and
/// stderr to `log` as it comes, prefixed by its time as the kubelet's log files have it.
fn logged(mut cmd: Command, log: &Path) -> std::io::Result<std::process::Output> {
    use std::io::{BufRead, Write};
    use std::process::Stdio;
    let file = Arc::new(Mutex::new(std::fs::File::create(log)?));
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let copy = |from: Box<dyn std::io::Read + Send>| {
        let file = file.clone();
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut reader = std::io::BufReader::new(from);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                all.extend_from_slice(&line);
                let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
                let mut f = file.lock().unwrap();
                let _ = write!(f, "{at} ");
                let _ = f.write_all(&line);
                if !line.ends_with(b"\n") {
                    let _ = f.write_all(b"\n");
                }
                line.clear();
            }
            all
        })
    };
    let out = copy(Box::new(child.stdout.take().unwrap()));
    let err = copy(Box::new(child.stderr.take().unwrap()));
    let status = child.wait()?;
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    })
}

/// Serves the containers' logs over HTTPS on a free 127.0.0.1 port, as a kubelet does for the
/// apiserver (`GET /containerLogs/<ns>/<pod>/<container>?tailLines=&limitBytes=&timestamps=`),
/// with the apiserver's own serving certificate (the apiserver does not verify a kubelet's
/// without --kubelet-certificate-authority). One request per connection.
fn serve_logs(dir: &Path) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pki = dir.join("pki");
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(pki.join("apiserver.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(pki.join("apiserver.key")).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let connection = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(connection, stream);
                let _ = answer_log_request(&mut tls);
            });
        }
    });
    port
}

fn answer_log_request<S: std::io::Read + std::io::Write>(stream: &mut S) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        if stream.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let target = head.split_whitespace().nth(1).unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
    };
    let file = path
        .strip_prefix("/containerLogs/")
        .and_then(|key| LOGS.lock().unwrap().get(key).cloned());
    let (status, body) = match file.map(std::fs::read_to_string) {
        Some(Ok(text)) => {
            let mut lines: Vec<&str> = text.lines().collect();
            if let Some(n) = param("tailLines").and_then(|n| n.parse::<usize>().ok()) {
                lines = lines.split_off(lines.len().saturating_sub(n));
            }
            let timestamps = param("timestamps").as_deref() == Some("true");
            let mut body: Vec<u8> = lines
                .iter()
                .map(|l| {
                    if timestamps {
                        l
                    } else {
                        l.split_once(' ').map_or(*l, |(_, rest)| rest)
                    }
                })
                .flat_map(|l| format!("{l}\n").into_bytes())
                .collect();
            if let Some(n) = param("limitBytes").and_then(|n| n.parse::<usize>().ok()) {
                body.truncate(n);
            }
            ("200 OK", body)
        }
        _ => ("404 Not Found", b"no such container log\n".to_vec()),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()
}
