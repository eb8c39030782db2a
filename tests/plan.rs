//! `datastore plan`: the objects the controller would create, validated against the Kubernetes
//! schemas of the lowest supported version with `kubernetes-validate` (installed by
//! `make test-deps`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const K8S_VERSION: &str = "1.30.0";

const DATASTORES: &str = r#"
apiVersion: datastore.dev/v1alpha1
kind: Datastore
metadata:
  name: workspace-ds
spec:
  azureBlob:
    accountName: devstoreaccount1
    containerName: data
    endpoint: http://127.0.0.1:10000/devstoreaccount1
    credentials:
      secretRef:
        name: workspace-ds-credentials
---
apiVersion: v1
kind: Secret
metadata:
  name: workspace-ds-credentials
stringData:
  accountKey: Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==
"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn validator() -> PathBuf {
    let bin = repo().join(".tools/venv/bin/kubernetes-validate");
    assert!(
        bin.exists(),
        "{} is missing: run `make test-deps` (it installs kubernetes-validate into .tools/venv)",
        bin.display()
    );
    bin
}

fn plan(args: &[&str], datastores: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_datastore"))
        .arg("plan")
        .args(args)
        .arg("--datastores")
        .arg(datastores)
        .env_remove("DATASTORE_CONFIG")
        .env_remove("DATASTORE_AGENT_IMAGE")
        .current_dir(repo())
        .output()
        .expect("run `datastore plan`")
}

fn datastores_file(dir: &Path) -> PathBuf {
    let path = dir.join("datastores.yaml");
    std::fs::write(&path, DATASTORES).unwrap();
    path
}

fn validate(file: &Path) -> Output {
    Command::new(validator())
        .args(["--strict", "--kubernetes-version", K8S_VERSION])
        .arg(file)
        .output()
        .expect("run kubernetes-validate")
}

#[test]
fn the_example_renders_valid_objects_with_a_minted_sas() {
    let dir = tempfile::tempdir().unwrap();
    let out = plan(&["examples/experiment.yaml"], &datastores_file(dir.path()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "datastore plan failed: {stderr}");
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(!printed.contains(KEY), "the account key leaked:\n{printed}");

    let docs: Vec<serde_json::Value> =
        datastore_operator::yaml::documents::<serde_json::Value>(&printed)
            .unwrap()
            .into_iter()
            .collect();
    // Secrets hold their values base64-encoded in data: look inside too.
    for doc in docs.iter().filter(|d| d["kind"] == "Secret") {
        for value in doc["data"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(_, v)| v)
        {
            let decoded = base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                value.as_str().unwrap(),
            )
            .unwrap();
            assert!(
                !String::from_utf8_lossy(&decoded).contains(KEY),
                "the account key leaked"
            );
        }
    }
    let objects: Vec<(&str, &str)> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        objects,
        [
            ("Secret", "train-iris-credentials"),
            ("PersistentVolumeClaim", "train-iris-outputs"),
            ("Job", "train-iris-run"),
            ("Job", "train-iris-upload"),
        ]
    );
    for d in &docs {
        assert_eq!(d["metadata"]["namespace"], "default");
        assert_eq!(
            d["metadata"]["labels"]["datastore.dev/experiment"],
            "train-iris"
        );
        let owner = &d["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Experiment");
        assert_eq!(owner["controller"], true);
        assert!(!owner["uid"].as_str().unwrap().is_empty());
    }

    // The credentials: a SAS for download + upload on workspace-ds (read, create, write, list).
    let encoded = docs[0]["data"]["datastores.yaml"].as_str().unwrap();
    let file = &String::from_utf8(
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded).unwrap(),
    )
    .unwrap();
    assert!(
        !file.contains(KEY) && !file.contains("accountKey"),
        "{file}"
    );
    let inner: Vec<serde_json::Value> =
        datastore_operator::yaml::documents::<serde_json::Value>(file)
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(inner[0]["kind"], "Datastore");
    assert_eq!(
        inner[0]["spec"]["azureBlob"]["endpoint"],
        "http://127.0.0.1:10000/devstoreaccount1"
    );
    assert_eq!(inner[1]["kind"], "Secret");
    let token = inner[1]["stringData"]["sasToken"].as_str().unwrap();
    assert!(token.contains("&sp=rcwl&"), "{token}");
    assert!(token.contains("&sr=c&"), "{token}");

    // Every object against the real schemas.
    let rendered = dir.path().join("objects.yaml");
    std::fs::write(&rendered, &printed).unwrap();
    let v = validate(&rendered);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(
        v.status.success(),
        "kubernetes-validate refused:\n{report}\n{printed}"
    );
    for name in [
        "secret/train-iris-credentials",
        "persistentvolumeclaim/train-iris-outputs",
        "job/train-iris-run",
        "job/train-iris-upload",
    ] {
        assert!(
            report.contains(&format!("passed for resource {name}")),
            "{report}"
        );
    }
}

#[test]
fn the_validator_refuses_what_it_should() {
    // An honest check needs a validator that says no: an unknown field under --strict.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: batch/v1\nkind: Job\nmetadata: {name: x}\nspec:\n  template:\n    spec:\n      restartPolicy: Never\n      containers: [{name: main, image: x, bogusField: 1}]\n",
    )
    .unwrap();
    assert!(!validate(&bad).status.success());
}

#[test]
fn errors_end_in_the_config_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let datastores = datastores_file(dir.path());

    // A datastore that does not exist.
    let exp = dir.path().join("missing.yaml");
    std::fs::write(
        &exp,
        "apiVersion: datastore.dev/v1alpha1\nkind: Experiment\nmetadata: {name: e}\nspec:\n  image: x\n  entryScript: t.py\n  scriptParams: [{name: --d, dataReference: {datastore: nope, mode: download}}]\n",
    )
    .unwrap();
    let out = plan(&[exp.to_str().unwrap()], &datastores);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    assert!(out.stdout.is_empty());

    // A spec the planner refuses.
    let exp = dir.path().join("dup.yaml");
    std::fs::write(
        &exp,
        "apiVersion: datastore.dev/v1alpha1\nkind: Experiment\nmetadata: {name: e}\nspec:\n  image: x\n  entryScript: t.py\n  scriptParams: [{name: --a, value: '1'}, {name: --a, value: '2'}]\n",
    )
    .unwrap();
    let out = plan(&[exp.to_str().unwrap()], &datastores);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than once"));

    // No such file.
    let out = plan(&["does-not-exist.yaml"], &datastores);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn a_spec_using_every_field_renders_valid_objects() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("full.yaml");
    std::fs::write(
        &exp,
        r#"apiVersion: datastore.dev/v1alpha1
kind: Experiment
metadata: {name: full, namespace: ml}
spec:
  image: python:3.12-slim
  sourceDirectory: /app
  entryScript: train.py
  command: [torchrun, --nproc_per_node=2, train.py]
  resources: {requests: {cpu: "1", memory: 2Gi}, limits: {nvidia.com/gpu: "1"}}
  nodeSelector: {agentpool: gpu}
  tolerations: [{key: sku, operator: Equal, value: gpu, effect: NoSchedule}]
  serviceAccountName: trainer
  env: [{name: EPOCHS, value: "3"}]
  activeDeadlineSeconds: 3600
  backoffLimit: 1
  uploadPolicy: Always
  outputs: {size: 50Gi, storageClassName: managed-csi}
  staging: {size: 300Gi, storageClassName: local-nvme}
  scriptParams:
    - {name: --a, dataReference: {datastore: workspace-ds, path: a, mode: download}}
    - {name: --b, dataReference: {datastore: workspace-ds, path: b, mode: download}}
    - {name: --out, dataReference: {datastore: workspace-ds, path: out, mode: upload}}
    - {name: --logs, dataReference: {datastore: workspace-ds, path: logs, mode: upload}}
"#,
    )
    .unwrap();
    let out = plan(&[exp.to_str().unwrap()], &datastores_file(dir.path()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.contains("namespace: ml"));
    assert!(
        printed.contains("storageClassName: local-nvme"),
        "the staging volume is made from its class"
    );
    let rendered = dir.path().join("objects.yaml");
    std::fs::write(&rendered, &printed).unwrap();
    let v = validate(&rendered);
    assert!(
        v.status.success(),
        "kubernetes-validate refused:\n{}{}\n{printed}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Mounts and Azure Files

/// The kinds and names of a multi-document YAML stream's objects.
fn objects(printed: &str) -> Vec<(String, String)> {
    datastore_operator::yaml::documents::<serde_json::Value>(printed)
        .unwrap()
        .into_iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_string(),
                d["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Validates `printed` and checks that every object passed by name.
fn assert_valid(dir: &Path, printed: &str) {
    let rendered = dir.join("objects.yaml");
    std::fs::write(&rendered, printed).unwrap();
    let v = validate(&rendered);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(
        v.status.success(),
        "kubernetes-validate refused:\n{report}\n{printed}"
    );
    for (kind, name) in objects(printed) {
        let resource = format!("{}/{name}", kind.to_lowercase());
        assert!(
            report.contains(&format!("passed for resource {resource}")),
            "{resource} not validated:\n{report}"
        );
    }
}

/// `datastore plan` with CSI mounts of a Blob container (read-only and read-write) and of an
/// Azure Files share, and a download from and an upload to the share: Secrets, CSI inline
/// volumes and share volumes pass the schemas.
#[test]
fn csi_mounts_and_share_transfers_render_valid_objects() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("mount.yaml");
    std::fs::write(
        &exp,
        r#"apiVersion: datastore.dev/v1alpha1
kind: Experiment
metadata: {name: mounts, namespace: ml}
spec:
  image: python:3.12-slim
  entryScript: train.py
  scriptParams:
    - {name: --data, dataReference: {datastore: workspace-ds, path: data/files, mode: mount}}
    - {name: --scratch, dataReference: {datastore: workspace-ds, path: scratch, mode: mount, readOnly: false, mountDriver: csi}}
    - {name: --labels, dataReference: {datastore: shared-ds, path: labels, mode: mount}}
    - {name: --pretrained, dataReference: {datastore: shared-ds, path: models, mode: download}}
    - {name: --out, dataReference: {datastore: shared-ds, path: outputs, mode: upload}}
"#,
    )
    .unwrap();
    let out = plan(
        &[exp.to_str().unwrap()],
        &repo().join("examples/datastores-azure.yaml"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let names: Vec<(String, String)> = objects(&printed);
    let expect = |k: &str, n: &str| (k.to_string(), n.to_string());
    assert_eq!(
        names,
        [
            expect("Secret", "mounts-credentials"),
            expect("Secret", "mounts-share-0"),
            expect("Secret", "mounts-mount-0"),
            expect("Secret", "mounts-mount-1"),
            expect("PersistentVolumeClaim", "mounts-outputs"),
            expect("Job", "mounts-run"),
            expect("Job", "mounts-upload"),
        ]
    );
    assert!(printed.contains("driver: blob.csi.azure.com"), "{printed}");
    assert!(printed.contains("driver: file.csi.azure.com"), "{printed}");
    assert_valid(dir.path(), &printed);
}

/// Downloads served from the node cache (`--node-cache`: as for a cluster with its CSIDriver):
/// the driver's inline volume with its SAS Secret, and the pod's annotation saying why; without
/// the flag, the same reference is a download into the pod whose annotation says the cluster's
/// driver is not known.
#[test]
fn cached_downloads_render_valid_objects() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("cached.yaml");
    std::fs::write(
        &exp,
        r#"apiVersion: datastore.dev/v1alpha1
kind: Experiment
metadata: {name: cached, namespace: ml}
spec:
  image: python:3.12-slim
  entryScript: train.py
  scriptParams:
    - {name: --data, dataReference: {datastore: workspace-ds, path: data/files, mode: download, cache: true}}
    - {name: --labels, dataReference: {datastore: workspace-ds, path: labels, mode: download}}
"#,
    )
    .unwrap();
    let datastores = datastores_file(dir.path());
    let out = plan(&[exp.to_str().unwrap(), "--node-cache"], &datastores);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let expect = |k: &str, n: &str| (k.to_string(), n.to_string());
    assert_eq!(
        objects(&printed),
        [
            expect("Secret", "cached-credentials"),
            expect("Secret", "cached-cache-0"),
            expect("Job", "cached-run"),
        ]
    );
    assert!(printed.contains("driver: cache.datastore.dev"), "{printed}");
    assert!(
        printed.contains(
            "datastore.dev/cache.download-0: \"served from the node cache: cache: true on the reference\""
        ),
        "{printed}"
    );
    assert_valid(dir.path(), &printed);

    let out = plan(&[exp.to_str().unwrap()], &datastores);
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        !printed.contains("driver: cache.datastore.dev"),
        "{printed}"
    );
    assert!(printed.contains("is not known"), "{printed}");
    assert_valid(dir.path(), &printed);
}

/// The README's mount example (examples/experiment-mount.yaml on examples/datastores-azure.yaml)
/// with a blobfuse2 image: a CSI Blob mount, a blobfuse2 native sidecar, an Azure Files mount, a
/// download from and an upload to the share. Rendered by the planner and builders `datastore
/// plan` runs, here in-process: `datastore plan` builds its context from the agent image alone,
/// so it cannot render a sidecar until it passes the operator's blobfuse2 image on.
#[test]
fn the_mount_example_renders_valid_objects() {
    // The README's command, with a blobfuse2 image for the sidecar mount.
    let out = plan(
        &[
            "examples/experiment-mount.yaml",
            "--blobfuse-image",
            "example.io/blobfuse2:2.5.1",
        ],
        &repo().join("examples/datastores-azure.yaml"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<String> = printed.split("---\n").map(String::from).collect();

    let expect = |k: &str, n: &str| (k.to_string(), n.to_string());
    assert_eq!(
        objects(&printed),
        [
            expect("Secret", "train-iris-mount-credentials"),
            expect("Secret", "train-iris-mount-share-0"),
            expect("Secret", "train-iris-mount-mount-0"),
            expect("Secret", "train-iris-mount-mount-1"),
            expect("PersistentVolumeClaim", "train-iris-mount-outputs"),
            expect("Job", "train-iris-mount-run"),
            expect("Job", "train-iris-mount-upload"),
        ]
    );
    // The share's account key is in the share's Secret (SMB needs it) and nowhere else; the
    // Blob datastore's key is nowhere (SAS tokens stand in for it).
    let share_key = "ZHVtbXktc2hhcmUtYWNjb3VudC1rZXktcmVwbGFjZS1tZS13aXRoLXlvdXJz";
    let blob_key = "ZHVtbXktYWNjb3VudC1rZXktcmVwbGFjZS1tZS13aXRoLXlvdXJzLWZyb20tdGhlLXBvcnRhbA==";
    for doc in &docs {
        let doc = &with_secret_values(doc);
        assert_eq!(
            doc.contains(share_key),
            doc.contains("name: train-iris-mount-share-0\n")
                && doc.starts_with("apiVersion: v1\nkind: Secret"),
            "{doc}"
        );
        assert!(!doc.contains(blob_key), "{doc}");
    }
    let run = &docs[docs.len() - 2];
    assert!(run.contains("restartPolicy: Always"), "{run}");
    assert!(run.contains("mountPropagation: Bidirectional"), "{run}");
    assert!(run.contains("mountPropagation: HostToContainer"), "{run}");
    let dir = tempfile::tempdir().unwrap();
    assert_valid(dir.path(), &printed);
}

/// A printed object, followed by its Secret values decoded (a Secret holds them base64-encoded
/// in `data`), so a search of the text sees what the Secret really holds.
fn with_secret_values(doc: &str) -> String {
    let value: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
    let mut text = doc.to_string();
    for encoded in value["data"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(_, v)| v)
    {
        let bytes = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            encoded.as_str().unwrap(),
        )
        .unwrap();
        text.push_str(&String::from_utf8(bytes).unwrap());
    }
    text
}
