//! The CEL rules of the Experiment CRD, evaluated locally with kube's `cel` feature: through the
//! generated `validate_cel` methods and through the CRD's own `openAPIV3Schema` (what the
//! apiserver evaluates on `kubectl apply`).

mod common;

use common::cel::messages;
use datastore_operator::api::{
    DataReference, ExperimentSpec, IMAGE_ON_CLUSTER, MOUNT_ON_LOCAL, PATH_ON_COMPUTE, ScriptParam,
    Staging, limits,
};
use kube::core::cel::{
    AnalysisWarning, ScopeContext, Validator, WarningKind, analyze_rule, compile_schema,
};
use serde_json::{Value, json};

const EXACTLY_ONE: &str = "set exactly one of value or dataReference in each scriptParams entry";
const UNIQUE: &str = "scriptParams names must be unique";
const COMMAND: &str = "command, when set, must hold at least the program to run";
const IMAGE: &str = "image must name a container image, e.g. python:3.12-slim";
const ENTRY_SCRIPT: &str = "entryScript must name the script to run, e.g. training_script.py";
const DEADLINE: &str = "activeDeadlineSeconds must be positive";
const BACKOFF: &str = "backoffLimit must not be negative";

/// The example spec.
fn example() -> Value {
    json!({
        "image": "python:3.12-slim",
        "sourceDirectory": "experiment_folder",
        "entryScript": "training_script.py",
        "computeTarget": "cluster",
        "scriptParams": [
            {"name": "--data_folder", "dataReference": {
                "datastore": "blob-ds", "path": "data/files", "mode": "download", "pathOnCompute": "training_data"}},
            {"name": "--output_dir", "dataReference": {
                "datastore": "blob-ds", "path": "outputs/run1", "mode": "upload", "pathOnCompute": "outputs"}},
            {"name": "--regularization", "value": "0.1"},
        ],
    })
}

fn spec_errors(spec: &Value) -> Vec<String> {
    ExperimentSpec::validate_cel(spec, None).map_or_else(messages, |()| Vec::new())
}

fn none() -> Vec<String> {
    Vec::new()
}

#[test]
fn the_example_is_accepted() {
    assert_eq!(spec_errors(&example()), none());
    // Only the required fields, everything else defaulted.
    let minimal = json!({"image": "python:3.12-slim", "entryScript": "train.py"});
    assert_eq!(spec_errors(&minimal), none());
}

// --- ScriptParam: exactly one of value and dataReference ---

#[test]
fn a_parameter_has_a_value_or_a_data_reference() {
    let reference = json!({"datastore": "blob-ds", "mode": "download"});
    let ok = |v: Value| {
        assert!(
            ScriptParam::validate_cel(&v, None).is_ok(),
            "{v} is a valid parameter"
        )
    };
    ok(json!({"name": "--lr", "value": "0.1"}));
    ok(json!({"name": "--lr", "value": ""}));
    ok(json!({"name": "--data", "dataReference": reference}));

    for bad in [
        json!({"name": "--lr"}),
        json!({"name": "--data", "value": "x", "dataReference": reference}),
    ] {
        let errors = ScriptParam::validate_cel(&bad, None)
            .expect_err("neither or both are refused")
            .into_vec();
        assert_eq!(
            errors
                .iter()
                .map(|e| e.message.as_str())
                .collect::<Vec<_>>(),
            vec![EXACTLY_ONE],
            "{bad}"
        );
    }
}

#[test]
fn the_exactly_one_rule_applies_inside_the_spec() {
    let mut spec = example();
    spec["scriptParams"][2] = json!({"name": "--regularization"});
    assert_eq!(spec_errors(&spec), vec![EXACTLY_ONE]);
}

// --- scriptParams: unique names ---

#[test]
fn parameter_names_are_unique() {
    let mut spec = example();
    spec["scriptParams"][2]["name"] = json!("--data_folder");
    assert_eq!(spec_errors(&spec), vec![UNIQUE]);

    // Names differing only in dashes are different parameters.
    let mut spec = example();
    spec["scriptParams"][2]["name"] = json!("-data_folder");
    assert_eq!(spec_errors(&spec), none());
}

// --- DataReference.pathOnCompute: relative, no empty, `.` or `..` segments ---

fn reference_errors(path_on_compute: &str) -> Vec<String> {
    let reference =
        json!({"datastore": "blob-ds", "mode": "download", "pathOnCompute": path_on_compute});
    let own = DataReference::validate_cel(&reference, None).map_or_else(messages, |()| none());
    // The same rule, evaluated where the apiserver meets it: inside a spec.
    let mut spec = example();
    spec["scriptParams"][0]["dataReference"] = reference;
    assert_eq!(spec_errors(&spec), own, "{path_on_compute:?} inside a spec");
    own
}

#[test]
fn relative_paths_on_compute_are_accepted() {
    for good in [
        "training_data",
        "data/train",
        "a/b/c",
        ".hidden",
        "..data",
        "data..",
        "a.b/c..d",
        "with space",
    ] {
        assert_eq!(reference_errors(good), none(), "{good:?} is a valid path");
    }
    let absent = json!({"datastore": "blob-ds", "mode": "download"});
    assert!(DataReference::validate_cel(&absent, None).is_ok());
}

#[test]
fn absolute_escaping_and_empty_segment_paths_on_compute_are_refused() {
    for bad in [
        "",
        "/",
        "/mnt/data",
        "..",
        "../x",
        "a/../b",
        "a/..",
        ".",
        "./a",
        "a/./b",
        "a/.",
        "a//b",
        "a/",
    ] {
        assert_eq!(
            reference_errors(bad),
            vec![PATH_ON_COMPUTE],
            "{bad:?} is not a valid path on compute"
        );
    }
}

// --- mount on the local compute target ---

fn with_mode(target: Option<&str>, mode: &str) -> Value {
    let mut spec = example();
    spec["scriptParams"][0]["dataReference"]["mode"] = json!(mode);
    match target {
        Some(t) => spec["computeTarget"] = json!(t),
        None => {
            spec.as_object_mut().unwrap().remove("computeTarget");
        }
    }
    spec
}

#[test]
fn image_is_required_on_the_cluster_only() {
    let without_image = |target: Option<&str>| {
        let mut spec = with_mode(target, "download");
        spec.as_object_mut().unwrap().remove("image");
        spec
    };
    assert_eq!(spec_errors(&without_image(None)), vec![IMAGE_ON_CLUSTER]);
    assert_eq!(
        spec_errors(&without_image(Some("cluster"))),
        vec![IMAGE_ON_CLUSTER]
    );
    assert_eq!(spec_errors(&without_image(Some("local"))), none());
}

#[test]
fn mount_is_refused_on_the_local_compute_target_with_the_sdk_reason() {
    assert!(MOUNT_ON_LOCAL.starts_with("mount is only available on a remote compute target"));
    assert_eq!(
        spec_errors(&with_mode(Some("local"), "mount")),
        vec![MOUNT_ON_LOCAL]
    );
    assert_eq!(spec_errors(&with_mode(Some("cluster"), "mount")), none());
    assert_eq!(
        spec_errors(&with_mode(None, "mount")),
        none(),
        "cluster is the default"
    );
    assert_eq!(spec_errors(&with_mode(Some("local"), "download")), none());
    // A local experiment without parameters at all.
    let spec =
        json!({"image": "python:3.12-slim", "entryScript": "t.py", "computeTarget": "local"});
    assert_eq!(spec_errors(&spec), none());
}

// --- plain field rules ---

#[test]
fn field_rules_refuse_empty_and_out_of_range_values() {
    let cases = [
        ("image", json!(""), IMAGE),
        ("entryScript", json!(""), ENTRY_SCRIPT),
        ("command", json!([]), COMMAND),
        ("activeDeadlineSeconds", json!(0), DEADLINE),
        ("backoffLimit", json!(-1), BACKOFF),
    ];
    for (field, bad, message) in cases {
        let mut spec = example();
        spec[field] = bad.clone();
        assert_eq!(spec_errors(&spec), vec![message], "{field}: {bad}");
    }
    let mut spec = example();
    spec["command"] = json!(["python", "-u", "training_script.py"]);
    spec["activeDeadlineSeconds"] = json!(3600);
    spec["backoffLimit"] = json!(0);
    assert_eq!(spec_errors(&spec), none());
}

// --- Names of other objects: Kubernetes' own rule (the lookup of a name with a `/` would be a
// request for another resource) ---

#[test]
fn every_name_the_spec_holds_follows_kubernetes_name_rule() {
    let refused = |field: &str, value: &str| {
        let mut spec = example();
        match field {
            "dataReference.datastore" => {
                spec["scriptParams"][0]["dataReference"]["datastore"] = json!(value)
            }
            "code.datastore" => spec["code"] = json!({"datastore": value, "path": "snapshots/a"}),
            "serviceAccountName" => spec["serviceAccountName"] = json!(value),
            "outputs.storageClassName" => spec["outputs"] = json!({"storageClassName": value}),
            "staging.storageClassName" => spec["staging"] = json!({"storageClassName": value}),
            "staging.claimName" => spec["staging"] = json!({"claimName": value}),
            other => panic!("{other}"),
        }
        spec_errors(&spec)
    };
    let cases = [
        ("dataReference.datastore", limits::DATASTORE_NAME),
        ("code.datastore", limits::DATASTORE_NAME),
        ("serviceAccountName", limits::SERVICE_ACCOUNT_NAME),
        ("outputs.storageClassName", limits::STORAGE_CLASS_NAME),
        ("staging.storageClassName", limits::STORAGE_CLASS_NAME),
        ("staging.claimName", limits::CLAIM_NAME),
    ];
    for (field, message) in cases {
        for good in ["blob-ds", "team-b.blob-ds", "a"] {
            assert_eq!(refused(field, good), none(), "{field}: {good}");
        }
        for bad in ["team-b/blob-ds", "Blob-DS", "blob_ds", "-ds", "ds-", "a..b"] {
            assert_eq!(refused(field, bad), vec![message], "{field}: {bad}");
        }
    }
    // The example, through the whole CRD schema, names its field.
    let mut spec = example();
    spec["scriptParams"][0]["dataReference"]["datastore"] = json!("team-b/blob-ds");
    let errors = Validator::new()
        .validate(&crd_schema(), &object(spec), None)
        .expect_err("a datastore name with a / is refused")
        .into_vec();
    assert_eq!(
        errors
            .iter()
            .map(|e| (e.field_path.as_str(), e.message.as_str()))
            .collect::<Vec<_>>(),
        vec![(
            "spec.scriptParams[0].dataReference.datastore",
            limits::DATASTORE_NAME
        )]
    );
}

#[test]
fn names_and_command_line_strings_have_a_max_length_in_the_schema() {
    let schema = crd_schema();
    let spec = &schema["properties"]["spec"]["properties"];
    let param = &spec["scriptParams"]["items"]["properties"];
    let max = |node: &Value| node["maxLength"].as_u64().map(|n| n as usize);
    assert_eq!(max(&param["value"]), Some(limits::ARG_MAX_CHARS));
    assert_eq!(max(&spec["entryScript"]), Some(limits::ARG_MAX_CHARS));
    assert_eq!(max(&spec["command"]["items"]), Some(limits::ARG_MAX_CHARS));
    assert_eq!(spec["command"]["maxItems"], json!(64));
    assert_eq!(
        max(&param["dataReference"]["properties"]["datastore"]),
        Some(limits::NAME_MAX)
    );
    assert_eq!(max(&spec["serviceAccountName"]), Some(limits::NAME_MAX));
    assert_eq!(
        max(&spec["staging"]["properties"]["claimName"]),
        Some(limits::NAME_MAX)
    );
}

/// The command line the spec spells out, within what the kernel takes: the 1 MiB is
/// over one value's maxLength; 40 values of 30,000 characters are each within it, together not.
#[test]
fn a_command_line_over_the_limit_in_all_is_refused() {
    let with_values = |n: usize| {
        let mut spec = example();
        for i in 0..n {
            spec["scriptParams"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": format!("--p{i}"), "value": "x".repeat(30_000)}));
        }
        spec_errors(&spec)
    };
    assert_eq!(with_values(34), none());
    assert_eq!(with_values(40), vec![limits::COMMAND_LINE_MESSAGE]);
    // With a command instead of python and entryScript.
    let mut spec = example();
    spec["command"] = json!(vec!["x".repeat(30_000); 36]);
    assert_eq!(spec_errors(&spec), vec![limits::COMMAND_LINE_MESSAGE]);
    spec["command"] = json!(["torchrun", "train.py"]);
    assert_eq!(spec_errors(&spec), none());
}

// --- The rules as the apiserver sees them: in the CRD's openAPIV3Schema ---

fn crd_schema() -> Value {
    common::cel::crd_schema("Experiment")
}

fn object(spec: Value) -> Value {
    json!({
        "apiVersion": "datastore.dev/v1alpha1",
        "kind": "Experiment",
        "metadata": {"name": "train", "namespace": "default"},
        "spec": spec,
    })
}

#[test]
fn whole_objects_are_validated_by_the_crd_schema() {
    let schema = crd_schema();
    let validate = |spec: Value| Validator::new().validate(&schema, &object(spec), None);
    assert!(validate(example()).is_ok(), "the example is accepted");

    let mut bad = with_mode(Some("local"), "mount");
    bad["scriptParams"][1]["dataReference"]["pathOnCompute"] = json!("/outputs");
    bad["scriptParams"][2]["name"] = json!("--data_folder");
    let mut found: Vec<(String, String)> = validate(bad)
        .expect_err("a bad spec is refused")
        .into_vec()
        .into_iter()
        .map(|e| (e.field_path, e.message))
        .collect();
    found.sort();
    let expected = |path: &str, message: &str| (path.to_string(), message.to_string());
    assert_eq!(
        found,
        vec![
            expected("spec", MOUNT_ON_LOCAL),
            expected("spec.scriptParams", UNIQUE),
            expected(
                "spec.scriptParams[1].dataReference.pathOnCompute",
                PATH_ON_COMPUTE
            ),
        ],
        "each failed rule names its field"
    );
}

#[test]
fn known_modes_and_targets_come_from_enums_in_the_schema() {
    let schema = crd_schema();
    let spec = &schema["properties"]["spec"]["properties"];
    let reference = &spec["scriptParams"]["items"]["properties"]["dataReference"]["properties"];
    assert_eq!(
        reference["mode"]["enum"],
        json!(["download", "upload", "mount"])
    );
    assert_eq!(spec["computeTarget"]["enum"], json!(["cluster", "local"]));
    assert_eq!(spec["computeTarget"]["default"], json!("cluster"));
    assert_eq!(spec["uploadPolicy"]["enum"], json!(["OnSuccess", "Always"]));
    assert_eq!(spec["uploadPolicy"]["default"], json!("OnSuccess"));
    assert_eq!(reference["path"]["default"], json!(""));
    let status = &schema["properties"]["status"]["properties"];
    assert_eq!(
        status["phase"]["enum"],
        json!([
            "Pending",
            "Downloading",
            "Running",
            "Uploading",
            "Succeeded",
            "Failed"
        ])
    );

    // Files the CLI reads (no apiserver) meet the same enum through serde.
    let mut spec = example();
    spec["scriptParams"][0]["dataReference"]["mode"] = json!("copy");
    let err = serde_json::from_value::<ExperimentSpec>(spec).expect_err("an unknown mode");
    assert!(err.to_string().contains("unknown variant `copy`"), "{err}");
}

/// Every `(path, rule)` of the `x-kubernetes-validations` below a schema node.
fn rules(node: &Value, path: &str, out: &mut Vec<(String, String, Value)>) {
    for r in node
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push((
            path.to_string(),
            r["rule"].as_str().unwrap_or_default().to_string(),
            node.clone(),
        ));
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            rules(child, &format!("{path}.{name}"), out);
        }
    }
    if let Some(items) = node.get("items") {
        rules(items, &format!("{path}[]"), out);
    }
}

/// kube-cel's static cost warnings for a rule at a schema node. Its scope check is left out: in
/// kube-cel 0.8 it reports the variable of a comprehension nested in a larger expression (`p` in
/// `... && self.scriptParams.exists(p, ...)`) as unknown, which the apiserver accepts.
fn cost_warnings(rule: &str, node: &Value) -> Vec<AnalysisWarning> {
    analyze_rule(rule, &compile_schema(node), ScopeContext::CrdValidation)
        .into_iter()
        .filter(|w| w.kind != WarningKind::WrongScope)
        .collect()
}

#[test]
fn every_rule_compiles_and_stays_within_the_cost_budget() {
    let schema = crd_schema();
    let compiled = compile_schema(&schema);
    assert!(
        !compiled.has_errors(),
        "CEL rules that do not compile: {:?}",
        compiled.compilation_errors()
    );
    let mut found = Vec::new();
    rules(&schema, "", &mut found);
    let listed: Vec<(&str, &str)> = found
        .iter()
        .map(|(p, r, _)| (p.as_str(), r.as_str()))
        .collect();
    assert_eq!(
        found.len(),
        22,
        "the rules written in src/api/experiment.rs: {listed:?}"
    );
    for (path, rule, node) in found {
        let warnings = cost_warnings(&rule, &node);
        assert!(warnings.is_empty(), "{path}: `{rule}`: {warnings:?}");
    }
}

#[test]
fn the_cost_check_would_catch_an_unbounded_parameter_list() {
    // The check above is only worth something if it fails without the bounds.
    let mut node = crd_schema()["properties"]["spec"]["properties"]["scriptParams"].clone();
    let rule = node["x-kubernetes-validations"][0]["rule"]
        .as_str()
        .unwrap()
        .to_string();
    node.as_object_mut().unwrap().remove("maxItems");
    let warnings = cost_warnings(&rule, &node);
    assert!(
        !warnings.is_empty(),
        "no warning for `{rule}` without maxItems"
    );
}

#[test]
fn the_committed_example_is_a_valid_experiment() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/experiment.yaml"
    ))
    .expect("examples/experiment.yaml is readable");
    let written: Value = serde_saphyr::from_str(&text).expect("the example is YAML");
    assert!(
        Validator::new()
            .validate(&crd_schema(), &written, None)
            .is_ok(),
        "the example passes the CRD's rules"
    );
    // Every field it sets is a field of the type: nothing is dropped on the way through serde.
    let parsed: datastore_operator::api::Experiment =
        serde_json::from_value(written.clone()).expect("the example is an Experiment");
    let mut round_trip = serde_json::to_value(&parsed).unwrap();
    round_trip["spec"]
        .as_object_mut()
        .unwrap()
        .remove("uploadPolicy"); // the one default the example leaves out
    assert_eq!(round_trip, written);
}

// --- DataReference: overwrite is for uploads ---

#[test]
fn overwrite_applies_to_upload_references_only() {
    let reference = |mode: &str, overwrite: bool| json!({"datastore": "blob-ds", "path": "outputs", "mode": mode, "overwrite": overwrite});
    assert!(DataReference::validate_cel(&reference("upload", true), None).is_ok());
    assert!(DataReference::validate_cel(&reference("download", false), None).is_ok());
    for mode in ["download", "mount"] {
        let errors = DataReference::validate_cel(&reference(mode, true), None)
            .map_or_else(messages, |()| Vec::new());
        assert_eq!(
            errors,
            vec!["overwrite applies to upload references only"],
            "{mode}"
        );
    }
    let mut spec = example();
    spec["scriptParams"][0]["dataReference"]["overwrite"] = json!(true);
    assert_eq!(
        spec_errors(&spec),
        vec!["overwrite applies to upload references only"]
    );
}

// --- DataReference: cache is for downloads ---

#[test]
fn cache_applies_to_download_references_only() {
    let reference = |mode: &str, cache: bool| json!({"datastore": "blob-ds", "path": "data", "mode": mode, "cache": cache});
    for cache in [true, false] {
        assert!(DataReference::validate_cel(&reference("download", cache), None).is_ok());
    }
    for mode in ["upload", "mount"] {
        let errors = DataReference::validate_cel(&reference(mode, true), None)
            .map_or_else(messages, |()| Vec::new());
        assert_eq!(
            errors,
            vec!["cache applies to download references only"],
            "{mode}"
        );
    }
}

// --- DataReference: readOnly and mountDriver are for mounts ---

#[test]
fn mount_options_apply_to_mount_references_only() {
    let reference = |mode: &str, option: &str, value: Value| {
        let mut r = json!({"datastore": "blob-ds", "path": "images", "mode": mode});
        r[option] = value;
        r
    };
    let errors =
        |r: Value| DataReference::validate_cel(&r, None).map_or_else(messages, |()| Vec::new());
    for (option, value) in [
        ("readOnly", json!(false)),
        ("mountDriver", json!("sidecar")),
    ] {
        assert_eq!(
            errors(reference("mount", option, value.clone())),
            none(),
            "{option}"
        );
        for mode in ["download", "upload"] {
            let found = errors(reference(mode, option, value.clone()));
            assert_eq!(found.len(), 1, "{option} on {mode}: {found:?}");
            assert!(
                found[0].starts_with(&format!("{option} applies to mount references only")),
                "{found:?}"
            );
        }
    }
    // The drivers are an enum of the schema (the apiserver refuses any other value).
    let schema = crd_schema();
    let reference = &schema["properties"]["spec"]["properties"]["scriptParams"]["items"]["properties"]
        ["dataReference"]["properties"];
    assert_eq!(reference["mountDriver"]["enum"], json!(["csi", "sidecar"]));
    assert_eq!(reference["readOnly"]["type"], json!("boolean"));
}

#[test]
fn staging_names_an_existing_claim_or_describes_a_volume_not_both() {
    let errors = |s: Value| Staging::validate_cel(&s, None).map_or_else(messages, |()| Vec::new());
    for fine in [
        json!({}),
        json!({"size": "200Gi"}),
        json!({"size": "500Gi", "storageClassName": "local-nvme"}),
        json!({"claimName": "datasets-cache"}),
    ] {
        assert_eq!(errors(fine.clone()), none(), "{fine}");
    }
    for both in [
        json!({"claimName": "c", "size": "1Gi"}),
        json!({"claimName": "c", "storageClassName": "fast"}),
    ] {
        let found = errors(both.clone());
        assert_eq!(found.len(), 1, "{both}: {found:?}");
        assert!(
            found[0].starts_with("staging.claimName names a volume that exists"),
            "{found:?}"
        );
    }
}
