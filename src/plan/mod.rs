//! The planner: an Experiment and its resolved datastores in, an [`ExecutionPlan`] out. Pure: no
//! IO, no clock, no cluster. Both executors (the controller's builders and the local runner) take
//! the plan, so anything both need is decided here once.
//!
//! The planner re-checks the rules the CRD's CEL validations check, because the CLI reads
//! Experiment files no apiserver has validated.

pub mod contract;

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{
    CodeReference, ComputeTarget, DataReference, ExperimentSpec, Mode, MountDriver, ScriptParam,
    limits,
};
use crate::paths;
use crate::reason::Reason;
use crate::store::{Access, Capabilities};

/// Where an executor places data references and code on compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roots<'a> {
    /// Data references live under it: `pathOnCompute: training_data` is `<data>/training_data`.
    pub data: &'a str,
    /// The code of `spec.code` is downloaded into it.
    pub code: &'a str,
}

/// The cluster's roots: `pathOnCompute: training_data` is `/mnt/datastore/training_data` in the
/// script's container, and downloaded code is in `/mnt/code`.
pub const CLUSTER: Roots<'static> = Roots {
    data: "/mnt/datastore",
    code: "/mnt/code",
};

/// The prefix of the environment variable holding a data reference's path on compute (as the
/// Azure ML SDK names them): `--data_folder` gets `AZUREML_DATAREFERENCE_DATA_FOLDER`.
pub const ENV_PREFIX: &str = "AZUREML_DATAREFERENCE_";

/// Everything an executor needs to run an experiment, with every data reference resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutionPlan {
    /// What runs before the arguments: `[python, <entryScript>]`, or the spec's `command`.
    pub command: Vec<String>,
    /// The script parameters in order, each as `<name> <value>`; a data reference's value is its
    /// absolute path on compute: `[--data_folder, /mnt/datastore/training_data, ...]`.
    pub args: Vec<String>,
    /// The script's working directory: the spec's `sourceDirectory`, inside the code root when
    /// the code is downloaded.
    pub working_dir: Option<String>,
    /// The download of the script's code (`spec.code`) into the code root.
    pub code: Option<Transfer>,
    /// One variable per data reference, holding its absolute path on compute, in parameter order.
    pub env: Vec<EnvVar>,
    /// Every data reference, in parameter order.
    pub references: Vec<PlannedReference>,
    /// What to copy from datastores to compute before the script starts.
    pub downloads: Vec<Transfer>,
    /// What to copy from compute to datastores after the script ends.
    pub uploads: Vec<Transfer>,
    /// What to mount while the script runs.
    pub mounts: Vec<Mount>,
    /// Per datastore name, the least the agent containers' credentials must allow for the
    /// transfers (code, downloads, uploads). Mounts carry their own ([`Mount::permissions`]).
    pub permissions: BTreeMap<String, Access>,
}

/// One datastore folder mounted while the script runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The parameter whose reference this is, e.g. `--data_folder`.
    pub param: String,
    /// The datastore's name.
    pub datastore: String,
    /// The path in the datastore, normalized (`""` is the whole container or share).
    pub remote_path: String,
    /// The absolute path on compute where the folder appears.
    pub local_path: String,
    /// Whether the script may only read it.
    pub read_only: bool,
    /// The driver the reference asks for; `None` leaves the choice to the operator.
    pub driver: Option<MountDriver>,
}

impl Mount {
    /// The least its credentials must allow.
    pub fn permissions(&self) -> Access {
        if self.read_only {
            Access::READ
        } else {
            Access::READ_WRITE
        }
    }
}

/// An environment variable of the script's process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

/// A data reference resolved to a place on compute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedReference {
    /// The parameter it is the value of, e.g. `--data_folder`.
    pub param: String,
    /// The datastore's name.
    pub datastore: String,
    /// The path in the datastore, normalized (`data/files`; `""` is the whole container).
    pub path: String,
    pub mode: Mode,
    /// The absolute path on compute, e.g. `/mnt/datastore/training_data`.
    pub path_on_compute: String,
    /// The environment variable holding `path_on_compute`.
    pub env: String,
}

/// One folder to copy between a datastore and compute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// The parameter whose reference this is, e.g. `--data_folder` (`code` for the code).
    pub param: String,
    /// The datastore's name.
    pub datastore: String,
    /// The path in the datastore, normalized.
    pub remote_path: String,
    /// Uploads: replace blobs that exist.
    pub overwrite: bool,
    /// The absolute path on compute.
    pub local_path: String,
    /// Downloads: the reference's `cache` (absent: the datastore's or the operator's default).
    pub cache: Option<bool>,
}

/// Why an experiment cannot be planned: one sentence that says how to fix it. The variant name
/// ([`PlanError::reason`]) is meant as a condition and event reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("a scriptParams entry has an empty name; name it, e.g. --data_folder")]
    EmptyParameterName,
    #[error(
        "parameter {name} is given more than once; scriptParams names must be unique, so keep one"
    )]
    DuplicateParameter { name: String },
    #[error("parameter {name} has both a value and a dataReference; keep one of them")]
    ValueAndDataReference { name: String },
    #[error("parameter {name} has neither a value nor a dataReference; set one of them")]
    NoValueOrDataReference { name: String },
    #[error(
        "command is set but empty; list the program to run, or remove command to run python <entryScript>"
    )]
    EmptyCommand,
    #[error("entryScript is empty; name the script to run, e.g. training_script.py")]
    EmptyEntryScript,
    #[error(
        "entryScript {path:?} {problem}, so it names a script outside sourceDirectory; name the script by its path inside sourceDirectory, e.g. train.py or src/train.py (move sourceDirectory to hold it if need be)"
    )]
    EntryScriptOutsideSource { path: String, problem: &'static str },
    #[error(
        "image is not set, and on the cluster the script runs in a container image; name one that holds python and the script's dependencies, e.g. image: python:3.12-slim, or run it on this machine with `datastore run --local`"
    )]
    MissingImage,
    #[error("{user}: {problem}")]
    InvalidDatastorePath {
        /// `parameter --data_folder`, or `code`.
        user: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    #[error(
        "env {name:?} {problem}; an environment variable name is printable ASCII without `=`, e.g. LOG_LEVEL"
    )]
    InvalidEnvName { name: String, problem: &'static str },
    #[error(
        "env {name} has a NUL character in its value, which no process environment can hold; remove it"
    )]
    InvalidEnvValue { name: String },
    #[error("{user} refers to datastore {datastore:?}, which does not exist; {}", known_hint(.datastore, .known))]
    UnknownDatastore {
        /// `parameter --data_folder`, or `code`.
        user: String,
        datastore: String,
        known: Vec<String>,
    },
    #[error(
        "parameter {param}: mount is only available on a remote compute target; use mode download, or computeTarget cluster"
    )]
    MountOnLocalCompute { param: String },
    #[error(
        "env sets {name}, which holds the path of parameter {param}; rename the variable (the script reads the path from it)"
    )]
    EnvShadowsReference { name: String, param: String },
    #[error("parameter {param}: overwrite applies to upload references only; remove it")]
    OverwriteNotUpload { param: String },
    #[error("parameter {param}: {option} applies to mount references only; remove it")]
    MountOptionNotMount {
        param: String,
        /// `readOnly` or `mountDriver`.
        option: &'static str,
    },
    #[error(
        "{user} refers to datastore {datastore:?}, a local directory that only the CLI can reach; use computeTarget local, or a datastore in Azure Blob Storage"
    )]
    LocalDatastoreOnCluster { user: String, datastore: String },
    #[error(
        "{user} refers to datastore {datastore:?}, an Azure Files share that only the cluster can mount; use computeTarget cluster, or mount the share on this machine and use a local datastore"
    )]
    AzureFileOnLocalCompute { user: String, datastore: String },
    #[error(
        "parameter {param} would write to datastore {datastore:?} ({what}), which is read-only (spec.readOnly); use another datastore{hint}"
    )]
    WriteToReadOnlyDatastore {
        param: String,
        datastore: String,
        /// `an upload reference` or `a read-write mount`.
        what: &'static str,
        /// How else to fix it, e.g. `, or mount it with readOnly: true`.
        hint: &'static str,
    },
    #[error(
        "parameter {param}: datastore {datastore:?} is an Azure Files share, which the blobfuse2 sidecar cannot mount; use mountDriver csi (file.csi.azure.com), or remove mountDriver"
    )]
    SidecarOnAzureFile { param: String, datastore: String },
    #[error(
        "sourceDirectory {path:?} {problem}, but the code is downloaded from a datastore (code), so it must be a folder inside the code; make it relative to the code, without `..`, or remove it"
    )]
    SourceDirectoryOutsideCode { path: String, problem: &'static str },
    #[error(
        "parameter {param}: path on compute {path:?} {problem}; set pathOnCompute to a relative path such as training_data"
    )]
    InvalidPathOnCompute {
        param: String,
        path: String,
        problem: &'static str,
    },
    #[error(
        "parameters {first} and {second} overlap on compute ({first_path} and {second_path}): one path is the other or inside it; give each a pathOnCompute of its own"
    )]
    PathOnComputeClash {
        first: String,
        first_path: String,
        second: String,
        second_path: String,
    },
    #[error(
        "parameters {first} and {second} would both set the environment variable {env}; rename one of them"
    )]
    EnvVarClash {
        first: String,
        second: String,
        env: String,
    },
    #[error(
        "{user} refers to datastore {datastore:?}, which is not a name a datastore can have: {}",
        limits::DATASTORE_NAME
    )]
    InvalidDatastoreName { user: String, datastore: String },
    #[error(
        "{what} holds {chars} characters, more than the {} one may hold (the kernel refuses to start a program with an argument or environment variable over 128 KiB); {}",
        limits::ARG_MAX_CHARS,
        limits::COMMAND_LINE_ADVICE
    )]
    ArgumentTooLong {
        /// `the value of parameter --config`, `env CONFIG`, `command element 2`.
        what: String,
        chars: usize,
    },
    #[error(
        "the script's command line and environment hold {bytes} bytes, more than the {} allowed (the kernel refuses to start a program with more than 2 MiB of arguments and environment, counting 9 bytes more for each string); {}",
        limits::COMMAND_LINE_MAX_BYTES,
        limits::COMMAND_LINE_ADVICE
    )]
    CommandLineTooLong { bytes: usize },
}

impl PlanError {
    /// The variant's reason (of the same name), for conditions, events and metrics.
    pub fn reason(&self) -> Reason {
        match self {
            PlanError::EmptyParameterName => Reason::EmptyParameterName,
            PlanError::DuplicateParameter { .. } => Reason::DuplicateParameter,
            PlanError::ValueAndDataReference { .. } => Reason::ValueAndDataReference,
            PlanError::NoValueOrDataReference { .. } => Reason::NoValueOrDataReference,
            PlanError::EmptyCommand => Reason::EmptyCommand,
            PlanError::EmptyEntryScript => Reason::EmptyEntryScript,
            PlanError::EntryScriptOutsideSource { .. } => Reason::EntryScriptOutsideSource,
            PlanError::MissingImage => Reason::MissingImage,
            PlanError::InvalidDatastorePath { .. } => Reason::InvalidDatastorePath,
            PlanError::InvalidEnvName { .. } => Reason::InvalidEnvName,
            PlanError::InvalidEnvValue { .. } => Reason::InvalidEnvValue,
            PlanError::UnknownDatastore { .. } => Reason::UnknownDatastore,
            PlanError::MountOnLocalCompute { .. } => Reason::MountOnLocalCompute,
            PlanError::OverwriteNotUpload { .. } => Reason::OverwriteNotUpload,
            PlanError::MountOptionNotMount { .. } => Reason::MountOptionNotMount,
            PlanError::EnvShadowsReference { .. } => Reason::EnvShadowsReference,
            PlanError::LocalDatastoreOnCluster { .. } => Reason::LocalDatastoreOnCluster,
            PlanError::AzureFileOnLocalCompute { .. } => Reason::AzureFileOnLocalCompute,
            PlanError::WriteToReadOnlyDatastore { .. } => Reason::WriteToReadOnlyDatastore,
            PlanError::SidecarOnAzureFile { .. } => Reason::SidecarOnAzureFile,
            PlanError::SourceDirectoryOutsideCode { .. } => Reason::SourceDirectoryOutsideCode,
            PlanError::InvalidPathOnCompute { .. } => Reason::InvalidPathOnCompute,
            PlanError::PathOnComputeClash { .. } => Reason::PathOnComputeClash,
            PlanError::EnvVarClash { .. } => Reason::EnvVarClash,
            PlanError::InvalidDatastoreName { .. } => Reason::InvalidDatastoreName,
            PlanError::ArgumentTooLong { .. } => Reason::ArgumentTooLong,
            PlanError::CommandLineTooLong { .. } => Reason::CommandLineTooLong,
        }
    }
}

fn known_hint(wanted: &str, known: &[String]) -> String {
    if known.is_empty() {
        format!("no datastores are known, so create a Datastore or ClusterDatastore named {wanted}")
    } else {
        format!(
            "create it, or use one of the known datastores: {}",
            known.join(", ")
        )
    }
}

/// Plans `exp` against `datastores` (by name), placing data references and code under `roots`:
/// absolute directories on compute ([`CLUSTER`] in the cluster, a work directory for the local
/// runner).
pub fn plan(
    exp: &ExperimentSpec,
    datastores: &BTreeMap<String, Capabilities>,
    roots: Roots,
) -> Result<ExecutionPlan, PlanError> {
    let root = roots.data;
    check_spec(exp)?;
    let command = match &exp.command {
        Some(command) => command.clone(),
        None => vec!["python".to_string(), exp.entry_script.clone()],
    };

    let mut plan = ExecutionPlan {
        command,
        args: Vec::new(),
        working_dir: exp.source_directory.clone(),
        code: None,
        env: Vec::new(),
        references: Vec::new(),
        downloads: Vec::new(),
        uploads: Vec::new(),
        mounts: Vec::new(),
        permissions: BTreeMap::new(),
    };
    // Relative paths on compute, to find overlaps.
    let mut placed: Vec<(&str, Vec<&str>)> = Vec::new();

    for param in &exp.script_params {
        let reference = match (&param.value, &param.data_reference) {
            (Some(value), None) => {
                plan.args.extend([param.name.clone(), value.clone()]);
                continue;
            }
            (None, Some(reference)) => reference,
            _ => unreachable!("check_parameters refuses both and neither"),
        };
        let planned = plan_reference(exp.compute_target, &param.name, reference, datastores, root)?;

        let relative = relative_path_on_compute(&param.name, reference);
        let segments: Vec<&str> = relative.split('/').collect();
        if let Some((other, other_segments)) = placed
            .iter()
            .find(|(_, other)| is_prefix(other, &segments) || is_prefix(&segments, other))
        {
            return Err(PlanError::PathOnComputeClash {
                first: other.to_string(),
                first_path: join(root, &other_segments.join("/")),
                second: param.name.clone(),
                second_path: planned.path_on_compute.clone(),
            });
        }
        placed.push((&param.name, segments));

        if let Some(other) = plan.references.iter().find(|r| r.env == planned.env) {
            return Err(PlanError::EnvVarClash {
                first: other.param.clone(),
                second: param.name.clone(),
                env: planned.env.clone(),
            });
        }

        let transfer = Transfer {
            param: param.name.clone(),
            datastore: planned.datastore.clone(),
            remote_path: planned.path.clone(),
            local_path: planned.path_on_compute.clone(),
            overwrite: reference.overwrite,
            cache: reference.cache,
        };
        let needed = match planned.mode {
            Mode::Download => {
                plan.downloads.push(transfer);
                Some(Access::READ)
            }
            Mode::Upload => {
                plan.uploads.push(transfer);
                Some(Access::UPLOAD)
            }
            // Nothing to copy: the mount has credentials of its own.
            Mode::Mount => {
                plan.mounts.push(Mount {
                    param: transfer.param,
                    datastore: transfer.datastore,
                    remote_path: transfer.remote_path,
                    local_path: transfer.local_path,
                    read_only: reference.read_only(),
                    driver: reference.mount_driver,
                });
                None
            }
        };
        if let Some(needed) = needed {
            let granted = plan
                .permissions
                .entry(planned.datastore.clone())
                .or_default();
            *granted = granted.union(needed);
        }

        plan.args
            .extend([param.name.clone(), planned.path_on_compute.clone()]);
        plan.env.push(EnvVar {
            name: planned.env.clone(),
            value: planned.path_on_compute.clone(),
        });
        plan.references.push(planned);
    }
    if let Some(code) = &exp.code {
        plan_code(&mut plan, exp, code, datastores, roots.code)?;
    }
    if let Some((name, param)) = exp.env.iter().find_map(|e| {
        plan.references
            .iter()
            .find(|r| r.env == e.name)
            .map(|r| (e.name.clone(), r.param.clone()))
    }) {
        return Err(PlanError::EnvShadowsReference { name, param });
    }
    check_command_line(&plan, &exp.env)?;
    Ok(plan)
}

/// Whether the kernel will start the script: its command line and environment (the spec's and
/// the references' variables) within [`limits::COMMAND_LINE_MAX_BYTES`], counted as `execve`
/// counts them. A variable from a Secret or ConfigMap counts by its name: its value is only
/// known where the pod starts.
fn check_command_line(
    plan: &ExecutionPlan,
    env: &[k8s_openapi::api::core::v1::EnvVar],
) -> Result<(), PlanError> {
    let args = plan
        .command
        .iter()
        .chain(&plan.args)
        .map(|a| limits::exec_bytes(a));
    let spec_env = env
        .iter()
        .map(|e| limits::exec_bytes(&e.name) + 1 + e.value.as_deref().map_or(0, str::len));
    let reference_env = plan
        .env
        .iter()
        .map(|e| limits::exec_bytes(&e.name) + 1 + e.value.len());
    let bytes: usize = args.chain(spec_env).chain(reference_env).sum();
    if bytes > limits::COMMAND_LINE_MAX_BYTES {
        return Err(PlanError::CommandLineTooLong { bytes });
    }
    Ok(())
}

/// Each string the script's process gets, within [`limits::ARG_MAX_CHARS`] (what the CRD's
/// `maxLength` says for the fields it can bound).
fn check_arguments(exp: &ExperimentSpec) -> Result<(), PlanError> {
    let command = exp.command.iter().flatten().enumerate();
    let strings = command
        .map(|(n, c)| (format!("command element {}", n + 1), c.as_str()))
        .chain(std::iter::once((
            "entryScript".to_string(),
            exp.entry_script.as_str(),
        )))
        .chain(exp.script_params.iter().flat_map(|p| {
            std::iter::once((format!("the name of parameter {}", p.name), p.name.as_str())).chain(
                p.value
                    .as_deref()
                    .map(|v| (format!("the value of parameter {}", p.name), v)),
            )
        }))
        .chain(
            exp.env
                .iter()
                .filter_map(|e| Some((format!("env {}", e.name), e.value.as_deref()?))),
        );
    for (what, s) in strings {
        let chars = s.chars().count();
        if chars > limits::ARG_MAX_CHARS {
            return Err(PlanError::ArgumentTooLong { what, chars });
        }
    }
    Ok(())
}

/// The rules the spec alone decides, without its datastores: what `plan` checks first, and what
/// `datastore submit` checks before it uploads a snapshot.
pub fn check_spec(exp: &ExperimentSpec) -> Result<(), PlanError> {
    if exp.entry_script.is_empty() {
        return Err(PlanError::EmptyEntryScript);
    }
    if let Some(problem) = paths::leaves_folder(&exp.entry_script) {
        return Err(PlanError::EntryScriptOutsideSource {
            path: exp.entry_script.clone(),
            problem,
        });
    }
    if exp.command.as_ref().is_some_and(Vec::is_empty) {
        return Err(PlanError::EmptyCommand);
    }
    // The local compute target runs the script with this machine's interpreter.
    if exp.compute_target == ComputeTarget::Cluster && exp.image.as_deref().unwrap_or("").is_empty()
    {
        return Err(PlanError::MissingImage);
    }
    if exp.code.is_some()
        && let Some(dir) = exp.source_directory.as_deref()
        && let Some(problem) = paths::leaves_folder(dir)
    {
        return Err(PlanError::SourceDirectoryOutsideCode {
            path: dir.to_string(),
            problem,
        });
    }
    check_env(&exp.env)?;
    check_parameters(&exp.script_params)?;
    check_arguments(exp)?;
    // A name with a `/` would turn its lookup into a request for another resource.
    if let Some((user, datastore)) = exp
        .datastore_uses()
        .into_iter()
        .find(|(_, name)| !limits::is_dns1123_subdomain(name))
    {
        return Err(PlanError::InvalidDatastoreName {
            user,
            datastore: datastore.to_string(),
        });
    }
    Ok(())
}

/// What a process environment (and the apiserver, for a container's) accepts.
fn check_env(env: &[k8s_openapi::api::core::v1::EnvVar]) -> Result<(), PlanError> {
    for var in env {
        let problem = if var.name.is_empty() {
            Some("is empty")
        } else if var.name.contains('=') {
            Some("contains `=`")
        } else if !var.name.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            Some("contains a character that is not printable ASCII")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(PlanError::InvalidEnvName {
                name: var.name.clone(),
                problem,
            });
        }
        if var.value.as_deref().is_some_and(|v| v.contains('\0')) {
            return Err(PlanError::InvalidEnvValue {
                name: var.name.clone(),
            });
        }
    }
    Ok(())
}

/// A data reference's or the code's datastore path, normalized, or why it cannot be used.
fn datastore_path(user: &str, path: &str) -> Result<String, PlanError> {
    paths::datastore_path(path).map_err(|problem| PlanError::InvalidDatastorePath {
        user: user.to_string(),
        problem,
    })
}

/// The parameter-level rules: non-empty, unique names, each with exactly one of value and
/// dataReference.
fn check_parameters(params: &[ScriptParam]) -> Result<(), PlanError> {
    let mut seen = BTreeSet::new();
    for param in params {
        if param.name.is_empty() {
            return Err(PlanError::EmptyParameterName);
        }
        if !seen.insert(param.name.as_str()) {
            return Err(PlanError::DuplicateParameter {
                name: param.name.clone(),
            });
        }
        match (&param.value, &param.data_reference) {
            (Some(_), Some(_)) => {
                return Err(PlanError::ValueAndDataReference {
                    name: param.name.clone(),
                });
            }
            (None, None) => {
                return Err(PlanError::NoValueOrDataReference {
                    name: param.name.clone(),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// The code download, the working directory inside it, and read access to its datastore.
fn plan_code(
    plan: &mut ExecutionPlan,
    exp: &ExperimentSpec,
    code: &CodeReference,
    datastores: &BTreeMap<String, Capabilities>,
    code_root: &str,
) -> Result<(), PlanError> {
    let user = "code".to_string();
    let Some(store) = datastores.get(&code.datastore) else {
        return Err(PlanError::UnknownDatastore {
            user,
            datastore: code.datastore.clone(),
            known: datastores.keys().cloned().collect(),
        });
    };
    check_reachable(exp.compute_target, &user, &code.datastore, store)?;
    // check_spec refused a sourceDirectory that leaves the code.
    plan.working_dir = Some(match exp.source_directory.as_deref() {
        None | Some("" | ".") => code_root.to_string(),
        Some(dir) => join(code_root, dir.trim_end_matches('/')),
    });
    let remote_path = datastore_path(&user, &code.path)?;
    plan.code = Some(Transfer {
        param: user,
        datastore: code.datastore.clone(),
        remote_path,
        overwrite: false,
        local_path: code_root.to_string(),
        // The script may write next to its code: never a read-only cached tree.
        cache: Some(false),
    });
    let granted = plan.permissions.entry(code.datastore.clone()).or_default();
    *granted = granted.union(Access::READ);
    Ok(())
}

fn plan_reference(
    target: ComputeTarget,
    param: &str,
    reference: &DataReference,
    datastores: &BTreeMap<String, Capabilities>,
    root: &str,
) -> Result<PlannedReference, PlanError> {
    let Some(store) = datastores.get(&reference.datastore) else {
        return Err(PlanError::UnknownDatastore {
            user: format!("parameter {param}"),
            datastore: reference.datastore.clone(),
            known: datastores.keys().cloned().collect(),
        });
    };
    if reference.overwrite && reference.mode != Mode::Upload {
        return Err(PlanError::OverwriteNotUpload {
            param: param.to_string(),
        });
    }
    if reference.mode != Mode::Mount {
        let option = if reference.read_only.is_some() {
            Some("readOnly")
        } else if reference.mount_driver.is_some() {
            Some("mountDriver")
        } else {
            None
        };
        if let Some(option) = option {
            return Err(PlanError::MountOptionNotMount {
                param: param.to_string(),
                option,
            });
        }
    }
    if target == ComputeTarget::Local && reference.mode == Mode::Mount {
        return Err(PlanError::MountOnLocalCompute {
            param: param.to_string(),
        });
    }
    check_reachable(
        target,
        &format!("parameter {param}"),
        &reference.datastore,
        store,
    )?;
    let writes = match reference.mode {
        Mode::Upload => Some(("an upload reference", "")),
        Mode::Mount if !reference.read_only() => Some((
            "a read-write mount",
            ", or mount it read-only (remove readOnly: false)",
        )),
        _ => None,
    };
    if let Some((what, hint)) = writes
        && store.read_only
    {
        return Err(PlanError::WriteToReadOnlyDatastore {
            param: param.to_string(),
            datastore: reference.datastore.clone(),
            what,
            hint,
        });
    }
    if let Some(driver) = reference.mount_driver
        && !store.mount_drivers.contains(&driver)
    {
        return Err(PlanError::SidecarOnAzureFile {
            param: param.to_string(),
            datastore: reference.datastore.clone(),
        });
    }
    let relative = relative_path_on_compute(param, reference);
    if let Err(problem) = check_relative(relative) {
        return Err(PlanError::InvalidPathOnCompute {
            param: param.to_string(),
            path: relative.to_string(),
            problem,
        });
    }
    Ok(PlannedReference {
        param: param.to_string(),
        datastore: reference.datastore.clone(),
        path: datastore_path(&format!("parameter {param}"), &reference.path)?,
        mode: reference.mode,
        path_on_compute: join(root, relative),
        env: env_name(param),
    })
}

/// Whether `target` can reach the datastore at all. Of today's backends only a local directory
/// is out of the cluster's reach and only an Azure Files share out of the CLI's, so the refusals
/// (whose reasons are public) keep naming them; a backend that breaks that needs its own.
fn check_reachable(
    target: ComputeTarget,
    user: &str,
    datastore: &str,
    store: &Capabilities,
) -> Result<(), PlanError> {
    let (user, datastore) = (user.to_string(), datastore.to_string());
    match target {
        ComputeTarget::Cluster if !store.from_cluster => {
            Err(PlanError::LocalDatastoreOnCluster { user, datastore })
        }
        ComputeTarget::Local if !store.from_cli => {
            Err(PlanError::AzureFileOnLocalCompute { user, datastore })
        }
        _ => Ok(()),
    }
}

/// `pathOnCompute`, or the parameter name without its leading dashes (as the SDK does).
fn relative_path_on_compute<'a>(param: &'a str, reference: &'a DataReference) -> &'a str {
    reference
        .path_on_compute
        .as_deref()
        .unwrap_or_else(|| param.trim_start_matches('-'))
}

/// The rule the CRD's CEL validation of `pathOnCompute` checks: a relative path of non-empty
/// segments, none of them `.` or `..`.
fn check_relative(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.starts_with('/') {
        return Err("is absolute");
    }
    for segment in path.split('/') {
        match segment {
            "" => return Err("has an empty segment (a doubled or trailing /)"),
            "." | ".." => return Err("has a . or .. segment"),
            _ => {}
        }
    }
    Ok(())
}

/// `AZUREML_DATAREFERENCE_` and the parameter name without leading dashes, uppercased, with
/// everything but ASCII letters and digits as `_`.
fn env_name(param: &str) -> String {
    let name: String = param
        .trim_start_matches('-')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{ENV_PREFIX}{name}")
}

/// `root/relative`, with a single `/` between them.
fn join(root: &str, relative: &str) -> String {
    format!("{}/{relative}", root.trim_end_matches('/'))
}

fn is_prefix(prefix: &[&str], path: &[&str]) -> bool {
    prefix.len() <= path.len() && prefix.iter().zip(path).all(|(a, b)| a == b)
}

#[cfg(test)]
mod tests;
