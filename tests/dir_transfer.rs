//! Directory-to-directory transfers: the path of Azure Files datastores in the cluster, where the
//! agent container mounts the share (file.csi.azure.com) and its datastores file names it as a
//! `local` datastore at the mount point. The same guarantees as blob transfers: byte-exact
//! content, atomic writes (a replaced file is swapped in whole, never written in place),
//! overwrite semantics, progress, and a read-only datastore that nothing is written to.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use sha2::Digest;

/// A scratch directory with a datastores file naming `share` (read-write, in `<dir>/share`) and
/// `frozen` (spec.readOnly, in `<dir>/frozen`), as the controller renders a mounted share.
struct Shares {
    dir: tempfile::TempDir,
}

impl Shares {
    fn new() -> Shares {
        let dir = tempfile::tempdir().unwrap();
        for share in ["share", "frozen"] {
            std::fs::create_dir_all(dir.path().join(share)).unwrap();
        }
        let file = "apiVersion: datastore.dev/v1alpha1
kind: Datastore
metadata: {name: share}
spec:
  local: {path: share}
---
apiVersion: datastore.dev/v1alpha1
kind: Datastore
metadata: {name: frozen}
spec:
  readOnly: true
  local: {path: frozen}
";
        std::fs::write(dir.path().join("datastores.yaml"), file).unwrap();
        Shares { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `datastore agent <command> --datastores <file> <args>`.
    fn agent(&self, command: &str, args: &[&str]) -> Output {
        let datastores = self.path("datastores.yaml");
        let mut all = vec!["agent", command, "--datastores", s(&datastores)];
        all.extend(args);
        datastore(&all)
    }

    fn upload(&self, datastore: &str, src: &Path, path: &str, overwrite: bool) -> Output {
        let mut args = vec![
            "--datastore",
            datastore,
            "--src-dir",
            s(src),
            "--path",
            path,
        ];
        if overwrite {
            args.push("--overwrite");
        }
        self.agent("upload", &args)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every path below `root` (files and directories), relative, sorted.
fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().display().to_string());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

fn tree() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("iris.csv", bytes(4096, 1)),
        ("images/cat.png", bytes(3 * 1024 * 1024 + 17, 2)),
        ("images/deep/dog.png", bytes(0, 3)),
    ]
}

#[test]
fn download_from_a_share_is_byte_exact_and_reports_what_it_saw() {
    let shares = Shares::new();
    write_tree(&shares.path("share/data"), &tree());
    write_tree(
        &shares.path("share/data2"),
        &[("sibling.txt", b"no".to_vec())],
    );
    let target = shares.path("mnt/data");
    let report = shares.path("report.json");
    let o = shares.agent(
        "download",
        &[
            "--datastore",
            "share",
            "--path",
            "data",
            "--target",
            s(&target),
            "--report",
            s(&report),
        ],
    );
    assert_exit(&o, 0);
    assert_eq!(read_tree(&target), read_tree(&shares.path("share/data")));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let tree = tree();
    let bytes: usize = tree.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(report["files"], 3, "{report}");
    assert_eq!(report["bytes"], bytes, "{report}");
    // A share stores no Content-MD5, so its record holds names and sizes with an empty MD5
    // field (the digest's definition), computed here independently.
    let mut lines: Vec<String> = tree
        .iter()
        .map(|(name, data)| format!("{name}\t{}\t\n", data.len()))
        .collect();
    lines.sort();
    let hash = sha2::Sha256::digest(lines.concat());
    let digest = format!(
        "sha256:{}",
        hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    assert_eq!(report["digest"], digest, "{report}");
}

#[test]
fn upload_to_a_share_keeps_existing_files_unless_asked_and_replaces_them_whole() {
    let shares = Shares::new();
    let outputs = shares.path("outputs");
    write_tree(&outputs, &tree());
    let o = shares.upload("share", &outputs, "runs/1", false);
    assert_exit(&o, 0);
    assert_eq!(summary(&o)["transferred"], 3);
    assert_eq!(read_tree(&shares.path("share/runs/1")), read_tree(&outputs));

    // A second run writes new content: without --overwrite the share keeps the first run's.
    write_tree(&outputs, &[("iris.csv", b"second run".to_vec())]);
    let kept = shares.path("share/runs/1/iris.csv");
    let first = std::fs::read(&kept).unwrap();
    let o = shares.upload("share", &outputs, "runs/1", false);
    assert_exit(&o, 0);
    assert_eq!(summary(&o)["skipped"], 3);
    assert_eq!(std::fs::read(&kept).unwrap(), first);

    // With --overwrite the file is replaced by a rename: a reader holding the old file (a hard
    // link stands in for an open handle) still sees the old content whole, and no temporary
    // file is left beside it.
    let reader = shares.path("old-iris.csv");
    std::fs::hard_link(&kept, &reader).unwrap();
    let before = std::fs::metadata(&kept).unwrap().ino();
    let o = shares.upload("share", &outputs, "runs/1", true);
    assert_exit(&o, 0);
    assert_eq!(summary(&o)["transferred"], 3);
    assert_eq!(std::fs::read(&kept).unwrap(), b"second run");
    assert_eq!(std::fs::read(&reader).unwrap(), first);
    assert_ne!(std::fs::metadata(&kept).unwrap().ino(), before);
    assert_eq!(
        walk(&shares.path("share")),
        [
            "runs",
            "runs/1",
            "runs/1/images",
            "runs/1/images/cat.png",
            "runs/1/images/deep",
            "runs/1/images/deep/dog.png",
            "runs/1/iris.csv",
        ]
    );
}

#[test]
fn a_read_only_datastore_refuses_uploads_before_writing_anything() {
    let shares = Shares::new();
    let outputs = shares.path("outputs");
    write_tree(&outputs, &tree());
    for overwrite in [false, true] {
        let o = shares.upload("frozen", &outputs, "runs/1", overwrite);
        assert_exit(&o, 3);
        // The agent reports its error in its JSON summary (and its termination message).
        let error = &summary(&o)["error"];
        assert_eq!(error["reason"], "InvalidConfig");
        assert!(
            error["message"].as_str().unwrap().starts_with(
                "the datastore is read-only (its spec.readOnly is true), so nothing was uploaded"
            ),
            "{error}"
        );
        assert!(walk(&shares.path("frozen")).is_empty());
    }
    // Reading it is what it is for.
    write_tree(&shares.path("frozen/data"), &[("a.txt", b"a".to_vec())]);
    let target = shares.path("mnt/data");
    let o = shares.agent(
        "download",
        &[
            "--datastore",
            "frozen",
            "--path",
            "data",
            "--target",
            s(&target),
        ],
    );
    assert_exit(&o, 0);
    assert_eq!(std::fs::read(target.join("a.txt")).unwrap(), b"a");
}

#[test]
fn the_cli_reports_progress_of_a_directory_upload() {
    let shares = Shares::new();
    let src = shares.path("src");
    write_tree(
        &src,
        &[
            ("a.txt", b"a".to_vec()),
            ("b/c.txt", bytes(2 * 1024 * 1024, 1)),
        ],
    );
    let datastores = shares.path("datastores.yaml");
    let o = datastore(&[
        "upload",
        "--datastores",
        s(&datastores),
        "--datastore",
        "share",
        "--src-dir",
        s(&src),
        "--target-path",
        "in",
        "--progress",
    ]);
    assert_exit(&o, 0);
    let err = stderr(&o);
    assert!(
        err.lines()
            .last()
            .unwrap_or("")
            .starts_with("progress: 2.00 MiB of 2.00 MiB, 2 of 2 files,"),
        "{err}"
    );
    assert!(
        stdout(&o)
            .trim()
            .starts_with("2 transferred, 0 skipped, 2.00 MiB in "),
        "{}",
        stdout(&o)
    );
    assert_eq!(read_tree(&shares.path("share/in")), read_tree(&src));
}
