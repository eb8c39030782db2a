//! The wiring test: the Jobs the builders render, run on this machine against a real Azurite.
//!
//! No cluster: this machine stands in for a node. Every volume of a pod is a directory (an
//! emptyDir per pod, a PersistentVolumeClaim shared by the pods that claim it, a Secret as one
//! file per key, a `subPath` as a directory inside its volume), and each container's command runs
//! here with the container's `args` and `env` as rendered, but with every path that is one of the
//! container's mounts replaced by the directory behind it. The agent containers run the real
//! `datastore` binary; the user's container `main` runs its rendered command in a stand-in for its
//! image, where `training_script.py` is a small Python script that reads its `--data_folder` and
//! writes into its `--output_dir`. Then the blobs that arrive in Azurite are checked. This proves that what the builders generate lines up: the init containers fill
//! the folders `main` is told about, `main` writes where the upload Job reads, the upload lands
//! the folder's contents under the reference's path, the minted SAS allows what each step needs
//! (and a read-only one refuses a write), and the user's container never sees a credential.
//!
//! What it cannot prove: real images, users and file modes, scheduling.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use chrono::Utc;
use common::*;
use datastore_operator::api::Experiment;
use datastore_operator::plan::contract::Report;
use datastore_operator::plan::{self, CLUSTER, ENV_PREFIX, ExecutionPlan};
use datastore_operator::render::{self, BuildContext, CREDENTIALS_DIR, Children};
use datastore_operator::store::azure::Body;
use datastore_operator::store::resolve::{Catalog, Scope};
use datastore_operator::store::sas::Permissions;
use datastore_operator::store::{self, StoreConfig};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, PodSpec, Secret};

const DATASTORE: &str = "blob-ds";
/// Where a container finds its termination message file when it does not say otherwise.
const TERMINATION_LOG: &str = "/dev/termination-log";
/// An exit code of the CLI and the agent (README): the storage refused the credentials.
const AUTH: i32 = 4;

// ---------------------------------------------------------------------------------------------
// The experiment and its datastore

/// The issue's example experiment (optionally without its upload reference), with one extra
/// variable.
fn experiment(with_upload: bool) -> Experiment {
    let upload = if with_upload {
        "    - name: --output_dir\n      dataReference: {datastore: blob-ds, path: outputs/run1, mode: upload, pathOnCompute: outputs}\n"
    } else {
        ""
    };
    let yaml = format!(
        r#"apiVersion: datastore.dev/v1alpha1
kind: Experiment
metadata:
  name: train-iris
  namespace: default
  uid: 6f1d2c3b-0a9e-4e5f-8a7b-1c2d3e4f5a6b
spec:
  image: python:3.12-slim
  sourceDirectory: experiment_folder
  entryScript: training_script.py
  env:
    - {{name: EPOCHS, value: "3"}}
  scriptParams:
    - name: --data_folder
      dataReference: {{datastore: blob-ds, path: data/files, mode: download, pathOnCompute: training_data}}
{upload}    - name: --regularization
      value: "0.1"
"#
    );
    serde_saphyr::from_str(&yaml).expect("the test's Experiment parses")
}

/// `blob-ds`: the container at Azurite, with the account key in a Secret, so the builders mint a
/// SAS. Resolved in-process, the way `datastore plan` resolves a datastores file.
fn datastores(container: &str) -> BTreeMap<String, StoreConfig> {
    let text = format!(
        r#"apiVersion: datastore.dev/v1alpha1
kind: Datastore
metadata: {{name: {DATASTORE}, namespace: default}}
spec:
  azureBlob:
    accountName: {ACCOUNT}
    containerName: {container}
    endpoint: {endpoint}
    credentials: {{secretRef: {{name: blob-ds-account-key}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: blob-ds-account-key, namespace: default}}
stringData:
  accountKey: {KEY}
"#,
        endpoint = endpoint()
    );
    let catalog = Catalog::parse(&text, "the test's datastores", PathBuf::from(".")).unwrap();
    let scope = Scope {
        namespace: "default".into(),
        operator_namespace: "datastore-operator".into(),
    };
    let resolved = catalog.resolve(DATASTORE, &scope).unwrap();
    BTreeMap::from([(DATASTORE.to_string(), resolved.config)])
}

/// Plan and build exactly as `datastore plan` (src/cli/plan.rs) does.
fn render(
    exp: &Experiment,
    datastores: &BTreeMap<String, StoreConfig>,
) -> (ExecutionPlan, Children) {
    let plan = plan::plan(&exp.spec, &store::capabilities(datastores), CLUSTER).unwrap();
    let children = render::build(
        exp,
        &plan,
        datastores,
        &BuildContext::default(),
        &[],
        &[],
        Utc::now(),
    )
    .unwrap();
    (plan, children)
}

/// The input blobs under `data/files/`: nested folders, an empty file, and one file over the
/// 8 MiB block size, so the download takes the ranged path and the upload the block path.
fn inputs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("a.txt", b"alpha\n".to_vec()),
        ("empty", Vec::new()),
        ("sub/b.csv", b"x,y\n1,2\n".to_vec()),
        ("sub/deeper/c.bin", bytes(9 * 1024 * 1024 + 123, 3)),
    ]
}

/// Blobs next to the input folder, sharing its name as a prefix.
const SIBLINGS: [&str; 2] = ["data/files-old/stale.txt", "data/filesx"];

/// A container holding the inputs, and siblings that share their prefix but are not inside the
/// folder (the download must not pick them up).
async fn container_with_inputs() -> String {
    let container = unique_container();
    let client = client(&container);
    client.create_container().await.unwrap();
    let blobs = inputs()
        .into_iter()
        .map(|(name, data)| (format!("data/files/{name}"), data))
        .chain(SIBLINGS.map(|name| (name.to_string(), b"no".to_vec())));
    for (name, data) in blobs {
        client
            .put_blob(&name, Body::Bytes(data.clone().into()), md5(&data), false)
            .await
            .unwrap();
    }
    container
}

// ---------------------------------------------------------------------------------------------
// This machine as a node

/// Volumes as directories under `root`, and the objects the controller would have created.
struct Node {
    root: tempfile::TempDir,
    secrets: BTreeMap<String, Secret>,
    /// PersistentVolumeClaims: one directory each, outliving the pods that mount it.
    claims: BTreeMap<String, PathBuf>,
}

impl Node {
    fn new() -> Node {
        Node {
            root: tempfile::tempdir().unwrap(),
            secrets: BTreeMap::new(),
            claims: BTreeMap::new(),
        }
    }

    fn dir(&self, rel: &str) -> PathBuf {
        let dir = self.root.path().join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Creates the Secret and the PVC of `children` (what the controller applies before the Jobs).
    fn apply(&mut self, children: &Children) {
        if let Some(secret) = &children.credentials {
            let name = secret.metadata.name.clone().unwrap();
            self.secrets.insert(name, secret.clone());
        }
        if let Some(pvc) = &children.outputs {
            let name = pvc.metadata.name.clone().unwrap();
            let dir = self.dir(&format!("claims/{name}"));
            self.claims.insert(name, dir);
        }
    }

    /// The pod of `job`, with a directory for each of its volumes.
    fn start(&self, job: &Job) -> Pod {
        let name = job.metadata.name.clone().unwrap();
        let spec = job.spec.as_ref().unwrap().template.spec.clone().unwrap();
        let mut volumes = BTreeMap::new();
        for v in spec.volumes.iter().flatten() {
            let dir = if v.empty_dir.is_some() {
                self.dir(&format!("pods/{name}/volumes/{}", v.name))
            } else if let Some(pvc) = &v.persistent_volume_claim {
                self.claims
                    .get(&pvc.claim_name)
                    .cloned()
                    .unwrap_or_else(|| {
                        panic!(
                            "pod {name} claims {}, which the controller does not create",
                            pvc.claim_name
                        )
                    })
            } else if let Some(source) = &v.secret {
                let secret_name = source.secret_name.as_deref().unwrap();
                let secret = self.secrets.get(secret_name).unwrap_or_else(|| {
                    panic!("pod {name} mounts Secret {secret_name}, which the controller does not create")
                });
                assert!(source.items.is_none(), "every key of the Secret is a file");
                let dir = self.dir(&format!("pods/{name}/volumes/{}", v.name));
                for (key, value) in secret.string_data.iter().flatten() {
                    std::fs::write(dir.join(key), value).unwrap();
                }
                for (key, value) in secret.data.iter().flatten() {
                    std::fs::write(dir.join(key), &value.0).unwrap();
                }
                dir
            } else {
                panic!(
                    "volume {} of pod {name} is of a kind this test cannot stand in for",
                    v.name
                );
            };
            assert!(
                volumes.insert(v.name.clone(), dir).is_none(),
                "volume names are unique"
            );
        }
        Pod {
            name,
            spec,
            volumes,
            dir: self.dir(&format!("pods/{}", job.metadata.name.as_deref().unwrap())),
        }
    }
}

struct Pod {
    name: String,
    spec: PodSpec,
    volumes: BTreeMap<String, PathBuf>,
    dir: PathBuf,
}

impl Pod {
    fn init_containers(&self) -> &[Container] {
        self.spec.init_containers.as_deref().unwrap_or_default()
    }

    fn container(&self, name: &str) -> &Container {
        self.spec
            .containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("pod {} has no container {name}", self.name))
    }

    /// What `c` sees: each mount path and the directory behind it (a `subPath` is created in
    /// its volume, as the kubelet does), its termination message file, and an empty directory
    /// standing for its root filesystem, which is its working directory here.
    fn mounts(&self, c: &Container) -> Mounts {
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let volume = self.volumes.get(&m.name).unwrap_or_else(|| {
                panic!(
                    "container {} mounts volume {}, which pod {} does not have",
                    c.name, m.name, self.name
                )
            });
            assert!(
                m.mount_path.starts_with('/'),
                "mount paths are absolute: {}",
                m.mount_path
            );
            let host = match m.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => {
                    assert!(!sub.starts_with('/') && !sub.split('/').any(|s| s == ".."));
                    volume.join(sub)
                }
                _ => volume.clone(),
            };
            std::fs::create_dir_all(&host).unwrap();
            assert!(
                mounts.iter().all(|x: &Mount| x.path != m.mount_path),
                "container {} mounts {} twice",
                c.name,
                m.mount_path
            );
            mounts.push(Mount {
                volume: m.name.clone(),
                path: m.mount_path.clone(),
                host,
                read_only: m.read_only == Some(true),
            });
        }
        let container_dir = self.dir.join("containers").join(&c.name);
        std::fs::create_dir_all(container_dir.join("root")).unwrap();
        let termination_log = container_dir.join("termination-log");
        std::fs::write(&termination_log, "").unwrap();
        Mounts {
            container: c.name.clone(),
            mounts,
            termination_path: c
                .termination_message_path
                .clone()
                .unwrap_or_else(|| TERMINATION_LOG.to_string()),
            termination_log,
            root: container_dir.join("root"),
        }
    }
}

/// Every file below a directory as (relative path, contents), sorted ([`read_tree`]).
type Tree = Vec<(String, Vec<u8>)>;

struct Mount {
    volume: String,
    path: String,
    host: PathBuf,
    read_only: bool,
}

/// One container's file system as seen from this machine.
struct Mounts {
    container: String,
    mounts: Vec<Mount>,
    /// The termination message path in the container, and the file standing for it.
    termination_path: String,
    termination_log: PathBuf,
    root: PathBuf,
}

impl Mounts {
    /// The directory behind a path in the container, if the path is inside one of its mounts
    /// (the innermost one).
    fn host_path(&self, path: &str) -> Option<PathBuf> {
        self.mounts
            .iter()
            .filter_map(|m| {
                let rest = path.strip_prefix(&m.path)?;
                let rest = rest.strip_prefix('/').or(rest.is_empty().then_some(""))?;
                let host = if rest.is_empty() {
                    m.host.clone()
                } else {
                    m.host.join(rest)
                };
                Some((m.path.len(), host))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, host)| host)
    }

    /// An argument or variable as this machine needs it: a path in one of the container's mounts
    /// becomes the directory behind it. An absolute path that is none of them is a wiring bug:
    /// in the pod it would name something the container does not have.
    fn rewrite(&self, value: &str) -> String {
        if value == self.termination_path {
            return self.termination_log.to_str().unwrap().to_string();
        }
        assert!(
            !value.contains("=/"),
            "container {}: pass paths as separate arguments so they can be checked: {value}",
            self.container
        );
        if !value.starts_with('/') {
            return value.to_string();
        }
        let host = self.host_path(value).unwrap_or_else(|| {
            let paths: Vec<&str> = self.mounts.iter().map(|m| m.path.as_str()).collect();
            panic!(
                "wiring bug: container {} is given {value}, which is none of its volume mounts {paths:?}",
                self.container
            )
        });
        host.to_str().unwrap().to_string()
    }

    /// Runs `c`'s command, `args` rewritten, as `c` would: only its environment as rendered (a
    /// path in a data reference's variable rewritten). An agent container runs the `datastore`
    /// binary in its empty root directory; a container of `image` finds its program on the
    /// image's `PATH` and runs in its working directory there. Asserts that read-only mounts
    /// are unchanged afterwards, and so is the root of a read-only root filesystem.
    fn exec(&self, c: &Container, image: Option<&Image>) -> Output {
        let command = c.command.clone().unwrap_or_default();
        let args: Vec<String> = command[1..]
            .iter()
            .chain(c.args.iter().flatten())
            .map(|a| self.rewrite(a))
            .collect();
        let (program, cwd, mut env) = match image {
            None => {
                // The binary where the image really has it (a command the image's PATH
                // cannot find fails every agent container).
                assert_eq!(
                    command,
                    [common::image::binary_path()],
                    "container {} runs the agent binary where the Dockerfile puts it",
                    c.name
                );
                assert_eq!(c.working_dir, None);
                let program = PathBuf::from(env!("CARGO_BIN_EXE_datastore"));
                (program, self.root.clone(), Vec::new())
            }
            Some(image) => image.process(c, &command[0]),
        };
        env.extend(c.env.iter().flatten().map(|e| {
            assert!(
                e.value_from.is_none(),
                "container {}: {} comes from {:?}, which this test cannot stand in for",
                c.name,
                e.name,
                e.value_from
            );
            let value = e.value.clone().unwrap_or_default();
            if e.name.starts_with(ENV_PREFIX) {
                (e.name.clone(), self.rewrite(&value))
            } else {
                (e.name.clone(), value)
            }
        }));
        let read_only: Vec<(&Mount, Tree)> = self
            .mounts
            .iter()
            .filter(|m| m.read_only)
            .map(|m| (m, read_tree(&m.host)))
            .collect();
        let out = Command::new(&program)
            .args(args)
            .env_clear()
            .envs(env)
            .current_dir(cwd)
            .output()
            .unwrap_or_else(|e| panic!("run {} for container {}: {e}", program.display(), c.name));
        for (m, before) in read_only {
            assert!(
                read_tree(&m.host) == before,
                "container {} changed {}, which it mounts read-only",
                c.name,
                m.path
            );
        }
        let read_only_root = c
            .security_context
            .as_ref()
            .and_then(|s| s.read_only_root_filesystem)
            == Some(true);
        if read_only_root {
            assert_eq!(
                read_tree(&self.root),
                vec![],
                "container {} has a read-only root filesystem but wrote outside its mounts",
                c.name
            );
        }
        out
    }

    fn mount(&self, path: &str) -> &Mount {
        self.mounts
            .iter()
            .find(|m| m.path == path)
            .unwrap_or_else(|| panic!("container {} has no mount at {path}", self.container))
    }
}

/// Runs an agent container: the real `datastore` binary, with the container's args rewritten.
fn run_agent(pod: &Pod, c: &Container) -> (Output, Mounts) {
    assert_eq!(
        c.image.as_deref(),
        Some(BuildContext::default().agent_image.as_str()),
        "{}",
        c.name
    );
    let mounts = pod.mounts(c);
    let out = mounts.exec(c, None);
    (out, mounts)
}

// ---------------------------------------------------------------------------------------------
// The user's container

/// Stands in for the user's training script: parses its arguments the way such a script does
/// (argparse refuses anything it was not told about), lists its data folder into
/// `listing.txt`, writes a "model" made of every input file's bytes, and prints what it saw.
const SCRIPT: &str = r#"
import argparse, json, os

parser = argparse.ArgumentParser()
parser.add_argument("--data_folder", required=True)
parser.add_argument("--output_dir", required=True)
parser.add_argument("--regularization", type=float, required=True)
args = parser.parse_args()

names = sorted(
    os.path.relpath(os.path.join(d, f), args.data_folder)
    for d, _, files in os.walk(args.data_folder)
    for f in files
)
with open(os.path.join(args.output_dir, "listing.txt"), "w") as out:
    for n in names:
        out.write(f"{n}\t{os.path.getsize(os.path.join(args.data_folder, n))}\n")
os.makedirs(os.path.join(args.output_dir, "model"))
with open(os.path.join(args.output_dir, "model", "weights.bin"), "wb") as out:
    for n in names:
        with open(os.path.join(args.data_folder, n), "rb") as f:
            out.write(f.read())

print(json.dumps({
    "cwd": os.getcwd(),
    "data_folder": args.data_folder,
    "output_dir": args.output_dir,
    "regularization": args.regularization,
    "env": {k: v for k, v in os.environ.items() if k.startswith("AZUREML_") or k == "EPOCHS"},
}))
"#;

/// A stand-in for the user's image (`python:3.12-slim`), as far as `main` needs it: its root
/// with the WORKDIR `/app` holding `experiment_folder/training_script.py` (the script above),
/// and a `bin` directory, its `PATH`, with `sh` and `python`.
struct Image {
    root: PathBuf,
    bin: PathBuf,
}

impl Image {
    const WORKDIR: &str = "app";

    fn new(node: &Node) -> Image {
        let root = node.dir("image");
        let scripts = node.dir(&format!("image/{}/experiment_folder", Image::WORKDIR));
        std::fs::write(scripts.join("training_script.py"), SCRIPT).unwrap();
        let bin = node.dir("image/bin");
        // The interpreter itself, not a shim that needs more of this machine's environment.
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 is installed: it stands in for the image's python");
        assert!(out.status.success());
        let python = String::from_utf8(out.stdout).unwrap();
        std::os::unix::fs::symlink(python.trim(), bin.join("python")).unwrap();
        std::os::unix::fs::symlink("/bin/sh", bin.join("sh")).unwrap();
        Image { root, bin }
    }

    /// The program `c` runs, where it runs, and the image's environment (`PATH`).
    fn process(&self, c: &Container, program: &str) -> (PathBuf, PathBuf, Vec<(String, String)>) {
        assert!(
            !program.contains('/'),
            "container {}: the image has {program} on its PATH only",
            c.name
        );
        let program = self.bin.join(program);
        assert!(program.exists(), "the image has no {}", program.display());
        let cwd = match c.working_dir.as_deref() {
            None => self.root.join(Image::WORKDIR),
            Some(dir) => {
                assert!(
                    dir.starts_with('/'),
                    "container {}: workingDir {dir:?} is relative; container runtimes refuse it",
                    c.name
                );
                self.root.join(dir.trim_start_matches('/'))
            }
        };
        let path = ("PATH".to_string(), self.bin.to_str().unwrap().to_string());
        (program, cwd, vec![path])
    }
}

/// Asserts that `main` can reach no credential: no Secret volume, no variable from a Secret, and
/// no value holding the minted signature or the account key.
fn assert_no_credentials(pod: &Pod, main: &Container, sig: &str) {
    for m in main.volume_mounts.iter().flatten() {
        let volume = pod
            .spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .unwrap();
        assert!(
            volume.secret.is_none(),
            "main mounts Secret volume {}",
            m.name
        );
        assert!(
            !m.mount_path.starts_with(CREDENTIALS_DIR),
            "main mounts {}",
            m.mount_path
        );
    }
    assert!(
        main.env_from.is_none(),
        "main takes variables from {:?}",
        main.env_from
    );
    for e in main.env.iter().flatten() {
        assert!(
            e.value_from.is_none(),
            "main's {} comes from {:?}",
            e.name,
            e.value_from
        );
    }
    let rendered = serde_json::to_string(main).unwrap();
    assert!(
        !rendered.contains(sig),
        "the SAS signature is in main: {rendered}"
    );
    assert!(
        !rendered.contains(KEY),
        "the account key is in main: {rendered}"
    );
}

// ---------------------------------------------------------------------------------------------
// Checks

/// The datastores file of the credentials Secret, and the SAS token it holds for `blob-ds`.
fn credentials(children: &Children) -> (String, String) {
    let secret = children.credentials.as_ref().expect("a credentials Secret");
    assert!(secret.string_data.is_none(), "applied with data");
    let data = datastore_operator::render::secret_values(secret);
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        ["datastores.yaml"],
        "the Secret holds the datastores file only"
    );
    let file = data["datastores.yaml"].clone();
    let token = datastore_operator::yaml::documents::<serde_json::Value>(&file)
        .unwrap()
        .into_iter()
        .find(|d| d["kind"] == "Secret")
        .and_then(|d| d["stringData"]["sasToken"].as_str().map(String::from))
        .unwrap_or_else(|| panic!("a Secret with a sasToken in {file}"));
    (file, token)
}

fn sas_field(token: &str, field: &str) -> String {
    url::form_urlencoded::parse(token.as_bytes())
        .find(|(k, _)| k == field)
        .unwrap_or_else(|| panic!("{field} in the SAS"))
        .1
        .into_owned()
}

async fn blob(container: &str, name: &str) -> Vec<u8> {
    client(container)
        .get(name, None, None)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

async fn blob_names(container: &str, prefix: &str) -> BTreeSet<String> {
    client(container)
        .list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests

/// The run Job (download init containers, then the script) and the upload Job, as rendered,
/// move the right data to the right places with the minted SAS.
#[tokio::test(flavor = "multi_thread")]
async fn the_rendered_jobs_move_the_data_against_azurite() {
    let container = container_with_inputs().await;
    let datastores = datastores(&container);
    let exp = experiment(true);
    let (plan, children) = render(&exp, &datastores);

    // The credentials: a SAS for the container with what download and upload need, no key.
    let (file, token) = credentials(&children);
    assert!(
        !file.contains(KEY),
        "the account key is in the Secret:\n{file}"
    );
    assert_eq!(sas_field(&token, "sp"), "rcwl");
    assert_eq!(sas_field(&token, "sr"), "c");
    let sig = sas_field(&token, "sig");

    let mut node = Node::new();
    node.apply(&children);

    // The run Job: every init container in order, each must succeed (else the pod fails).
    let run = node.start(&children.run);
    assert_eq!(run.init_containers().len(), plan.downloads.len());
    let mut reports = Vec::new();
    for c in run.init_containers() {
        let (out, mounts) = run_agent(&run, c);
        assert_exit(&out, 0);
        let message = std::fs::read_to_string(&mounts.termination_log).unwrap();
        let report = Report::parse(&message)
            .unwrap_or_else(|| panic!("{}'s termination message is a report: {message:?}", c.name));
        reports.push((c.name.clone(), report, mounts));
    }

    // The download's termination message records exactly what the run saw.
    let inputs = inputs();
    let [(name, report, mounts)] = &reports[..] else {
        panic!("one download init container")
    };
    assert_eq!(name, "download-0");
    assert_eq!(report.files, inputs.len() as u64);
    assert_eq!(
        report.bytes,
        inputs.iter().map(|(_, d)| d.len() as u64).sum::<u64>()
    );
    let named: Vec<(&str, &[u8])> = inputs.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    assert_eq!(report.digest, expected_digest(&named));
    let download_dir = &mounts.mount("/mnt/datastore/training_data").host;
    let expected_tree: Tree = inputs
        .iter()
        .map(|(n, d)| (n.to_string(), d.clone()))
        .collect();
    assert_eq!(
        read_tree(download_dir),
        expected_tree,
        "the folder's contents, nothing else"
    );

    // `main`: its rendered command in the stand-in image, paths rewritten. It ends in the
    // issue's command line, whatever enters the source directory first.
    let main = run.container("main");
    assert_no_credentials(&run, main, &sig);
    let command_line: Vec<&str> = main
        .command
        .iter()
        .chain(&main.args)
        .flatten()
        .map(String::as_str)
        .collect();
    let issue = [
        "python",
        "training_script.py",
        "--data_folder",
        "/mnt/datastore/training_data",
        "--output_dir",
        "/mnt/datastore/outputs",
        "--regularization",
        "0.1",
    ];
    assert!(command_line.ends_with(&issue), "{command_line:?}");
    let image = Image::new(&node);
    let main_mounts = run.mounts(main);
    let out = main_mounts.exec(main, Some(&image));
    assert!(
        out.status.success(),
        "the script failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        Path::new(seen["cwd"].as_str().unwrap()),
        image
            .root
            .join("app/experiment_folder")
            .canonicalize()
            .unwrap(),
        "the script runs in its source directory"
    );
    assert_eq!(seen["regularization"], 0.1);
    assert_eq!(
        seen["env"],
        serde_json::json!({
            "AZUREML_DATAREFERENCE_DATA_FOLDER": seen["data_folder"],
            "AZUREML_DATAREFERENCE_OUTPUT_DIR": seen["output_dir"],
            "EPOCHS": "3",
        }),
        "each data reference's variable holds the path its parameter was given"
    );
    assert_eq!(
        seen["data_folder"].as_str().unwrap(),
        download_dir.to_str().unwrap(),
        "main reads the folder download-0 filled"
    );
    let data_mount = main_mounts.mount("/mnt/datastore/training_data");
    assert_eq!(data_mount.volume, "staging");
    assert!(data_mount.read_only, "main cannot change its inputs");

    // The upload Job, in a pod of its own, reading the outputs volume main wrote to.
    let upload = node.start(children.upload.as_ref().expect("an upload Job"));
    assert_eq!(upload.spec.containers.len(), plan.uploads.len());
    for c in &upload.spec.containers {
        let (out, _) = run_agent(&upload, c);
        assert_exit(&out, 0);
        assert_eq!(summary(&out)["transferred"], 2, "{}", stdout(&out));
    }

    // What arrived: the folder's contents under outputs/run1, byte-exact.
    let written = read_tree(&main_mounts.mount("/mnt/datastore/outputs").host);
    let names: Vec<&str> = written.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["listing.txt", "model/weights.bin"]);
    let outputs = blob_names(&container, "outputs/").await;
    assert_eq!(
        outputs,
        BTreeSet::from([
            "outputs/run1/listing.txt".into(),
            "outputs/run1/model/weights.bin".into()
        ])
    );
    for (name, data) in &written {
        assert!(
            blob(&container, &format!("outputs/run1/{name}")).await == *data,
            "outputs/run1/{name} differs from what the script wrote"
        );
    }
    let listing: String = inputs
        .iter()
        .map(|(n, d)| format!("{n}\t{}\n", d.len()))
        .collect();
    assert_eq!(
        String::from_utf8(blob(&container, "outputs/run1/listing.txt").await).unwrap(),
        listing,
        "the script saw exactly the input files"
    );
    let weights: Vec<u8> = inputs.iter().flat_map(|(_, d)| d.clone()).collect();
    assert!(
        blob(&container, "outputs/run1/model/weights.bin").await == weights,
        "the model is the inputs' bytes"
    );
    // Nothing else appeared.
    let expected: BTreeSet<String> = inputs
        .iter()
        .map(|(n, _)| format!("data/files/{n}"))
        .chain(SIBLINGS.map(String::from))
        .chain(outputs)
        .collect();
    assert_eq!(blob_names(&container, "").await, expected);
}

/// A SAS minted for a download-only experiment (read and list) is refused by Azurite when the
/// upload container uses it, while the download container it was minted for works with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_minted_read_only_sas_is_refused_when_used_to_write() {
    let container = container_with_inputs().await;
    let datastores = datastores(&container);
    let (_, with_upload) = render(&experiment(true), &datastores);
    let (plan, download_only) = render(&experiment(false), &datastores);
    assert!(download_only.upload.is_none());
    let read_only = Permissions::from(plan.permissions[DATASTORE]);
    assert_eq!(read_only.as_str(), "rl");
    let (_, token) = credentials(&download_only);
    assert_eq!(sas_field(&token, "sp"), "rl");

    // The download-only experiment's Secret (the same name), the other's outputs volume.
    let mut node = Node::new();
    node.apply(&with_upload);
    node.apply(&download_only);

    // It reads: the init container it was minted for succeeds.
    let run = node.start(&download_only.run);
    let (out, mounts) = run_agent(&run, &run.init_containers()[0]);
    assert_exit(&out, 0);
    let message = std::fs::read_to_string(&mounts.termination_log).unwrap();
    assert_eq!(
        Report::parse(&message).unwrap().files,
        inputs().len() as u64
    );

    // It does not write: the upload container fails with the Auth exit code, uploads nothing.
    let upload = node.start(with_upload.upload.as_ref().unwrap());
    let c = &upload.spec.containers[0];
    let src = upload
        .mounts(c)
        .mount("/mnt/datastore/outputs")
        .host
        .clone();
    write_tree(
        &src,
        &[
            ("model.pkl", bytes(1000, 5)),
            ("logs/train.log", b"epoch 1\n".to_vec()),
        ],
    );
    let (out, mounts) = run_agent(&upload, c);
    assert_exit(&out, AUTH);
    let error = &summary(&out)["error"];
    assert_eq!(error["reason"], "AuthFailed", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("permission"),
        "says a permission is missing: {error}"
    );
    // The controller reads why from the termination message.
    assert_eq!(
        std::fs::read_to_string(&mounts.termination_log).unwrap(),
        error["message"].as_str().unwrap()
    );
    assert!(
        blob_names(&container, "outputs/").await.is_empty(),
        "nothing was uploaded"
    );
}
