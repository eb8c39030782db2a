//! Experiments that run, end to end: the real control plane (tests/common/cluster.rs), the
//! operator installed from `deploy/` running as the chart's ServiceAccount, and a node
//! (tests/common/node.rs) that runs the pods with podman — the agent containers in the
//! operator's image built from the binary under test, the script in a busybox stand-in for
//! the user's image — against a real Azurite.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::cluster::cluster;
use common::node::{self, STANDIN_IMAGE};
use common::operator::{self, eventually};
use datastore_operator::api::{CacheResult, Experiment, Phase};
use datastore_operator::store::azure::Body;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(180);

/// What the stand-in script does: lists its `--data_folder` into `seen.txt` in its
/// `--output_dir`, copies `a.txt` there as `model.txt`, and exits with `$EXIT` (0 unless set),
/// saying why on stderr when it fails.
const SCRIPT: &str = r#"while [ $# -gt 0 ]; do case "$1" in --data_folder) d=$2;; --output_dir) o=$2;; esac; shift 2; done
cd "$d" && find . -type f | sort > "$o/seen.txt" && cp a.txt "$o/model.txt" || exit 3
if [ "${EXIT:-0}" != 0 ]; then echo "ValueError: the loss diverged" >&2; exit "$EXIT"; fi
echo trained"#;

fn setup() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        std::thread::spawn(|| {
            node::start(cluster());
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let token = runtime.block_on(operator::install(cluster(), |_| {}));
            operator::start_controller(
                cluster(),
                &token,
                "controller-0",
                &[
                    &format!("--agent-image={}", node::AGENT_IMAGE),
                    // Progress read every second, so a download of a few seconds shows it.
                    "--progress-period=1s",
                    // Past the 60 s outages the tests ride through, short of their wait.
                    "--retry-budget=90s",
                ],
            );
        })
        .join()
        .unwrap();
    });
}

/// A namespace enforcing Pod Security `restricted`, with Datastore `blob-ds` on a fresh
/// Azurite container holding `data/files/{a.txt, sub/b.csv}`; the container's client.
async fn prepare(client: &kube::Client, ns: &str) -> datastore_operator::store::BlobClient {
    let container = common::unique_container();
    prepare_on(client, ns, common::client(&container), &common::endpoint()).await
}

/// As [`prepare`], with the container `blobs` names, reached by the Datastore at `endpoint`.
async fn prepare_on(
    client: &kube::Client,
    ns: &str,
    blobs: datastore_operator::store::BlobClient,
    endpoint: &str,
) -> datastore_operator::store::BlobClient {
    operator::apply(
        client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns,
                "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}),
    )
    .await;
    let container = blobs.config().container.clone();
    blobs.create_container().await.unwrap();
    for (name, data) in [
        ("data/files/a.txt", &b"alpha\n"[..]),
        ("data/files/sub/b.csv", b"x,y\n1,2\n"),
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
    operator::apply(
        client,
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "blob-ds-key", "namespace": ns},
                "stringData": {"accountKey": common::KEY}}),
    )
    .await;
    operator::apply(
        client,
        &json!({"apiVersion": "datastore.dev/v1alpha1", "kind": "Datastore",
                "metadata": {"name": "blob-ds", "namespace": ns},
                "spec": {"azureBlob": {"accountName": common::ACCOUNT, "containerName": container,
                                       "endpoint": endpoint,
                                       "credentials": {"secretRef": {"name": "blob-ds-key"}}}}}),
    )
    .await;
    blobs
}

fn experiment(ns: &str, name: &str, outputs: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut exp = json!({
        "apiVersion": "datastore.dev/v1alpha1", "kind": "Experiment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "image": STANDIN_IMAGE,
            "entryScript": "unused.py",
            "command": ["sh", "-c", SCRIPT, "stand-in"],
            "scriptParams": [
                {"name": "--data_folder", "dataReference": {"datastore": "blob-ds", "path": "data/files", "mode": "download", "pathOnCompute": "training_data"}},
                {"name": "--output_dir", "dataReference": {"datastore": "blob-ds", "path": outputs, "mode": "upload", "pathOnCompute": "outputs"}},
            ],
        },
    });
    for (k, v) in extra.as_object().unwrap() {
        exp["spec"][k] = v.clone();
    }
    exp
}

/// Waits for the Experiment to end; returns it.
async fn finished(api: &Api<Experiment>, name: &str) -> Experiment {
    eventually(&format!("Experiment {name} finished"), WAIT, || {
        let api = api.clone();
        async move {
            let exp = api.get(name).await.ok()?;
            exp.status.as_ref()?.completion_time.as_ref()?;
            Some(exp)
        }
    })
    .await
}

async fn blob(blobs: &datastore_operator::store::BlobClient, name: &str) -> Vec<u8> {
    blobs
        .get(name, None, None)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

/// The seed's scenario: Succeeded; the script saw exactly the data; the outputs in Azurite
/// byte-exact; status.inputs recorded; the outputs claim really gone (the pods went first) and
/// no pod of the run left.
#[tokio::test(flavor = "multi_thread")]
async fn the_seed_experiment_succeeds_and_leaves_its_outputs_in_the_datastore() {
    setup();
    let client = cluster().admin();
    let ns = "run-seed";
    let blobs = prepare(&client, ns).await;
    operator::apply(&client, &experiment(ns, "train", "outputs/run1", json!({}))).await;
    let experiments: Api<Experiment> = Api::namespaced(client.clone(), ns);
    let exp = finished(&experiments, "train").await;
    let status = exp.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Succeeded), "{status:?}");
    assert_eq!(status.inputs.len(), 1, "{status:?}");
    assert_eq!((status.inputs[0].files, status.inputs[0].bytes), (2, 14));
    assert_eq!(
        blob(&blobs, "outputs/run1/seen.txt").await,
        b"./a.txt\n./sub/b.csv\n"
    );
    assert_eq!(blob(&blobs, "outputs/run1/model.txt").await, b"alpha\n");

    // The claim goes for real: pvc-protection lets it go once no pod names it.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    eventually("the outputs claim gone", Duration::from_secs(60), || {
        let pvcs = pvcs.clone();
        async move {
            pvcs.get_opt("train-outputs")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually("the run's pods gone", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            pods.list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        }
    })
    .await;
    // The Jobs stay as the record.
    let jobs: Api<Job> = Api::namespaced(client, ns);
    assert!(jobs.get_opt("train-run").await.unwrap().is_some());
    assert!(jobs.get_opt("train-upload").await.unwrap().is_some());
}

/// A failing script: Failed with its message, run once; under `uploadPolicy: Always` its
/// outputs are uploaded all the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_script_fails_with_its_message_and_always_uploads() {
    setup();
    let client = cluster().admin();
    let ns = "run-failing";
    let blobs = prepare(&client, ns).await;
    let extra = json!({"uploadPolicy": "Always", "env": [{"name": "EXIT", "value": "2"}]});
    operator::apply(&client, &experiment(ns, "diverges", "outputs/run2", extra)).await;
    let experiments: Api<Experiment> = Api::namespaced(client.clone(), ns);
    let exp = finished(&experiments, "diverges").await;
    let status = exp.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Failed), "{status:?}");
    let message = status.message.unwrap();
    assert!(
        message.contains("exited with code 2") && message.contains("ValueError: the loss diverged"),
        "{message}"
    );
    assert!(
        message.contains("outputs were uploaded (uploadPolicy Always)"),
        "{message}"
    );
    assert_eq!(blob(&blobs, "outputs/run2/model.txt").await, b"alpha\n");
    // Run once: backoffLimit 0 unless the spec asks for retries.
    let pods: Api<Pod> = Api::namespaced(client, ns);
    let run_pods = pods
        .list(&ListParams::default().labels("batch.kubernetes.io/job-name=diverges-run"))
        .await
        .unwrap();
    assert!(
        run_pods.items.len() <= 1,
        "{} run pods",
        run_pods.items.len()
    );
}

/// `datastore submit --wait` against the real apiserver: the local folder goes to the
/// datastore as a snapshot, the run Job's `code` container fetches it into the working
/// directory, the script there runs, and `--wait` exits 0 when the Experiment Succeeded.
#[tokio::test(flavor = "multi_thread")]
async fn submit_ships_the_local_code_and_waits_for_the_run() {
    setup();
    let client = cluster().admin();
    let ns = "run-submit";
    let blobs = prepare(&client, ns).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("experiment_folder")).unwrap();
    std::fs::write(dir.path().join("experiment_folder/train.sh"), SCRIPT).unwrap();
    let file = dir.path().join("experiment.yaml");
    std::fs::write(
        &file,
        format!(
            r#"apiVersion: datastore.dev/v1alpha1
kind: Experiment
metadata: {{name: shipped, namespace: {ns}}}
spec:
  image: {STANDIN_IMAGE}
  sourceDirectory: experiment_folder
  entryScript: train.sh
  command: [sh, train.sh]
  scriptParams:
    - name: --data_folder
      dataReference: {{datastore: blob-ds, path: data/files, mode: download, pathOnCompute: training_data}}
    - name: --output_dir
      dataReference: {{datastore: blob-ds, path: outputs/run3, mode: upload, pathOnCompute: outputs}}
"#
        ),
    )
    .unwrap();
    let kubeconfig = cluster().dir.join("submitter.kubeconfig");
    common::cluster::kubeconfig(
        &kubeconfig,
        &cluster().server,
        &cluster().ca,
        &cluster().admin_token,
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_datastore"))
            .args([
                "submit",
                file.to_str().unwrap(),
                "--wait",
                "--timeout",
                "180",
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("DATASTORE_CONFIG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let printed =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(printed.contains("Succeeded"), "{printed}");
    assert_eq!(
        blob(&blobs, "outputs/run3/seen.txt").await,
        b"./a.txt\n./sub/b.csv\n"
    );
    let names: Vec<String> = blobs
        .list("snapshots/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert!(
        names.iter().any(|n| n.ends_with("/train.sh")),
        "the snapshot holds the script: {names:?}"
    );
}

/// A download that takes seconds (16 MiB from a storage account serving 2 MiB/s): while it
/// runs, status.progress grows, read from the agent's log through the real apiserver's
/// pods/log and the node's log endpoint; kubectl's table (the apiserver's Table rendering of
/// the printer columns) shows it; at the end the input records how long it took.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_download_shows_growing_progress_in_the_status_and_in_kubectl_get() {
    setup();
    let client = cluster().admin();
    let ns = "run-progress";
    let blobs = prepare(&client, ns).await;
    let big: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
    blobs
        .put_blob(
            "data/files/big.bin",
            Body::Bytes(big.clone().into()),
            common::md5(&big),
            false,
        )
        .await
        .unwrap();
    let slow = common::proxy::start(common::proxy::Pace {
        bytes_per_second: Some(2 << 20),
        ..Default::default()
    })
    .await;
    let mut datastore: serde_json::Value = serde_json::to_value(
        Api::<datastore_operator::api::Datastore>::namespaced(client.clone(), ns)
            .get("blob-ds")
            .await
            .unwrap(),
    )
    .unwrap();
    datastore["spec"]["azureBlob"]["endpoint"] = json!(slow.endpoint());
    datastore["metadata"] = json!({"name": "blob-ds", "namespace": ns});
    datastore.as_object_mut().unwrap().remove("status");
    operator::apply(&client, &datastore).await;
    operator::apply(&client, &experiment(ns, "slow", "outputs/slow", json!({}))).await;

    let experiments: Api<Experiment> = Api::namespaced(client.clone(), ns);
    let mut seen: Vec<(i64, i64, String)> = Vec::new();
    let mut table = None;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the download did not end: {seen:?}"
        );
        let exp = experiments.get("slow").await.unwrap();
        let status = exp.status.clone().unwrap_or_default();
        if status.completion_time.is_some() {
            break;
        }
        if let Some(p) = status.progress.as_ref() {
            if seen.last().map(|s| s.0) != Some(p.bytes) {
                seen.push((p.bytes, p.bytes_total, p.transferred.clone()));
            }
            if table.is_none() && p.bytes > 0 && p.bytes < p.bytes_total {
                table = Some(kubectl_get(&client, ns, "slow").await);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let exp = experiments.get("slow").await.unwrap();
    let status = exp.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Succeeded), "{status:?}");
    assert_eq!(
        status.progress, None,
        "no progress once the transfers are over"
    );
    let total = 14 + (16 << 20);
    assert!(
        seen.len() >= 2 && seen.windows(2).all(|w| w[0].0 < w[1].0),
        "progress grew while downloading: {seen:?}"
    );
    assert!(seen.iter().all(|s| s.1 == total), "{seen:?}");
    let input = &status.inputs[0];
    assert_eq!(input.bytes, total);
    assert!(
        input.seconds.is_some_and(|s| s >= 4),
        "16 MiB at 2 MiB/s take seconds: {input:?}"
    );
    let table = table.expect("a table while the download ran");
    println!("kubectl get exp, while downloading:\n{table}");
    assert!(
        table.contains("NAME") && table.contains("TRANSFERRED") && table.contains("ETA"),
        "{table}"
    );
    assert!(
        table.contains("Downloading") && table.contains("/16Mi"),
        "{table}"
    );
}

/// The apiserver's Table of one Experiment (what `kubectl get` prints), as aligned text.
async fn kubectl_get(client: &kube::Client, ns: &str, name: &str) -> String {
    let request = http::Request::get(format!(
        "/apis/datastore.dev/v1alpha1/namespaces/{ns}/experiments/{name}"
    ))
    .header(
        "Accept",
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
    )
    .body(Vec::new())
    .unwrap();
    let table: serde_json::Value = client.request(request).await.unwrap();
    let columns: Vec<(String, i64)> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_uppercase(),
                c["priority"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    let cells: Vec<String> = table["rows"][0]["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| match c {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "<none>".into(),
            other => other.to_string(),
        })
        .collect();
    // What `kubectl get` shows: priority-0 columns only.
    let shown: Vec<(String, String)> = columns
        .into_iter()
        .zip(cells)
        .filter(|((_, priority), _)| *priority == 0)
        .map(|((name, _), cell)| (name, cell))
        .collect();
    let widths: Vec<usize> = shown
        .iter()
        .map(|(n, c)| n.len().max(c.len()) + 3)
        .collect();
    let line = |pick: &dyn Fn(&(String, String)) -> String| {
        shown
            .iter()
            .zip(&widths)
            .map(|(col, w)| format!("{:<w$}", pick(col), w = *w))
            .collect::<String>()
            .trim_end()
            .to_string()
    };
    format!("{}\n{}", line(&|c| c.0.clone()), line(&|c| c.1.clone()))
}

/// A download served from the node cache, published through the node plugin under test by the
/// e2e node as a kubelet publishes it (the Secret's SAS, the volume's attributes): the first
/// Experiment's pod waits while the node caches the folder (a `Miss`), the second on the same
/// node gets it at once (a `Hit`); both scripts read the same files, and the digests agree.
#[tokio::test(flavor = "multi_thread")]
async fn a_cached_download_is_a_miss_then_a_hit_on_the_same_node() {
    setup();
    let client = cluster().admin();
    let ns = "run-cache";
    let blobs = prepare(&client, ns).await;
    operator::node_cache_driver(&client).await;
    let experiments: Api<Experiment> = Api::namespaced(client.clone(), ns);
    let mut seen = Vec::new();
    for (name, expected) in [
        ("cached-1", CacheResult::Miss),
        ("cached-2", CacheResult::Hit),
    ] {
        let mut exp = experiment(ns, name, &format!("outputs/{name}"), json!({}));
        exp["spec"]["scriptParams"][0]["dataReference"]["cache"] = json!(true);
        operator::apply(&client, &exp).await;
        let status = finished(&experiments, name).await.status.unwrap();
        assert_eq!(status.phase, Some(Phase::Succeeded), "{status:?}");
        let input = &status.inputs[0];
        assert_eq!((input.files, input.bytes), (2, 14), "{input:?}");
        assert_eq!(input.cache, Some(expected), "{name}: {input:?}");
        assert_eq!(
            input.cache_reason.as_deref(),
            Some("served from the node cache: cache: true on the reference")
        );
        assert_eq!(
            blob(&blobs, &format!("outputs/{name}/seen.txt")).await,
            b"./a.txt\n./sub/b.csv\n",
            "the script sees the folder's files, and only them"
        );
        seen.push(input.digest.clone());
    }
    assert_eq!(seen[0], seen[1], "the same data, the same digest");
}

/// Storage stopped for 60 s in the middle of a transfer (an Azurite of the test's own, started
/// again on its disk, behind a proxy that paces the traffic and closes connections while it is
/// down).
const OUTAGE: Duration = Duration::from_secs(60);

/// Stops storage once the proxy has passed `bytes` on, for [`OUTAGE`], and starts it again;
/// meanwhile collects the Experiment's messages.
async fn outage_after(
    experiments: &Api<Experiment>,
    name: &str,
    azurite: &common::restartable::Restartable,
    proxy: &common::proxy::Proxy,
    bytes: u64,
) -> Vec<String> {
    let mut messages = Vec::new();
    let mut note = |exp: Option<Experiment>| {
        let message = exp.and_then(|e| e.status?.message);
        if let Some(m) = message.filter(|m| messages.last() != Some(m)) {
            messages.push(m);
        }
    };
    let deadline = std::time::Instant::now() + WAIT;
    while proxy.moved() < bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "the transfer did not start: {messages:?}"
        );
        note(experiments.get(name).await.ok());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    azurite.stop();
    let back = std::time::Instant::now() + OUTAGE;
    while std::time::Instant::now() < back {
        note(experiments.get(name).await.ok());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    azurite.resume();
    messages
}

/// As [`prepare`], on an Azurite of the test's own that it can stop, which the Datastore
/// reaches through a proxy pacing the traffic as `pace` says.
async fn prepare_behind_proxy(
    client: &kube::Client,
    ns: &str,
    pace: common::proxy::Pace,
) -> (
    common::restartable::Restartable,
    common::proxy::Proxy,
    datastore_operator::store::BlobClient,
) {
    let azurite = common::restartable::Restartable::start();
    let proxy = common::proxy::start_to(azurite.port, pace).await;
    let container = common::unique_container();
    let blobs = prepare_on(client, ns, azurite.client(&container), &proxy.endpoint()).await;
    (azurite, proxy, blobs)
}

/// The run Job ran its pod once, and it succeeded.
async fn ran_once(client: &kube::Client, ns: &str, name: &str) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let status = jobs
        .get(&format!("{name}-run"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(
        (status.succeeded, status.failed.unwrap_or(0)),
        (Some(1), 0),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_rides_through_a_60s_storage_outage() {
    setup();
    let client = cluster().admin();
    let ns = "run-outage-down";
    let pace = common::proxy::Pace {
        bytes_per_second: Some(4 << 20),
        ..Default::default()
    };
    let (azurite, proxy, blobs) = prepare_behind_proxy(&client, ns, pace).await;
    let big = common::bytes(32 << 20, 41);
    blobs
        .put_blob(
            "data/files/big.bin",
            Body::Bytes(big.clone().into()),
            common::md5(&big),
            false,
        )
        .await
        .unwrap();
    operator::apply(&client, &experiment(ns, "ride", "outputs/ride", json!({}))).await;
    let experiments: Api<Experiment> = Api::namespaced(client.clone(), ns);
    let messages = outage_after(&experiments, "ride", &azurite, &proxy, 2 << 20).await;
    let exp = finished(&experiments, "ride").await;
    let status = exp.status.unwrap();
    assert_eq!(
        status.phase,
        Some(Phase::Succeeded),
        "{status:?}\n{messages:#?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("--data_folder: storage unreachable for")
                && m.contains("retrying (up to 90s)")),
        "the message said storage was unreachable while it was: {messages:#?}"
    );
    assert_eq!(status.inputs[0].bytes, 14 + (32 << 20));
    assert_eq!(
        blob(&blobs, "outputs/ride/seen.txt").await,
        b"./a.txt\n./big.bin\n./sub/b.csv\n"
    );
    ran_once(&client, ns, "ride").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_rides_through_a_60s_storage_outage() {
    setup();
    let client = cluster().admin();
    let ns = "run-outage-up";
    let pace = common::proxy::Pace {
        upload_bytes_per_second: Some(4 << 20),
        ..Default::default()
    };
    let (azurite, proxy, blobs) = prepare_behind_proxy(&client, ns, pace).await;
    // The script also writes 32 MiB of outputs, the same bytes every time.
    let mut spec = experiment(ns, "ride", "outputs/ride", json!({}));
    spec["spec"]["command"][2] = json!(format!(
        "{SCRIPT}\nyes 0123456789abcde | head -c 33554432 > \"$o/big.bin\""
    ));
    operator::apply(&client, &spec).await;
    let experiments: Api<Experiment> = Api::namespaced(client.clone(), ns);
    let messages = outage_after(&experiments, "ride", &azurite, &proxy, 2 << 20).await;
    let exp = finished(&experiments, "ride").await;
    let status = exp.status.unwrap();
    assert_eq!(
        status.phase,
        Some(Phase::Succeeded),
        "{status:?}\n{messages:#?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("storage unreachable for") && m.contains("uploading")),
        "the message said storage was unreachable while it was: {messages:#?}"
    );
    let expected: Vec<u8> = b"0123456789abcde\n"
        .iter()
        .copied()
        .cycle()
        .take(32 << 20)
        .collect();
    assert!(
        blob(&blobs, "outputs/ride/big.bin").await == expected,
        "byte-exact"
    );
    assert_eq!(blob(&blobs, "outputs/ride/model.txt").await, b"alpha\n");
    ran_once(&client, ns, "ride").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_down_longer_than_the_retry_budget_fails_the_experiment_saying_so() {
    setup();
    let client = cluster().admin();
    let ns = "run-outage-long";
    let (azurite, _proxy, _) = prepare_behind_proxy(&client, ns, Default::default()).await;
    azurite.stop();
    operator::apply(&client, &experiment(ns, "down", "outputs/down", json!({}))).await;
    let experiments: Api<Experiment> = Api::namespaced(client.clone(), ns);
    let exp = finished(&experiments, "down").await;
    let status = exp.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Failed), "{status:?}");
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("download-0") && message.contains("retry budget of 90s"),
        "{message}"
    );
    // The script never ran, so its outputs claim held nothing: it goes.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    eventually("the outputs claim gone", Duration::from_secs(60), || {
        let pvcs = pvcs.clone();
        async move {
            pvcs.get_opt("down-outputs")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    azurite.resume();
}
