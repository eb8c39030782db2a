use std::path::PathBuf;

use super::*;
use crate::api::Experiment;
use crate::store::{AzureBlobConfig, AzureCredential, StoreConfig, fixtures};

fn blob_config(container: &str) -> AzureBlobConfig {
    fixtures::blob(
        container,
        "https://mlstorage.blob.core.windows.net",
        AzureCredential::Anonymous,
    )
}

fn blob(container: &str) -> Capabilities {
    StoreConfig::AzureBlob(blob_config(container)).capabilities()
}

fn datastores() -> BTreeMap<String, Capabilities> {
    BTreeMap::from([
        ("workspace-ds".to_string(), blob("data")),
        ("other-ds".to_string(), blob("other")),
        (
            "local-ds".to_string(),
            StoreConfig::Local {
                path: PathBuf::from("/srv/ds"),
                read_only: false,
            }
            .capabilities(),
        ),
    ])
}

/// The issue's example, as committed in `examples/experiment.yaml`.
fn example() -> ExperimentSpec {
    let exp: Experiment = serde_saphyr::from_str(include_str!("../../examples/experiment.yaml"))
        .expect("examples/experiment.yaml is an Experiment");
    exp.spec
}

fn spec(yaml: &str) -> ExperimentSpec {
    serde_saphyr::from_str(yaml).expect("a valid ExperimentSpec")
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The local runner's roots, with data under `root` (its code root is unused here).
fn local(root: &str) -> Roots<'_> {
    Roots {
        data: root,
        code: "/work/code",
    }
}

fn plan_err(spec: &ExperimentSpec) -> PlanError {
    plan(spec, &datastores(), CLUSTER).expect_err("the spec cannot be planned")
}

#[test]
fn the_example_is_planned_as_the_issue_describes() {
    let plan = plan(&example(), &datastores(), CLUSTER).unwrap();
    assert_eq!(plan.command, strings(&["python", "training_script.py"]));
    assert_eq!(
        plan.args,
        strings(&[
            "--data_folder",
            "/mnt/datastore/training_data",
            "--output_dir",
            "/mnt/datastore/outputs",
            "--regularization",
            "0.1",
        ])
    );
    assert_eq!(plan.working_dir.as_deref(), Some("experiment_folder"));
    assert_eq!(
        plan.env,
        vec![
            EnvVar {
                name: "AZUREML_DATAREFERENCE_DATA_FOLDER".into(),
                value: "/mnt/datastore/training_data".into(),
            },
            EnvVar {
                name: "AZUREML_DATAREFERENCE_OUTPUT_DIR".into(),
                value: "/mnt/datastore/outputs".into(),
            },
        ]
    );
    assert_eq!(
        plan.references,
        vec![
            PlannedReference {
                param: "--data_folder".into(),
                datastore: "workspace-ds".into(),
                path: "data/files".into(),
                mode: Mode::Download,
                path_on_compute: "/mnt/datastore/training_data".into(),
                env: "AZUREML_DATAREFERENCE_DATA_FOLDER".into(),
            },
            PlannedReference {
                param: "--output_dir".into(),
                datastore: "workspace-ds".into(),
                path: "outputs/run1".into(),
                mode: Mode::Upload,
                path_on_compute: "/mnt/datastore/outputs".into(),
                env: "AZUREML_DATAREFERENCE_OUTPUT_DIR".into(),
            },
        ]
    );
    assert_eq!(
        plan.downloads,
        vec![Transfer {
            param: "--data_folder".into(),
            datastore: "workspace-ds".into(),
            remote_path: "data/files".into(),
            local_path: "/mnt/datastore/training_data".into(),
            overwrite: false,
            cache: None,
        }]
    );
    assert_eq!(
        plan.uploads,
        vec![Transfer {
            param: "--output_dir".into(),
            datastore: "workspace-ds".into(),
            remote_path: "outputs/run1".into(),
            local_path: "/mnt/datastore/outputs".into(),
            overwrite: false,
            cache: None,
        }]
    );
    // Download and upload on one datastore: the union, and nothing more (no delete, no add).
    assert_eq!(plan.permissions.len(), 1);
    assert_eq!(
        plan.permissions["workspace-ds"],
        Access::READ.union(Access::UPLOAD)
    );
}

#[test]
fn command_replaces_python_and_the_entry_script() {
    let mut spec = example();
    spec.command = Some(strings(&["torchrun", "--nproc_per_node=2", "train.py"]));
    let plan = plan(&spec, &datastores(), CLUSTER).unwrap();
    assert_eq!(
        plan.command,
        strings(&["torchrun", "--nproc_per_node=2", "train.py"])
    );
    assert_eq!(
        plan.args[..2],
        strings(&["--data_folder", "/mnt/datastore/training_data"])
    );
}

#[test]
fn values_only_give_args_and_nothing_else() {
    let spec = spec(
        "image: python:3.12-slim
entryScript: train.py
scriptParams:
  - {name: --lr, value: '0.1'}
  - {name: --tag, value: ''}
  - {name: epochs, value: '3'}
",
    );
    let plan = plan(&spec, &BTreeMap::new(), CLUSTER).unwrap();
    assert_eq!(plan.command, strings(&["python", "train.py"]));
    assert_eq!(
        plan.args,
        strings(&["--lr", "0.1", "--tag", "", "epochs", "3"])
    );
    assert_eq!(plan.working_dir, None);
    assert!(plan.env.is_empty() && plan.references.is_empty());
    assert!(plan.downloads.is_empty() && plan.uploads.is_empty());
    assert!(plan.permissions.is_empty());
}

#[test]
fn path_on_compute_defaults_to_the_parameter_name_without_dashes() {
    let spec = spec(
        "image: python:3.12-slim
entryScript: train.py
scriptParams:
  - {name: --data_folder, dataReference: {datastore: workspace-ds, mode: download}}
  - {name: -x, dataReference: {datastore: workspace-ds, mode: download}}
  - {name: models/base, dataReference: {datastore: workspace-ds, mode: download}}
",
    );
    let plan = plan(&spec, &datastores(), CLUSTER).unwrap();
    let paths: Vec<&str> = plan
        .references
        .iter()
        .map(|r| r.path_on_compute.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            "/mnt/datastore/data_folder",
            "/mnt/datastore/x",
            "/mnt/datastore/models/base",
        ]
    );
    let envs: Vec<&str> = plan.env.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        envs,
        [
            "AZUREML_DATAREFERENCE_DATA_FOLDER",
            "AZUREML_DATAREFERENCE_X",
            "AZUREML_DATAREFERENCE_MODELS_BASE",
        ]
    );
}

#[test]
fn env_names_uppercase_and_replace_non_alphanumerics() {
    assert_eq!(
        env_name("--data-folder.v2"),
        "AZUREML_DATAREFERENCE_DATA_FOLDER_V2"
    );
    assert_eq!(env_name("--Données"), "AZUREML_DATAREFERENCE_DONN_ES");
    assert_eq!(env_name("in-put"), "AZUREML_DATAREFERENCE_IN_PUT");
}

#[test]
fn datastore_paths_are_normalized_and_empty_is_the_container() {
    let spec = spec(
        "image: python:3.12-slim
entryScript: train.py
scriptParams:
  - {name: --a, dataReference: {datastore: workspace-ds, path: /data//files/, mode: download}}
  - {name: --b, dataReference: {datastore: other-ds, mode: download}}
",
    );
    let plan = plan(&spec, &datastores(), CLUSTER).unwrap();
    let remote: Vec<(&str, &str)> = plan
        .downloads
        .iter()
        .map(|t| (t.datastore.as_str(), t.remote_path.as_str()))
        .collect();
    assert_eq!(remote, [("workspace-ds", "data/files"), ("other-ds", "")]);
    assert_eq!(plan.references[0].path, "data/files");
    // Each datastore gets its own permissions.
    assert_eq!(
        plan.permissions,
        BTreeMap::from([
            ("workspace-ds".to_string(), Access::READ),
            ("other-ds".to_string(), Access::READ),
        ])
    );
}

#[test]
fn the_root_is_the_local_runner_s_work_directory_when_given() {
    let mut spec = example();
    spec.compute_target = ComputeTarget::Local;
    for root in ["/tmp/run-1", "/tmp/run-1/"] {
        let plan = plan(&spec, &datastores(), local(root)).unwrap();
        assert_eq!(
            plan.args[..4],
            strings(&[
                "--data_folder",
                "/tmp/run-1/training_data",
                "--output_dir",
                "/tmp/run-1/outputs"
            ]),
            "root {root:?}"
        );
        assert_eq!(plan.uploads[0].local_path, "/tmp/run-1/outputs");
    }
}

#[test]
fn a_local_datastore_serves_the_local_compute_target() {
    let spec = spec(
        "image: python:3.12-slim
entryScript: train.py
computeTarget: local
scriptParams:
  - {name: --data, dataReference: {datastore: local-ds, path: data, mode: download}}
",
    );
    let plan = plan(&spec, &datastores(), local("/work")).unwrap();
    assert_eq!(plan.downloads[0].local_path, "/work/data");
    assert_eq!(plan.permissions["local-ds"], Access::READ);
}

#[test]
fn mount_is_read_only_and_transfers_nothing() {
    let spec = spec(
        "image: python:3.12-slim
entryScript: train.py
scriptParams:
  - {name: --data, dataReference: {datastore: workspace-ds, path: big, mode: mount, pathOnCompute: big}}
  - {name: --out, dataReference: {datastore: other-ds, path: out, mode: upload}}
",
    );
    let plan = plan(&spec, &datastores(), CLUSTER).unwrap();
    assert_eq!(plan.references[0].mode, Mode::Mount);
    assert_eq!(plan.references[0].path_on_compute, "/mnt/datastore/big");
    assert_eq!(
        plan.args,
        strings(&[
            "--data",
            "/mnt/datastore/big",
            "--out",
            "/mnt/datastore/out"
        ])
    );
    assert!(plan.downloads.is_empty());
    assert_eq!(plan.uploads.len(), 1);
    assert_eq!(
        plan.mounts,
        vec![Mount {
            param: "--data".into(),
            datastore: "workspace-ds".into(),
            remote_path: "big".into(),
            local_path: "/mnt/datastore/big".into(),
            read_only: true,
            driver: None,
        }]
    );
    assert_eq!(plan.mounts[0].permissions(), Access::READ);
    // The agent containers' credentials cover the transfers only: the mount has its own.
    assert_eq!(
        plan.permissions,
        BTreeMap::from([("other-ds".to_string(), Access::UPLOAD)])
    );
}

fn share(read_only: bool) -> Capabilities {
    StoreConfig::AzureFile(fixtures::share(fixtures::key(), read_only)).capabilities()
}

fn read_only_blob() -> Capabilities {
    StoreConfig::AzureBlob(AzureBlobConfig {
        read_only: true,
        ..blob_config("frozen")
    })
    .capabilities()
}

#[test]
fn a_read_write_mount_asks_for_a_driver_and_gets_write_permissions() {
    let spec = spec(
        "image: python:3.12-slim
entryScript: train.py
scriptParams:
  - {name: --scratch, dataReference: {datastore: workspace-ds, path: scratch/, mode: mount, readOnly: false, mountDriver: sidecar}}
",
    );
    let plan = plan(&spec, &datastores(), CLUSTER).unwrap();
    let mount = &plan.mounts[0];
    assert_eq!(
        (mount.read_only, mount.driver, mount.remote_path.as_str()),
        (false, Some(MountDriver::Sidecar), "scratch")
    );
    assert_eq!(mount.permissions(), Access::READ_WRITE);
    assert_eq!(plan.args, strings(&["--scratch", "/mnt/datastore/scratch"]));
    assert!(plan.permissions.is_empty());
}

#[test]
fn mount_options_on_other_modes_are_refused() {
    for (extra, option) in [
        ("readOnly: true", "readOnly"),
        ("mountDriver: csi", "mountDriver"),
    ] {
        let spec = spec(&format!(
            "image: python:3.12-slim
entryScript: train.py
scriptParams:
  - {{name: --data, dataReference: {{datastore: workspace-ds, mode: download, {extra}}}}}
"
        ));
        let err = plan(&spec, &datastores(), CLUSTER).unwrap_err();
        assert_eq!(
            err,
            PlanError::MountOptionNotMount {
                param: "--data".into(),
                option
            }
        );
        assert!(err.to_string().contains("applies to mount references only"));
    }
}

#[test]
fn a_read_only_datastore_refuses_uploads_and_read_write_mounts_but_not_reads() {
    let mut stores = datastores();
    stores.insert("frozen-ds".into(), read_only_blob());
    let with = |reference: &str| {
        spec(&format!(
            "image: python:3.12-slim
entryScript: train.py
scriptParams:
  - {{name: --data, dataReference: {{datastore: frozen-ds, {reference}}}}}
"
        ))
    };
    for ok in [
        "mode: download",
        "mode: mount",
        "mode: mount, readOnly: true",
    ] {
        plan(&with(ok), &stores, CLUSTER).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    let err = plan(&with("mode: upload"), &stores, CLUSTER).unwrap_err();
    assert_eq!(err.reason(), "WriteToReadOnlyDatastore");
    assert!(
        err.to_string()
            .contains("(an upload reference), which is read-only"),
        "{err}"
    );
    let err = plan(&with("mode: mount, readOnly: false"), &stores, CLUSTER).unwrap_err();
    assert!(
        err.to_string()
            .contains("(a read-write mount), which is read-only (spec.readOnly); use another datastore, or mount it read-only"),
        "{err}"
    );
}

#[test]
fn an_azure_files_share_is_for_the_cluster_and_csi_only() {
    let mut stores = datastores();
    stores.insert("share-ds".into(), share(false));
    let with = |target: &str, reference: &str| {
        spec(&format!(
            "image: python:3.12-slim
entryScript: train.py
computeTarget: {target}
scriptParams:
  - {{name: --data, dataReference: {{datastore: share-ds, path: images, {reference}}}}}
"
        ))
    };
    let plan_of = |s: &ExperimentSpec| plan(s, &stores, CLUSTER);
    // Downloads and uploads go through the agent; mounts through file.csi.azure.com.
    assert_eq!(
        plan_of(&with("cluster", "mode: download"))
            .unwrap()
            .downloads
            .len(),
        1
    );
    assert_eq!(
        plan_of(&with("cluster", "mode: upload"))
            .unwrap()
            .uploads
            .len(),
        1
    );
    let mounted = plan_of(&with("cluster", "mode: mount, mountDriver: csi")).unwrap();
    assert_eq!(mounted.mounts[0].driver, Some(MountDriver::Csi));

    let err = plan_of(&with("cluster", "mode: mount, mountDriver: sidecar")).unwrap_err();
    assert_eq!(err.reason(), "SidecarOnAzureFile");
    assert!(err.to_string().contains("use mountDriver csi"), "{err}");

    let err = plan(&with("local", "mode: download"), &stores, local("/work")).unwrap_err();
    assert_eq!(
        err,
        PlanError::AzureFileOnLocalCompute {
            user: "parameter --data".into(),
            datastore: "share-ds".into()
        }
    );
    assert!(
        err.to_string().contains("use computeTarget cluster"),
        "{err}"
    );
}

// --- errors ---

#[test]
fn an_unknown_datastore_lists_the_known_ones() {
    let mut spec = example();
    spec.script_params[0]
        .data_reference
        .as_mut()
        .unwrap()
        .datastore = "workspace-dz".into();
    let err = plan_err(&spec);
    assert_eq!(
        err,
        PlanError::UnknownDatastore {
            user: "parameter --data_folder".into(),
            datastore: "workspace-dz".into(),
            known: strings(&["local-ds", "other-ds", "workspace-ds"]),
        }
    );
    assert_eq!(
        err.to_string(),
        "parameter --data_folder refers to datastore \"workspace-dz\", which does not exist; create it, or use one of the known datastores: local-ds, other-ds, workspace-ds"
    );
    assert_eq!(err.reason(), "UnknownDatastore");

    let none = plan(&example(), &BTreeMap::new(), CLUSTER).unwrap_err();
    assert_eq!(
        none.to_string(),
        "parameter --data_folder refers to datastore \"workspace-ds\", which does not exist; no datastores are known, so create a Datastore or ClusterDatastore named workspace-ds"
    );
}

#[test]
fn mount_on_the_local_compute_target_is_refused_with_the_sdk_reason() {
    let mut spec = example();
    spec.compute_target = ComputeTarget::Local;
    spec.script_params[0].data_reference.as_mut().unwrap().mode = Mode::Mount;
    let err = plan(&spec, &datastores(), local("/work")).unwrap_err();
    assert_eq!(
        err,
        PlanError::MountOnLocalCompute {
            param: "--data_folder".into()
        }
    );
    assert!(
        err.to_string()
            .contains("mount is only available on a remote compute target"),
        "{err}"
    );
}

#[test]
fn a_local_datastore_is_refused_on_the_cluster() {
    let mut spec = example();
    spec.script_params[0]
        .data_reference
        .as_mut()
        .unwrap()
        .datastore = "local-ds".into();
    assert_eq!(
        plan_err(&spec),
        PlanError::LocalDatastoreOnCluster {
            user: "parameter --data_folder".into(),
            datastore: "local-ds".into(),
        }
    );
}

fn with_paths_on_compute(first: Option<&str>, second: Option<&str>) -> ExperimentSpec {
    let mut spec = example();
    spec.script_params[0]
        .data_reference
        .as_mut()
        .unwrap()
        .path_on_compute = first.map(String::from);
    spec.script_params[1]
        .data_reference
        .as_mut()
        .unwrap()
        .path_on_compute = second.map(String::from);
    spec
}

#[test]
fn references_on_the_same_path_on_compute_are_refused() {
    let err = plan_err(&with_paths_on_compute(Some("data"), Some("data")));
    assert_eq!(
        err,
        PlanError::PathOnComputeClash {
            first: "--data_folder".into(),
            first_path: "/mnt/datastore/data".into(),
            second: "--output_dir".into(),
            second_path: "/mnt/datastore/data".into(),
        }
    );
    assert_eq!(
        err.to_string(),
        "parameters --data_folder and --output_dir overlap on compute (/mnt/datastore/data and /mnt/datastore/data): one path is the other or inside it; give each a pathOnCompute of its own"
    );
}

#[test]
fn nested_paths_on_compute_are_refused_either_way_round() {
    for (first, second) in [("data", "data/out"), ("data/out", "data")] {
        let err = plan_err(&with_paths_on_compute(Some(first), Some(second)));
        assert_eq!(
            err,
            PlanError::PathOnComputeClash {
                first: "--data_folder".into(),
                first_path: format!("/mnt/datastore/{first}"),
                second: "--output_dir".into(),
                second_path: format!("/mnt/datastore/{second}"),
            }
        );
    }
    // A shared name prefix is not nesting.
    assert!(
        plan(
            &with_paths_on_compute(Some("data"), Some("data2")),
            &datastores(),
            CLUSTER
        )
        .is_ok()
    );
    // A default path meets an explicit one.
    assert_eq!(
        plan_err(&with_paths_on_compute(Some("output_dir/in"), None)).reason(),
        "PathOnComputeClash"
    );
}

#[test]
fn invalid_paths_on_compute_are_refused_with_the_problem() {
    for (path, problem) in [
        ("/mnt/data", "is absolute"),
        ("", "is empty"),
        ("..", "has a . or .. segment"),
        ("a/../../etc", "has a . or .. segment"),
        ("./a", "has a . or .. segment"),
        ("a//b", "has an empty segment (a doubled or trailing /)"),
        ("a/", "has an empty segment (a doubled or trailing /)"),
    ] {
        let err = plan_err(&with_paths_on_compute(Some(path), None));
        assert_eq!(
            err,
            PlanError::InvalidPathOnCompute {
                param: "--data_folder".into(),
                path: path.into(),
                problem,
            },
            "{path:?}"
        );
    }
    let err = plan_err(&with_paths_on_compute(Some("/mnt/data"), None));
    assert_eq!(
        err.to_string(),
        "parameter --data_folder: path on compute \"/mnt/data\" is absolute; set pathOnCompute to a relative path such as training_data"
    );
    // A name that is all dashes leaves no default path.
    let spec = spec(
        "image: i
entryScript: t.py
scriptParams: [{name: '--', dataReference: {datastore: workspace-ds, mode: download}}]
",
    );
    assert_eq!(
        plan_err(&spec),
        PlanError::InvalidPathOnCompute {
            param: "--".into(),
            path: "".into(),
            problem: "is empty",
        }
    );
}

#[test]
fn duplicate_parameter_names_are_refused() {
    let mut spec = example();
    spec.script_params[2].name = "--data_folder".into();
    let err = plan_err(&spec);
    assert_eq!(
        err,
        PlanError::DuplicateParameter {
            name: "--data_folder".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "parameter --data_folder is given more than once; scriptParams names must be unique, so keep one"
    );
}

#[test]
fn a_parameter_needs_exactly_one_of_value_and_data_reference() {
    let mut both = example();
    both.script_params[0].value = Some("x".into());
    assert_eq!(
        plan_err(&both),
        PlanError::ValueAndDataReference {
            name: "--data_folder".into()
        }
    );
    let mut neither = example();
    neither.script_params[2].value = None;
    let err = plan_err(&neither);
    assert_eq!(
        err,
        PlanError::NoValueOrDataReference {
            name: "--regularization".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "parameter --regularization has neither a value nor a dataReference; set one of them"
    );
}

#[test]
fn empty_names_commands_and_scripts_are_refused() {
    let mut spec = example();
    spec.script_params[2].name = String::new();
    assert_eq!(plan_err(&spec), PlanError::EmptyParameterName);

    let mut spec = example();
    spec.command = Some(Vec::new());
    assert_eq!(plan_err(&spec), PlanError::EmptyCommand);

    let mut spec = example();
    spec.entry_script = String::new();
    assert_eq!(plan_err(&spec), PlanError::EmptyEntryScript);
    // As in the CRD's rule, also when a command replaces it.
    spec.command = Some(strings(&["python", "-m", "trainer"]));
    assert_eq!(plan_err(&spec), PlanError::EmptyEntryScript);
}

#[test]
fn references_sharing_an_environment_variable_are_refused() {
    let spec = spec(
        "image: i
entryScript: t.py
scriptParams:
  - {name: --data-folder, dataReference: {datastore: workspace-ds, mode: download}}
  - {name: --data_folder, dataReference: {datastore: workspace-ds, mode: download}}
",
    );
    let err = plan_err(&spec);
    assert_eq!(
        err,
        PlanError::EnvVarClash {
            first: "--data-folder".into(),
            second: "--data_folder".into(),
            env: "AZUREML_DATAREFERENCE_DATA_FOLDER".into(),
        }
    );
    assert_eq!(
        err.to_string(),
        "parameters --data-folder and --data_folder would both set the environment variable AZUREML_DATAREFERENCE_DATA_FOLDER; rename one of them"
    );
}

#[test]
fn overwrite_is_carried_to_the_upload_and_refused_elsewhere() {
    let mut spec = example();
    spec.script_params[1]
        .data_reference
        .as_mut()
        .unwrap()
        .overwrite = true;
    let planned = plan(&spec, &datastores(), CLUSTER).unwrap();
    assert!(planned.uploads[0].overwrite);
    assert!(!planned.downloads[0].overwrite);

    let mut spec = example();
    spec.script_params[0]
        .data_reference
        .as_mut()
        .unwrap()
        .overwrite = true;
    let err = plan(&spec, &datastores(), CLUSTER).unwrap_err();
    assert_eq!(
        err,
        PlanError::OverwriteNotUpload {
            param: "--data_folder".into()
        }
    );
    assert_eq!(err.reason(), "OverwriteNotUpload");
}

#[test]
fn user_env_may_not_shadow_a_reference_variable() {
    let mut spec = example();
    spec.env.push(k8s_openapi::api::core::v1::EnvVar {
        name: "AZUREML_DATAREFERENCE_DATA_FOLDER".into(),
        value: Some("/elsewhere".into()),
        value_from: None,
    });
    let err = plan(&spec, &datastores(), CLUSTER).unwrap_err();
    assert_eq!(
        err,
        PlanError::EnvShadowsReference {
            name: "AZUREML_DATAREFERENCE_DATA_FOLDER".into(),
            param: "--data_folder".into()
        }
    );
}

#[test]
fn code_from_a_datastore_is_downloaded_first_and_becomes_the_working_directory() {
    let mut spec = example();
    spec.code = Some(CodeReference {
        datastore: "other-ds".into(),
        path: "/snapshots/sha256-ab/".into(),
    });
    spec.source_directory = None;
    let planned = plan(&spec, &datastores(), CLUSTER).unwrap();
    assert_eq!(
        planned.code,
        Some(Transfer {
            param: "code".into(),
            datastore: "other-ds".into(),
            remote_path: "snapshots/sha256-ab".into(),
            overwrite: false,
            local_path: "/mnt/code".into(),
            cache: Some(false),
        })
    );
    assert_eq!(planned.working_dir.as_deref(), Some("/mnt/code"));
    // Read access is added to what the references need, and nothing more.
    assert_eq!(planned.permissions["other-ds"], Access::READ);
    assert_eq!(
        planned.permissions["workspace-ds"],
        Access::READ.union(Access::UPLOAD)
    );
    // The data references do not move.
    assert_eq!(
        planned.downloads[0].local_path,
        "/mnt/datastore/training_data"
    );

    // A relative sourceDirectory is a folder inside the code; an absolute one is outside it.
    spec.source_directory = Some("src/".into());
    let planned = plan(&spec, &datastores(), CLUSTER).unwrap();
    assert_eq!(planned.working_dir.as_deref(), Some("/mnt/code/src"));
    spec.source_directory = Some("/app".into());
    assert_eq!(
        plan_err(&spec),
        PlanError::SourceDirectoryOutsideCode {
            path: "/app".into(),
            problem: "is absolute",
        }
    );
    // `..` leaves the downloaded code as surely.
    spec.source_directory = Some("src/../..".into());
    assert_eq!(
        plan_err(&spec),
        PlanError::SourceDirectoryOutsideCode {
            path: "src/../..".into(),
            problem: "has a `..` segment",
        }
    );
    spec.source_directory = None;
    spec.code.as_mut().unwrap().path = "snapshots/../other".into();
    assert!(
        matches!(plan_err(&spec), PlanError::InvalidDatastorePath { ref user, .. } if user == "code"),
        "{}",
        plan_err(&spec)
    );
}

/// What the spec alone decides is refused on both compute targets, before any datastore is
/// looked at: it is what `datastore run` checks before the first byte moves, and what `submit`
/// checks before it uploads a snapshot.
#[test]
fn an_entry_script_outside_the_source_directory_is_refused_everywhere() {
    for (entry, problem) in [
        ("../outside.py", "has a `..` segment"),
        ("src/../../outside.py", "has a `..` segment"),
        ("..\\outside.py", "has a `..` segment"),
        ("/etc/outside.py", "is absolute"),
    ] {
        let mut spec = example();
        spec.entry_script = entry.into();
        let expected = PlanError::EntryScriptOutsideSource {
            path: entry.into(),
            problem,
        };
        assert_eq!(check_spec(&spec), Err(expected.clone()));
        assert_eq!(plan_err(&spec), expected);
        spec.compute_target = ComputeTarget::Local;
        assert_eq!(plan(&spec, &datastores(), local("/w")), Err(expected));
    }
    let mut spec = example();
    spec.entry_script = "./src/train.py".into();
    plan(&spec, &datastores(), CLUSTER).unwrap();
}

#[test]
fn image_is_required_on_the_cluster_only() {
    let mut spec = example();
    spec.image = None;
    assert_eq!(plan_err(&spec), PlanError::MissingImage);
    spec.image = Some(String::new());
    assert_eq!(plan_err(&spec), PlanError::MissingImage);
    assert!(
        PlanError::MissingImage
            .to_string()
            .contains("image: python:3.12-slim")
    );
    spec.image = None;
    spec.compute_target = ComputeTarget::Local;
    plan(&spec, &datastores(), local("/w")).unwrap();
}

#[test]
fn env_a_process_cannot_hold_is_refused() {
    let var = |name: &str, value: &str| k8s_openapi::api::core::v1::EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    };
    for (name, problem) in [
        ("", "is empty"),
        ("A=B", "contains `=`"),
        ("A\nB", "contains a character that is not printable ASCII"),
    ] {
        let mut spec = example();
        spec.env = vec![var(name, "1")];
        assert_eq!(
            plan_err(&spec),
            PlanError::InvalidEnvName {
                name: name.into(),
                problem
            }
        );
    }
    let mut spec = example();
    spec.env = vec![var("A", "x\0y")];
    assert_eq!(
        plan_err(&spec),
        PlanError::InvalidEnvValue { name: "A".into() }
    );
    spec.env = vec![var("LOG_LEVEL", "debug"), var("my.var-1", "")];
    plan(&spec, &datastores(), CLUSTER).unwrap();
}

#[test]
fn a_reference_path_that_leaves_the_container_is_refused_before_anything_moves() {
    for mode in ["download", "upload"] {
        let spec = spec(&format!(
            "image: i
entryScript: train.py
scriptParams:
  - {{name: --out, dataReference: {{datastore: workspace-ds, path: 'outputs/../../other', mode: {mode}}}}}
"
        ));
        let err = plan_err(&spec);
        assert!(
            matches!(&err, PlanError::InvalidDatastorePath { user, problem }
                if user == "parameter --out" && problem.contains("`..` segment")),
            "{err}"
        );
    }
}

#[test]
fn code_on_an_unknown_or_local_datastore_is_refused_for_the_cluster() {
    let mut spec = example();
    spec.code = Some(CodeReference {
        datastore: "nowhere".into(),
        path: "snapshots/x".into(),
    });
    let err = plan_err(&spec);
    assert_eq!(err.reason(), "UnknownDatastore");
    assert!(
        err.to_string()
            .starts_with("code refers to datastore \"nowhere\""),
        "{err}"
    );

    spec.code.as_mut().unwrap().datastore = "local-ds".into();
    assert_eq!(
        plan_err(&spec),
        PlanError::LocalDatastoreOnCluster {
            user: "code".into(),
            datastore: "local-ds".into()
        }
    );
    // The local runner reaches it.
    spec.compute_target = ComputeTarget::Local;
    let planned = plan(&spec, &datastores(), local("/w/data")).unwrap();
    assert_eq!(planned.code.unwrap().local_path, "/work/code");
}

#[test]
fn a_datastore_name_that_is_not_a_kubernetes_name_is_refused_before_any_lookup() {
    let mut exp = example();
    exp.script_params[0]
        .data_reference
        .as_mut()
        .unwrap()
        .datastore = "team-b/blob-ds".into();
    let err = check_spec(&exp).expect_err("refused by the spec alone");
    assert_eq!(err.reason(), Reason::InvalidDatastoreName);
    assert_eq!(
        err.to_string(),
        format!(
            "parameter --data_folder refers to datastore \"team-b/blob-ds\", which is not a name a datastore can have: {}",
            limits::DATASTORE_NAME
        )
    );
    let mut code = spec("image: i\nentryScript: t.py\ncode: {datastore: Code_DS, path: p}\n");
    assert_eq!(plan_err(&code).reason(), Reason::InvalidDatastoreName);
    code.code.as_mut().unwrap().datastore = "workspace-ds".into();
    assert!(check_spec(&code).is_ok());
}

/// The kernel's limits, with the sentences `datastore run` and the controller both give.
#[test]
fn a_command_line_the_kernel_cannot_start_is_refused_with_the_limits() {
    // Not `plan_err`: a plan that holds a megabyte would be printed whole.
    let refused = |spec: &ExperimentSpec| match plan(spec, &datastores(), CLUSTER) {
        Ok(_) => panic!("the spec was planned"),
        Err(e) => e,
    };
    let with_value = |value: String| {
        let mut exp = example();
        exp.script_params[2].value = Some(value);
        exp
    };
    // At the limit of one value: planned.
    plan(
        &with_value("x".repeat(limits::ARG_MAX_CHARS)),
        &datastores(),
        CLUSTER,
    )
    .expect("a value at the limit runs");
    // The issue's 1 MiB value.
    let err = refused(&with_value("x".repeat(1 << 20)));
    assert_eq!(err.reason(), Reason::ArgumentTooLong);
    assert_eq!(
        err.to_string(),
        "the value of parameter --regularization holds 1048576 characters, more than the 32000 one may hold (the kernel refuses to start a program with an argument or environment variable over 128 KiB); pass large inputs as a file in a datastore (a dataReference) instead"
    );
    // Characters, not bytes: 32,000 four-byte characters still pass (128,000 bytes).
    plan(
        &with_value("😀".repeat(limits::ARG_MAX_CHARS)),
        &datastores(),
        CLUSTER,
    )
    .expect("four-byte characters at the limit run");
    // An env value counts too.
    let mut exp = example();
    exp.env = vec![k8s_openapi::api::core::v1::EnvVar {
        name: "CONFIG".into(),
        value: Some("x".repeat(limits::ARG_MAX_CHARS + 1)),
        value_from: None,
    }];
    let err = refused(&exp);
    assert_eq!(err.reason(), Reason::ArgumentTooLong);
    assert!(
        err.to_string()
            .starts_with("env CONFIG holds 32001 characters"),
        "{err}"
    );

    // Each value within its limit, the whole over 1 MiB: 40 values of 30,000 characters.
    let mut exp = example();
    exp.script_params.extend((0..40).map(|n| ScriptParam {
        name: format!("--p{n}"),
        value: Some("x".repeat(30_000)),
        data_reference: None,
    }));
    let err = refused(&exp);
    assert_eq!(err.reason(), Reason::CommandLineTooLong);
    let message = err.to_string();
    assert!(
        message.starts_with("the script's command line and environment hold 1201235 bytes, ")
            && message.contains("more than the 1048576 allowed")
            && message.ends_with(limits::COMMAND_LINE_ADVICE),
        "{message}"
    );
    // 34 of them fit (1,020,000 bytes and the rest).
    exp.script_params.truncate(3 + 34);
    plan(&exp, &datastores(), CLUSTER).expect("just under the limit runs");
}
