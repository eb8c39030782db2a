//! `datastore run`: the local compute target, end to end, against a local datastore and a real
//! Azurite. The scripts are real Python scripts run by this machine's python3, the seed's own
//! `examples/experiment_folder/training_script.py` among them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

/// The repository's example data, as uploaded by `make demo` (relative names, contents).
fn example_data() -> Vec<(String, Vec<u8>)> {
    read_tree(Path::new("examples/data"))
}

/// A datastores file defining `workspace-ds` (the example's datastore) as the local folder
/// `store`.
fn local_workspace(dir: &Path) -> PathBuf {
    let path = dir.join("workspace.yaml");
    std::fs::write(
        &path,
        "apiVersion: datastore.dev/v1alpha1\nkind: Datastore\nmetadata: {name: workspace-ds}\nspec:\n  local: {path: store}\n",
    )
    .unwrap();
    path
}

fn run(args: &[&str]) -> Output {
    let mut all = vec!["run"];
    all.extend(args);
    all.push("--no-progress");
    datastore(&all)
}

/// The files the script printed under its `Data folder:` line, as the seed's script lists them.
fn listed(out: &Output) -> Vec<String> {
    let text = stdout(out);
    let mut names: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("Data folder:"))
        .skip(1)
        .take_while(|l| l.starts_with("   "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// The value `datastore run` gave parameter `param` (from its `running ...` line).
fn arg_of(out: &Output, param: &str) -> PathBuf {
    let err = stderr(out);
    let line = err
        .lines()
        .find(|l| l.starts_with("datastore: running "))
        .unwrap_or_else(|| panic!("no running line in {err}"));
    let arg = line
        .split_whitespace()
        .skip_while(|w| *w != param)
        .nth(1)
        .unwrap();
    PathBuf::from(arg)
}

#[test]
fn the_seed_example_runs_locally_on_a_local_datastore() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    for (name, bytes) in example_data() {
        write_tree(&store, &[(&format!("data/files/{name}"), bytes)]);
    }
    // A sibling folder with a shared name prefix must not reach the script.
    write_tree(&store, &[("data/files2/not-mine.txt", b"x".to_vec())]);
    let work = dir.path().join("work");

    let out = run(&[
        "examples/experiment.yaml",
        "--local",
        "--datastores",
        local_workspace(dir.path()).to_str().unwrap(),
        "--work-dir",
        work.to_str().unwrap(),
    ]);
    assert_exit(&out, 0);

    // The script saw exactly the downloaded files, at the path it was given.
    let expected: Vec<String> = example_data().into_iter().map(|(n, _)| n).collect();
    assert_eq!(listed(&out), expected, "{}", stdout(&out));
    assert_eq!(
        arg_of(&out, "--data_folder"),
        work.join("datastore/training_data")
    );
    let err = stderr(&out);
    assert_eq!(
        err.matches("does not apply on the local compute target")
            .count(),
        1,
        "{err}"
    );

    // Its outputs arrived under the upload reference's path, with the rendered value.
    let outputs = read_tree(&store.join("outputs/run1"));
    let names: Vec<&str> = outputs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["metrics.json", "model.json"]);
    let metrics: serde_json::Value = serde_json::from_slice(&outputs[0].1).unwrap();
    assert_eq!(metrics["regularization"], 0.1);
    assert_eq!(metrics["rows"], 150);
    // The user's work directory is the user's: kept, with what the run saw.
    assert_eq!(read_tree(&work.join("datastore/outputs")), outputs);
}

/// An Experiment in `dir` running `script` (Python) with a download of `data` and an upload to
/// `outputs/<run>` on datastore `datastore`.
fn experiment(dir: &Path, datastore: &str, run: &str, policy: &str, script: &str) -> PathBuf {
    write_tree(dir, &[("code/train.py", script.as_bytes().to_vec())]);
    let path = dir.join("experiment.yaml");
    std::fs::write(
        &path,
        format!(
            r#"apiVersion: datastore.dev/v1alpha1
kind: Experiment
metadata: {{name: {run}}}
spec:
  image: python:3.12-slim
  sourceDirectory: code
  entryScript: train.py
  computeTarget: local
  uploadPolicy: {policy}
  scriptParams:
    - name: --data
      dataReference: {{datastore: {datastore}, path: data, mode: download}}
    - name: --out
      dataReference: {{datastore: {datastore}, path: outputs/{run}, mode: upload}}
"#
        ),
    )
    .unwrap();
    path
}

/// Copies its `--data` folder's files into `--out` as `<name>.seen`, then exits with the code in
/// `EXIT` (0 when unset).
const COPY_THEN_EXIT: &str = r#"
import argparse, os, sys
p = argparse.ArgumentParser()
p.add_argument("--data"); p.add_argument("--out")
a = p.parse_args()
assert os.environ["AZUREML_DATAREFERENCE_DATA"] == a.data
for root, _, files in os.walk(a.data):
    for f in files:
        rel = os.path.relpath(os.path.join(root, f), a.data)
        os.makedirs(os.path.dirname(os.path.join(a.out, rel + ".seen")), exist_ok=True)
        with open(os.path.join(root, f), "rb") as src, open(os.path.join(a.out, rel + ".seen"), "wb") as dst:
            dst.write(src.read())
print("copied", flush=True)
sys.exit(int(os.environ.get("EXIT", "0")))
"#;

#[tokio::test]
async fn against_azurite_the_script_sees_the_blobs_and_its_outputs_become_blobs() {
    let fx = Fixture::new().await;
    let files = [
        ("data/a.txt", bytes(10, 1)),
        ("data/sub/b.bin", bytes(3 * 1024 * 1024, 2)),
        ("data2/outside.txt", bytes(5, 3)),
    ];
    let src = fx.path("src");
    write_tree(&src, &files);
    assert_exit(
        &fx.cli(&[
            "upload",
            "--datastore",
            "blob",
            "--src-dir",
            src.to_str().unwrap(),
        ]),
        0,
    );

    let exp = experiment(fx.dir.path(), "blob", "run-a", "OnSuccess", COPY_THEN_EXIT);
    let out = fx.cli(&["run", exp.to_str().unwrap()]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("copied"), "{}", stdout(&out));

    let mut blobs: Vec<String> = fx
        .client
        .list("outputs/run-a/")
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect();
    blobs.sort();
    assert_eq!(
        blobs,
        ["outputs/run-a/a.txt.seen", "outputs/run-a/sub/b.bin.seen"]
    );
    let dest = fx.path("back");
    assert_exit(
        &fx.cli(&[
            "download",
            "--datastore",
            "blob",
            "--prefix",
            "outputs/run-a",
            "--target-path",
            dest.to_str().unwrap(),
        ]),
        0,
    );
    assert_eq!(
        std::fs::read(dest.join("outputs/run-a/sub/b.bin.seen")).unwrap(),
        files[1].1
    );
    // A temporary work directory whose outputs all arrived is removed.
    let root = arg_of(&out, "--data");
    assert!(root.starts_with(std::env::temp_dir()), "{}", root.display());
    assert!(!root.exists(), "{} was left behind", root.display());
}

/// `--cache-dir`: the first run downloads its data into the cache, the second reads it from
/// there (no download) and the script sees the same files; the cached tree is read-only.
#[tokio::test]
async fn a_second_run_with_the_cache_reads_its_data_from_the_cache() {
    let fx = Fixture::new().await;
    let files = [
        ("data/a.txt", bytes(10, 1)),
        ("data/sub/b.bin", bytes(300_000, 2)),
    ];
    let src = fx.path("src");
    write_tree(&src, &files);
    assert_exit(
        &fx.cli(&[
            "upload",
            "--datastore",
            "blob",
            "--src-dir",
            src.to_str().unwrap(),
        ]),
        0,
    );
    let cache = fx.path("cache");
    let run = |name: &str| {
        let exp = experiment(fx.dir.path(), "blob", name, "OnSuccess", COPY_THEN_EXIT);
        fx.cli(&[
            "run",
            exp.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ])
    };
    let first = run("cached-1");
    assert_exit(&first, 0);
    assert!(
        stderr(&first).contains("downloaded into the cache --data"),
        "{}",
        stderr(&first)
    );
    let second = run("cached-2");
    assert_exit(&second, 0);
    assert!(
        stderr(&second).contains("from the cache --data"),
        "{}",
        stderr(&second)
    );
    for run in ["cached-1", "cached-2"] {
        let seen = fx.client.list(&format!("outputs/{run}/")).await.unwrap();
        assert_eq!(seen.len(), 2, "{run}: {seen:?}");
    }
    let entries: Vec<_> = std::fs::read_dir(cache.join("entries")).unwrap().collect();
    assert_eq!(entries.len(), 1, "one entry for one unchanged folder");

    // The reference decides for itself: `cache: false` downloads despite --cache-dir...
    let with_reference_cache = |name: &str, cache: bool| {
        let exp = experiment(fx.dir.path(), "blob", name, "OnSuccess", COPY_THEN_EXIT);
        let yaml = std::fs::read_to_string(&exp).unwrap().replace(
            "path: data, mode: download}",
            &format!("path: data, mode: download, cache: {cache}}}"),
        );
        std::fs::write(&exp, yaml).unwrap();
        exp
    };
    let exp = with_reference_cache("uncached", false);
    let out = run_with(&fx, &exp, &["--cache-dir", cache.to_str().unwrap()], None);
    assert_exit(&out, 0);
    assert!(
        stderr(&out).contains("downloaded --data"),
        "{}",
        stderr(&out)
    );
    // ...and `cache: true` uses the default cache ($XDG_CACHE_HOME/datastore) without flags.
    let xdg = fx.path("xdg");
    let exp = with_reference_cache("asked", true);
    let first = run_with(&fx, &exp, &[], Some(&xdg));
    assert_exit(&first, 0);
    assert!(
        stderr(&first).contains("downloaded into the cache --data"),
        "{}",
        stderr(&first)
    );
    assert!(xdg.join("datastore/entries").is_dir());
    let second = run_with(&fx, &exp, &[], Some(&xdg));
    assert!(
        stderr(&second).contains("from the cache --data"),
        "{}",
        stderr(&second)
    );
}

/// Issue 27's case through `datastore run --cache`: once an account-key run has cached the
/// folder, a run whose datastore holds a SAS that may only list (`l`) is refused (exit 4, an
/// auth failure) instead of being served the cached tree: its script never runs.
#[tokio::test]
async fn a_run_whose_sas_may_only_list_is_not_served_the_cached_folder() {
    let fx = Fixture::new().await;
    let src = fx.path("src");
    write_tree(&src, &[("data/private.txt", bytes(10, 1))]);
    assert_exit(
        &fx.cli(&[
            "upload",
            "--datastore",
            "blob",
            "--src-dir",
            src.to_str().unwrap(),
        ]),
        0,
    );
    let cache = fx.path("cache");
    let run = |name: &str| {
        let exp = experiment(fx.dir.path(), "blob", name, "OnSuccess", COPY_THEN_EXIT);
        fx.cli(&[
            "run",
            exp.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ])
    };
    assert_exit(&run("by-key"), 0);

    let token = sas(&fx.container, LIST_ONLY);
    fx.write_datastores(
        &fx.container,
        &endpoint(),
        &format!("sasToken: \"{token}\""),
    );
    let refused = run("list-only");
    assert_exit(&refused, 4);
    // Exit 4 alone could also be the outputs' upload, which this SAS may not do either.
    assert!(
        !stdout(&refused).contains("copied"),
        "the script read the cached folder: {}",
        stdout(&refused)
    );
    assert!(
        stderr(&refused).contains("may list the folder but not read it"),
        "{}",
        stderr(&refused)
    );
}

/// `datastore run <exp> <flags>` on the fixture's datastores, with `$XDG_CACHE_HOME` set when
/// given.
fn run_with(fx: &Fixture, exp: &Path, flags: &[&str], xdg: Option<&Path>) -> Output {
    let ds = fx.datastores();
    let mut command = Command::new(env!("CARGO_BIN_EXE_datastore"));
    command
        .args(["run", exp.to_str().unwrap()])
        .args(flags)
        .args(["--datastores", ds.to_str().unwrap(), "--no-progress"])
        .env_remove("DATASTORE_CONFIG")
        .env_remove("DATASTORE_CACHE_DIR");
    if let Some(xdg) = xdg {
        command.env("XDG_CACHE_HOME", xdg);
    }
    command.output().unwrap()
}

#[tokio::test]
async fn the_script_s_exit_code_is_passed_through_and_its_outputs_wait_under_on_success() {
    let fx = Fixture::new().await;
    write_tree(&fx.path("localstore"), &[("data/x.txt", b"x".to_vec())]);
    let exp = experiment(fx.dir.path(), "local", "run-b", "OnSuccess", COPY_THEN_EXIT);
    let out = datastore_env(&fx, &["run", exp.to_str().unwrap()], "3");
    assert_exit(&out, 3);
    let err = stderr(&out);
    assert!(err.contains("the script failed with exit code 3"), "{err}");
    assert!(
        err.contains("not uploaded: uploadPolicy is OnSuccess"),
        "{err}"
    );
    assert!(!fx.path("localstore/outputs").exists());
    // Nothing is lost: the outputs stay in the work directory, which says where.
    let work = arg_of(&out, "--data")
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(err.contains(&format!("kept {}", work.display())), "{err}");
    assert_eq!(
        std::fs::read(work.join("datastore/out/x.txt.seen")).unwrap(),
        b"x"
    );
    std::fs::remove_dir_all(work).unwrap();
}

#[tokio::test]
async fn a_failed_script_under_always_still_uploads_its_outputs() {
    let fx = Fixture::new().await;
    let src = fx.path("src");
    write_tree(&src, &[("data/log.txt", b"epoch 1".to_vec())]);
    assert_exit(
        &fx.cli(&[
            "upload",
            "--datastore",
            "blob",
            "--src-dir",
            src.to_str().unwrap(),
        ]),
        0,
    );
    let exp = experiment(fx.dir.path(), "blob", "run-c", "Always", COPY_THEN_EXIT);
    let out = datastore_env(&fx, &["run", exp.to_str().unwrap()], "5");
    assert_exit(&out, 5);
    let blobs = fx.client.list("outputs/run-c/").await.unwrap();
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    assert_eq!(blobs[0].name, "outputs/run-c/log.txt.seen");
}

/// `datastore <args> --datastores <fixture's> --no-progress` with `EXIT` set for the script.
fn datastore_env(fx: &Fixture, args: &[&str], exit: &str) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_datastore"))
        .args(args)
        .args([
            "--datastores",
            fx.datastores().to_str().unwrap(),
            "--no-progress",
        ])
        .env_remove("DATASTORE_CONFIG")
        .env("EXIT", exit)
        .output()
        .unwrap()
}

#[test]
fn mount_is_refused_before_anything_is_transferred() {
    let dir = tempfile::tempdir().unwrap();
    // The download's datastore is an endpoint nothing listens on: any transfer attempt would
    // end in "unreachable" (exit 6) instead of the refusal.
    let datastores = fake_datastores(dir.path(), free_port());
    let exp = dir.path().join("experiment.yaml");
    write_tree(dir.path(), &[("train.py", b"raise SystemExit(9)".to_vec())]);
    std::fs::write(
        &exp,
        r#"apiVersion: datastore.dev/v1alpha1
kind: Experiment
metadata: {name: mounts}
spec:
  image: python:3.12-slim
  entryScript: train.py
  scriptParams:
    - {name: --data, dataReference: {datastore: fake, path: data, mode: download}}
    - {name: --big, dataReference: {datastore: fake, path: big, mode: mount}}
"#,
    )
    .unwrap();
    let work = dir.path().join("work");
    let out = run(&[
        exp.to_str().unwrap(),
        "--local",
        "--datastores",
        datastores.to_str().unwrap(),
        "--work-dir",
        work.to_str().unwrap(),
    ]);
    assert_exit(&out, 3);
    let err = stderr(&out);
    assert!(
        err.contains("parameter --big: mount is only available on a remote compute target"),
        "{err}"
    );
    assert!(!work.exists(), "the work directory was created");
    assert!(!err.contains("downloaded"), "{err}");
}

#[test]
fn a_cluster_experiment_needs_local_and_a_used_work_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ds = local_workspace(dir.path());
    let out = run(&[
        "examples/experiment.yaml",
        "--datastores",
        ds.to_str().unwrap(),
    ]);
    assert_exit(&out, 3);
    let err = stderr(&out);
    assert!(err.contains("computeTarget: cluster"), "{err}");
    assert!(err.contains("--local"), "{err}");

    let work = dir.path().join("work");
    write_tree(&work, &[("stale.csv", b"old".to_vec())]);
    let out = run(&[
        "examples/experiment.yaml",
        "--local",
        "--datastores",
        ds.to_str().unwrap(),
        "--work-dir",
        work.to_str().unwrap(),
    ]);
    assert_exit(&out, 3);
    assert!(stderr(&out).contains("is not empty"), "{}", stderr(&out));
    assert_eq!(
        read_tree(&work),
        [("stale.csv".to_string(), b"old".to_vec())]
    );
}

#[test]
fn code_from_a_datastore_is_downloaded_and_run_in_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    write_tree(
        &store,
        &[
            (
                "snapshots/abc/src/train.py",
                b"import os, sys\nprint('cwd', os.getcwd())\nprint('arg', sys.argv[1:])\n".to_vec(),
            ),
            ("data/x.txt", b"x".to_vec()),
        ],
    );
    let exp = dir.path().join("experiment.yaml");
    std::fs::write(
        &exp,
        r#"apiVersion: datastore.dev/v1alpha1
kind: Experiment
metadata: {name: from-snapshot}
spec:
  image: python:3.12-slim
  code: {datastore: workspace-ds, path: snapshots/abc}
  sourceDirectory: src
  entryScript: train.py
  computeTarget: local
  scriptParams:
    - {name: --lr, value: "0.5"}
"#,
    )
    .unwrap();
    let work = dir.path().join("work");
    let out = run(&[
        exp.to_str().unwrap(),
        "--datastores",
        local_workspace(dir.path()).to_str().unwrap(),
        "--work-dir",
        work.to_str().unwrap(),
    ]);
    assert_exit(&out, 0);
    let printed = stdout(&out);
    assert!(
        printed.contains(&format!("cwd {}", work.join("code/src").display())),
        "{printed}"
    );
    assert!(printed.contains("arg ['--lr', '0.5']"), "{printed}");
    assert!(
        stderr(&out).contains("downloaded code: workspace-ds:snapshots/abc"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_the_download_stops_the_run_before_the_script() {
    let listing = listing_xml(&[("in/slow.bin", 5, false)]);
    let server = FakeServer::listing(listing, b"slow!".to_vec(), Duration::from_secs(3)).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = fake_datastores(dir.path(), server.port);
    write_tree(dir.path(), &[("train.py", b"print('ran')".to_vec())]);
    let exp = dir.path().join("experiment.yaml");
    std::fs::write(
        &exp,
        "apiVersion: datastore.dev/v1alpha1\nkind: Experiment\nmetadata: {name: slow}\nspec:\n  image: x\n  entryScript: train.py\n  computeTarget: local\n  scriptParams:\n    - {name: --data, dataReference: {datastore: fake, path: in, mode: download}}\n",
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_datastore"))
        .args(["run", exp.to_str().unwrap(), "--no-progress"])
        .args(["--datastores", ds.to_str().unwrap()])
        .env_remove("DATASTORE_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !server.requests().iter().any(|r| !r.contains("comp=list")) {
        assert!(std::time::Instant::now() < deadline, "the blob is fetched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_exit(&out, 143);
    assert!(!stdout(&out).contains("ran"), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("interrupted while downloading"),
        "{}",
        stderr(&out)
    );
}

/// A local Experiment on `workspace-ds` (the local folder `store`, holding `data/in.txt`) whose
/// script leaves `RAN` beside the Experiment file, with `edit` applied to its text; the
/// datastores file also names `fake`, an endpoint nothing listens on.
fn checked_experiment(dir: &Path, edit: impl Fn(String) -> String) -> (PathBuf, PathBuf) {
    write_tree(
        dir,
        &[
            ("store/data/in.txt", b"in".to_vec()),
            ("code/train.py", b"open('../RAN', 'w').close()\n".to_vec()),
            // Run from code/ as a wrongly allowed entryScript would be: it leaves RAN too.
            ("outside.py", b"open('../RAN', 'w').close()\n".to_vec()),
        ],
    );
    let fake = std::fs::read_to_string(fake_datastores(dir, free_port())).unwrap();
    let workspace = std::fs::read_to_string(local_workspace(dir)).unwrap();
    let datastores = dir.join("datastores.yaml");
    std::fs::write(&datastores, format!("{workspace}---\n{fake}")).unwrap();
    let exp = dir.join("experiment.yaml");
    let text = r#"apiVersion: datastore.dev/v1alpha1
kind: Experiment
metadata: {name: checked}
spec:
  image: python:3.12-slim
  sourceDirectory: code
  entryScript: train.py
  computeTarget: local
  env: [{name: LOG_LEVEL, value: debug}]
  scriptParams:
    - {name: --data, dataReference: {datastore: workspace-ds, path: data, mode: download}}
    - {name: --out, dataReference: {datastore: workspace-ds, path: outputs, mode: upload}}
"#;
    std::fs::write(&exp, edit(text.to_string())).unwrap();
    (exp, datastores)
}

/// Everything `datastore run` can check is checked before the first byte moves: a wrong
/// upload path, env, entryScript or an unreachable upload datastore stops the run before the
/// download and the script (they were found only after the script had run).
#[test]
fn what_can_be_checked_is_refused_before_anything_is_downloaded_or_run() {
    // The kernel's limits (src/api/limits.rs), with the controller's sentences.
    let long_env = format!("{{name: LOG_LEVEL, value: {}}}", "x".repeat(32_001));
    // (The whole command line's limit, 1 MiB, cannot be reached from a file the CLI reads, which
    // holds at most 1 MiB: the planner's tests refuse it.)
    let cases: [(&str, &str, &str, i32, &str); 7] = [
        (
            "an env value longer than one argument may be",
            "{name: LOG_LEVEL, value: debug}",
            &long_env,
            3,
            "env LOG_LEVEL holds 32001 characters, more than the 32000 one may hold (the kernel refuses to start a program with an argument or environment variable over 128 KiB); pass large inputs as a file in a datastore (a dataReference) instead",
        ),
        (
            "a datastore name that is not one",
            "{datastore: workspace-ds, path: data,",
            "{datastore: team-b/workspace-ds, path: data,",
            3,
            "parameter --data refers to datastore \"team-b/workspace-ds\", which is not a name a datastore can have: datastore must be the name of",
        ),
        (
            "upload path",
            "path: outputs,",
            "path: 'outputs/../../elsewhere',",
            3,
            "parameter --out: the datastore path 'outputs/../../elsewhere' has a `.` or `..` segment",
        ),
        (
            "env",
            "{name: LOG_LEVEL, value: debug}",
            "{name: 'LOG=LEVEL', value: debug}",
            3,
            "env \"LOG=LEVEL\" contains `=`",
        ),
        (
            "entryScript",
            "entryScript: train.py",
            "entryScript: ../outside.py",
            3,
            "entryScript \"../outside.py\" has a `..` segment",
        ),
        (
            "entryScript with a backslash",
            "entryScript: train.py",
            "entryScript: '..\\outside.py'",
            3,
            "has a `..` segment",
        ),
        (
            "unreachable upload datastore",
            "{datastore: workspace-ds, path: outputs,",
            "{datastore: fake, path: outputs,",
            6,
            "datastore fake cannot be used, so nothing was downloaded and the script did not run",
        ),
    ];
    for (what, from, to, code, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (exp, datastores) = checked_experiment(dir.path(), |text| {
            assert!(text.contains(from), "{what}");
            text.replace(from, to)
        });
        let work = dir.path().join("work");
        let out = run(&[
            exp.to_str().unwrap(),
            "--datastores",
            datastores.to_str().unwrap(),
            "--work-dir",
            work.to_str().unwrap(),
            // The unreachable datastore fails once the budget is spent, not after minutes.
            "--retry-budget",
            "1s",
        ]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{what}: {err}");
        assert!(err.contains(says), "{what}: {err}");
        assert!(!err.contains("downloaded --data"), "{what}: {err}");
        assert!(!dir.path().join("RAN").exists(), "{what}: the script ran");
        assert!(!work.exists(), "{what}: the work directory was created");
    }
}

/// `image` does not apply to the local compute target, so a local run needs none; the
/// cluster's plan of the same file says it is missing.
#[test]
fn a_local_run_needs_no_image_but_the_cluster_s_plan_does() {
    let dir = tempfile::tempdir().unwrap();
    let (exp, datastores) = checked_experiment(dir.path(), |text| {
        text.replace("  image: python:3.12-slim\n", "")
    });
    let out = run(&[
        exp.to_str().unwrap(),
        "--datastores",
        datastores.to_str().unwrap(),
    ]);
    assert_exit(&out, 0);
    assert!(dir.path().join("RAN").exists());
    assert!(!stderr(&out).contains("image"), "{}", stderr(&out));

    // The same Experiment for the cluster (its reference on the fake Blob endpoint, as a local
    // folder cannot serve the cluster).
    let cluster = dir.path().join("cluster.yaml");
    let text = std::fs::read_to_string(&exp).unwrap();
    std::fs::write(
        &cluster,
        text.replace("computeTarget: local", "computeTarget: cluster")
            .replace("workspace-ds", "fake"),
    )
    .unwrap();
    let out = datastore(&[
        "plan",
        cluster.to_str().unwrap(),
        "--datastores",
        datastores.to_str().unwrap(),
    ]);
    assert_exit(&out, 3);
    let err = stderr(&out);
    assert!(err.contains("image is not set"), "{err}");
    assert!(err.contains("image: python:3.12-slim"), "{err}");
}
