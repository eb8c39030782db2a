//! `datastore submit`: the code snapshot goes to a real Azurite, the Experiment to a scripted
//! apiserver (every request checked), and `--wait` follows a scripted watch.

mod common;

use std::path::{Path, PathBuf};

use common::apiserver::{self, expect};
use common::*;
use datastore_operator::cli::submit::{self, SubmitArgs, Submitted};
use http::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const EXPERIMENTS: &str = "/apis/datastore.dev/v1alpha1/namespaces/default/experiments";

/// An Experiment `name` in the fixture's folder, whose code is the folder `code` beside it.
fn experiment_file(fx: &Fixture, name: &str) -> PathBuf {
    let path = fx.path(&format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            r#"apiVersion: datastore.dev/v1alpha1
kind: Experiment
metadata: {{name: {name}}}
spec:
  image: python:3.12-slim
  sourceDirectory: code
  entryScript: train.py
  scriptParams:
    - name: --data
      dataReference: {{datastore: blob, path: data, mode: download}}
"#
        ),
    )
    .unwrap();
    path
}

fn args(fx: &Fixture, experiment: PathBuf, wait: bool) -> SubmitArgs {
    SubmitArgs {
        experiment,
        code_datastore: None,
        datastores: Some(fx.datastores()),
        namespace: None,
        operator_namespace: datastore_operator::store::resolve::OperatorNamespace {
            name: "datastore-operator".into(),
        },
        wait,
        progress: Default::default(),
        timeout: 30,
    }
}

/// The snapshot's name, computed here from the issue's rule (sha256 over the sorted lines
/// `<name>\t<size>\t<sha256 of content>\n`), independently of the code under test.
fn expected_snapshot(files: &[(&str, &[u8])]) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut lines: Vec<String> = files
        .iter()
        .map(|(name, data)| format!("{name}\t{}\t{}\n", data.len(), hex(&Sha256::digest(data))))
        .collect();
    lines.sort();
    format!(
        "snapshots/{}",
        hex(&Sha256::digest(lines.concat().as_bytes()))
    )
}

/// The create request: the Experiment points at `snapshot` and no longer at the local folder.
fn created(name: &str, snapshot: String) -> apiserver::Exchange {
    let name = name.to_string();
    expect(&format!("POST {EXPERIMENTS}"))
        .query("fieldManager=datastore-cli")
        .body(move |body| {
            assert_eq!(body["metadata"]["name"], name.as_str());
            assert_eq!(body["metadata"]["namespace"], "default");
            assert_eq!(
                body["spec"]["code"],
                json!({"datastore": "blob", "path": snapshot})
            );
            assert!(body["spec"].get("sourceDirectory").is_none(), "{body}");
            assert!(body.get("status").is_none(), "{body}");
        })
        .echo()
}

async fn blobs_under(fx: &Fixture, prefix: &str) -> Vec<(String, u64)> {
    let mut blobs: Vec<(String, u64)> = fx
        .client
        .list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|b| (b.name, b.size))
        .collect();
    blobs.sort();
    blobs
}

#[tokio::test]
async fn an_unchanged_folder_is_uploaded_once_and_the_experiment_references_it() {
    let fx = Fixture::new().await;
    let train = b"print('training')\n".to_vec();
    let util = bytes(5000, 7);
    write_tree(
        &fx.path("code"),
        &[("train.py", train.clone()), ("lib/util.py", util.clone())],
    );
    let snapshot = expected_snapshot(&[("train.py", &train), ("lib/util.py", &util)]);

    let (client, server) = apiserver::start(vec![created("first", snapshot.clone())]);
    let first = submit::submit(client, &args(&fx, experiment_file(&fx, "first"), false))
        .await
        .unwrap();
    server.done().await;
    assert_eq!(first.exit_code, 0);
    let (code, uploaded) = first.snapshot.unwrap();
    assert_eq!(code.path, snapshot);
    assert_eq!(uploaded, 2);
    assert_eq!(
        blobs_under(&fx, &format!("{snapshot}/")).await,
        [
            (format!("{snapshot}/lib/util.py"), 5000),
            (format!("{snapshot}/train.py"), train.len() as u64),
        ]
    );

    // The same folder again: the same snapshot, nothing uploaded.
    let (client, server) = apiserver::start(vec![created("second", snapshot.clone())]);
    let second = submit::submit(client, &args(&fx, experiment_file(&fx, "second"), false))
        .await
        .unwrap();
    server.done().await;
    assert_eq!(second.snapshot.unwrap(), (code, 0));

    // One changed byte is another snapshot.
    let changed = b"print('training!')\n".to_vec();
    std::fs::write(fx.path("code/train.py"), &changed).unwrap();
    let other = expected_snapshot(&[("train.py", &changed), ("lib/util.py", &util)]);
    assert_ne!(other, snapshot);
    let (client, server) = apiserver::start(vec![created("third", other.clone())]);
    let third = submit::submit(client, &args(&fx, experiment_file(&fx, "third"), false))
        .await
        .unwrap();
    server.done().await;
    assert_eq!(third.snapshot.unwrap().1, 2);
}

fn with_phase(name: &str, phase: &str, message: &str, rv: &str) -> Value {
    json!({
        "apiVersion": "datastore.dev/v1alpha1",
        "kind": "Experiment",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv},
        "spec": {"image": "python:3.12-slim", "entryScript": "train.py"},
        "status": {"phase": phase, "message": message},
    })
}

/// `--wait` on Experiment `name`: the create, the watcher's list (Pending) and a watch whose
/// events end in `last`.
async fn wait_for(last: &str) -> Submitted {
    let fx = Fixture::new().await;
    write_tree(&fx.path("code"), &[("train.py", b"pass\n".to_vec())]);
    let name = "waited";
    let selector = "fieldSelector=metadata.name%3Dwaited";
    let (client, server) =
        apiserver::start(vec![
        expect(&format!("POST {EXPERIMENTS}")).echo(),
        expect(&format!("GET {EXPERIMENTS}")).query(selector).ok(json!({
            "apiVersion": "datastore.dev/v1alpha1", "kind": "ExperimentList",
            "metadata": {"resourceVersion": "10"},
            "items": [with_phase(name, "Pending", "waiting for the run's pod to start", "10")],
        })),
        expect(&format!("GET {EXPERIMENTS}"))
            .query(selector)
            .query("watch=true")
            .query("resourceVersion=10")
            .events(vec![
                ("MODIFIED", with_phase(name, "Running", "the script is running", "11")),
                ("MODIFIED", with_phase(name, last, "done", "12")),
            ]),
    ]);
    let submitted = submit::submit(client, &args(&fx, experiment_file(&fx, name), true))
        .await
        .unwrap();
    server.done().await;
    submitted
}

#[tokio::test]
async fn wait_follows_the_phase_to_succeeded() {
    assert_eq!(wait_for("Succeeded").await.exit_code, 0);
}

#[tokio::test]
async fn wait_follows_the_phase_to_failed() {
    assert_eq!(
        wait_for("Failed").await.exit_code,
        datastore_operator::exit::EXPERIMENT_FAILED
    );
}

#[tokio::test]
async fn a_local_experiment_is_not_submitted_and_an_existing_one_is_not_replaced() {
    let fx = Fixture::new().await;
    write_tree(&fx.path("code"), &[("train.py", b"pass\n".to_vec())]);

    // computeTarget local: refused before any request or upload.
    let path = experiment_file(&fx, "here");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("spec:\n", "spec:\n  computeTarget: local\n"),
    )
    .unwrap();
    let (client, server) = apiserver::start(vec![]);
    let err = submit::submit(client, &args(&fx, path, false))
        .await
        .unwrap_err();
    server.done().await;
    assert!(err.to_string().contains("datastore run"), "{err}");
    assert!(blobs_under(&fx, "snapshots/").await.is_empty());

    let (client, server) = apiserver::start(vec![expect(&format!("POST {EXPERIMENTS}")).reply(
        StatusCode::CONFLICT,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": "experiments.datastore.dev \"again\" already exists",
               "reason": "AlreadyExists", "code": 409}),
    )]);
    let err = submit::submit(client, &args(&fx, experiment_file(&fx, "again"), false))
        .await
        .unwrap_err();
    server.done().await;
    assert!(err.to_string().contains("exists already"), "{err}");
    assert!(
        err.to_string().contains("kubectl delete experiment"),
        "{err}"
    );
}

/// What the spec alone gets wrong is refused before the snapshot is uploaded or anything is
/// asked of the apiserver: an image missing on the cluster, an entryScript outside its folder.
#[tokio::test]
async fn a_spec_the_cluster_cannot_run_is_refused_before_the_snapshot() {
    let fx = Fixture::new().await;
    write_tree(&fx.path("code"), &[("train.py", b"pass\n".to_vec())]);
    for (name, from, to, says) in [
        (
            "no-image",
            "  image: python:3.12-slim\n",
            "",
            "image is not set",
        ),
        (
            "outside",
            "entryScript: train.py",
            "entryScript: ../outside.py",
            "entryScript \"../outside.py\" has a `..` segment",
        ),
    ] {
        let path = experiment_file(&fx, name);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from));
        std::fs::write(&path, text.replace(from, to)).unwrap();
        let (client, server) = apiserver::start(vec![]);
        let err = submit::submit(client, &args(&fx, path, false))
            .await
            .unwrap_err();
        server.done().await;
        assert_eq!(err.exit_code(), 3, "{err}");
        assert!(err.to_string().contains(says), "{err}");
        assert!(blobs_under(&fx, "snapshots/").await.is_empty());
    }
}

#[test]
fn the_digest_names_content_not_timestamps_or_order() {
    let dir = tempfile::tempdir().unwrap();
    let root: &Path = dir.path();
    write_tree(root, &[("b.py", b"b".to_vec()), ("a/c.py", b"c".to_vec())]);
    let first = submit::folder_digest(root).unwrap();
    assert_eq!((first.files, first.bytes), (2, 2));
    assert_eq!(
        format!("snapshots/{}", first.hex),
        expected_snapshot(&[("a/c.py", b"c"), ("b.py", b"b")])
    );
    // Rewritten with the same content: the same digest.
    std::fs::write(root.join("b.py"), b"b").unwrap();
    assert_eq!(submit::folder_digest(root).unwrap(), first);
    // Renamed: another.
    std::fs::rename(root.join("b.py"), root.join("d.py")).unwrap();
    assert_ne!(submit::folder_digest(root).unwrap().hex, first.hex);
}
