//! The CEL rules of the datastore CRDs, evaluated locally with kube's `cel` feature: through the
//! generated `validate_cel` methods (on the spec fragments) and through the CRDs' own
//! `openAPIV3Schema` (what the apiserver evaluates on `kubectl apply`).

mod common;

use common::cel::{crd_schema, messages};
use datastore_operator::api::{ClusterDatastoreSpec, Credentials, DatastoreSpec, limits};
use kube::core::cel::Validator;
use serde_json::{Value, json};

const ONE_KIND: &str = "set exactly one kind of storage: azureBlob, azureFile or local";
const SHARE: &str = "a share name has 3 to 63 lowercase letters, digits and single hyphens, starting and ending with a letter or digit";
const ACCOUNT: &str = "a storage account name has 3 to 24 lowercase letters and digits";
const CONTAINER: &str = "a container name has 3 to 63 lowercase letters, digits and single hyphens, starting and ending with a letter or digit (or is $root, $web or $logs)";
const NOT_BOTH: &str = "set either secretRef or workloadIdentity, not both";

fn blob(account: &str, container: &str) -> Value {
    json!({"accountName": account, "containerName": container})
}

fn spec_errors(spec: Value) -> Vec<String> {
    let datastore = DatastoreSpec::validate_cel(&spec, None);
    let cluster = ClusterDatastoreSpec::validate_cel(&spec, None);
    assert_eq!(
        datastore, cluster,
        "Datastore and ClusterDatastore specs must carry the same rules"
    );
    datastore.map_or_else(messages, |()| Vec::new())
}

// --- DatastoreSpec / ClusterDatastoreSpec: exactly one kind of storage ---

#[test]
fn one_kind_of_storage_is_accepted() {
    assert_eq!(
        spec_errors(json!({"azureBlob": blob("mlstorage", "training-data")})),
        Vec::<String>::new()
    );
    assert_eq!(
        spec_errors(json!({"local": {"path": "/data"}})),
        Vec::<String>::new()
    );
}

#[test]
fn both_kinds_of_storage_are_refused_with_the_message() {
    let errors = spec_errors(json!({
        "azureBlob": blob("mlstorage", "training-data"),
        "local": {"path": "/data"},
    }));
    assert_eq!(errors, vec![ONE_KIND]);
}

#[test]
fn no_kind_of_storage_is_refused_with_the_message() {
    assert_eq!(spec_errors(json!({})), vec![ONE_KIND]);
}

fn share(name: &str) -> Value {
    json!({"accountName": "mlstorage", "shareName": name, "credentials": {"secretRef": {"name": "share-creds"}}})
}

#[test]
fn an_azure_files_share_is_a_kind_of_storage_of_its_own() {
    assert_eq!(
        spec_errors(json!({"azureFile": share("datasets"), "readOnly": true})),
        Vec::<String>::new()
    );
    assert_eq!(
        spec_errors(
            json!({"azureFile": share("datasets"), "azureBlob": blob("mlstorage", "data")})
        ),
        vec![ONE_KIND]
    );
    for bad in ["ab", "Datasets", "a--b", "-abc", "$root"] {
        assert_eq!(
            spec_errors(json!({"azureFile": share(bad)})),
            vec![SHARE],
            "{bad}"
        );
    }
}

// --- AzureBlobSpec: accountName and containerName (evaluated within the spec: AzureBlobSpec
// itself has no `#[x_kube(cel)]`, so it has no validate_cel of its own) ---

fn blob_errors(account: &str, container: &str) -> Vec<String> {
    spec_errors(json!({"azureBlob": blob(account, container)}))
}

#[test]
fn account_names_follow_azure_rules() {
    for good in [
        "abc",
        "mlstorage",
        "devstoreaccount1",
        "a23456789012345678901234",
        "123",
    ] {
        assert_eq!(
            blob_errors(good, "data"),
            Vec::<String>::new(),
            "{good:?} is a valid account name"
        );
    }
    for bad in [
        "ab",                        // too short
        "a234567890123456789012345", // 25 characters
        "MLStorage",                 // uppercase
        "ml-storage",                // hyphen
        "ml_storage",                // underscore
        "ml.storage",
        "mlstorage ",
        "",
    ] {
        assert_eq!(
            blob_errors(bad, "data"),
            vec![ACCOUNT],
            "{bad:?} is not a valid account name"
        );
    }
}

#[test]
fn container_names_follow_azure_rules() {
    let max = format!("a{}z", "b".repeat(61));
    assert_eq!(max.len(), 63);
    for good in [
        "abc",
        "data",
        "training-data",
        "a-b-c",
        "0data9",
        max.as_str(),
        "$web",
        "$root",
        "$logs",
    ] {
        assert_eq!(
            blob_errors("mlstorage", good),
            Vec::<String>::new(),
            "{good:?} is a valid container name"
        );
    }
    let too_long = format!("{max}c");
    for bad in [
        "ab",              // too short
        too_long.as_str(), // 64 characters
        "training--data",  // consecutive hyphens
        "a--b",
        "-data", // leading hyphen
        "data-", // trailing hyphen
        "Data",  // uppercase
        "training_data",
        "data.set",
        "",
        "$other",
    ] {
        assert_eq!(
            blob_errors("mlstorage", bad),
            vec![CONTAINER],
            "{bad:?} is not a valid container name"
        );
    }
}

#[test]
fn account_and_container_errors_are_both_reported() {
    let mut errors = blob_errors("Bad", "--");
    errors.sort();
    assert_eq!(errors, vec![CONTAINER, ACCOUNT]); // sorted
}

// --- Credentials: not both secretRef and workloadIdentity ---

#[test]
fn credentials_are_one_source_or_none() {
    let ok = |v: Value| assert!(Credentials::validate_cel(&v, None).is_ok(), "{v} is valid");
    ok(json!({}));
    ok(json!({"secretRef": {"name": "blob-creds"}}));
    ok(json!({"workloadIdentity": {"clientId": "00000000-0000-0000-0000-000000000000"}}));

    let both = json!({
        "secretRef": {"name": "blob-creds"},
        "workloadIdentity": {"clientId": "00000000-0000-0000-0000-000000000000"},
    });
    let errors =
        Credentials::validate_cel(&both, None).expect_err("both credential sources are refused");
    assert_eq!(messages(errors), vec![NOT_BOTH]);
}

#[test]
fn credentials_rule_applies_inside_a_datastore_spec() {
    let mut spec = json!({"azureBlob": blob("mlstorage", "data")});
    spec["azureBlob"]["credentials"] = json!({
        "secretRef": {"name": "blob-creds"},
        "workloadIdentity": {"clientId": "id"},
    });
    assert_eq!(spec_errors(spec), vec![NOT_BOTH]);
}

#[test]
fn a_secret_is_named_by_kubernetes_name_rule() {
    let with_secret = |name: &str| {
        let mut spec = json!({"azureBlob": blob("mlstorage", "data")});
        spec["azureBlob"]["credentials"] = json!({"secretRef": {"name": name}});
        spec_errors(spec)
    };
    assert_eq!(with_secret("blob-ds-key"), Vec::<String>::new());
    assert_eq!(with_secret("team.blob-key"), Vec::<String>::new());
    for bad in ["team-b/blob-key", "Blob_Key", "-key", "key."] {
        assert_eq!(with_secret(bad), vec![limits::SECRET_NAME], "{bad}");
    }
    for kind in ["Datastore", "ClusterDatastore"] {
        let schema = crd_schema(kind);
        let name = &schema["properties"]["spec"]["properties"]["azureBlob"]["properties"]["credentials"]
            ["properties"]["secretRef"]["properties"]["name"];
        assert_eq!(name["maxLength"], json!(limits::NAME_MAX), "{kind}");
    }
}

// --- The rules as the apiserver sees them: in the CRDs' openAPIV3Schema ---

/// `(rule, message)` pairs of the `x-kubernetes-validations` at a schema node.
fn rules_at(schema: &Value, path: &[&str]) -> Vec<(String, String)> {
    let mut node = schema;
    for field in path {
        node = node
            .get("properties")
            .and_then(|p| p.get(*field))
            .unwrap_or_else(|| panic!("no property {field} on the way to {}", path.join(".")));
    }
    node.get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["rule"].as_str().unwrap_or_default().to_string(),
                r["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn the_rules_are_in_the_generated_crds() {
    for kind in ["Datastore", "ClusterDatastore"] {
        let schema = crd_schema(kind);
        let check = |path: &[&str], message: &str, rule_part: &str| {
            let rules = rules_at(&schema, path);
            assert!(
                rules
                    .iter()
                    .any(|(r, m)| m == message && r.contains(rule_part)),
                "{kind}: x-kubernetes-validations at {} should hold a rule with {rule_part:?} and message {message:?}; found {rules:?}",
                path.join(".")
            );
        };
        check(&["spec"], ONE_KIND, "has(self.azureFile)");
        check(&["spec", "azureFile", "shareName"], SHARE, "self.matches(");
        check(
            &["spec", "azureBlob", "accountName"],
            ACCOUNT,
            "self.matches(",
        );
        check(
            &["spec", "azureBlob", "containerName"],
            CONTAINER,
            "!self.contains('--')",
        );
        check(
            &["spec", "azureBlob", "credentials"],
            NOT_BOTH,
            "has(self.workloadIdentity)",
        );
    }
}

#[test]
fn every_rule_in_the_crds_compiles() {
    for kind in ["Datastore", "ClusterDatastore"] {
        let compiled = kube::core::cel::compile_schema(&crd_schema(kind));
        assert!(
            !compiled.has_errors(),
            "{kind}: CEL rules that do not compile: {:?}",
            compiled.compilation_errors()
        );
    }
}

fn object(kind: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "datastore.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "blob-ds"},
        "spec": spec,
    })
}

#[test]
fn whole_objects_are_validated_by_the_crd_schema() {
    for kind in ["Datastore", "ClusterDatastore"] {
        let schema = crd_schema(kind);
        let validate = |spec: Value| Validator::new().validate(&schema, &object(kind, spec), None);

        let mut good = json!({"azureBlob": blob("mlstorage", "training-data")});
        good["azureBlob"]["credentials"] = json!({"secretRef": {"name": "blob-creds"}});
        assert!(validate(good).is_ok(), "{kind}: a valid object is accepted");

        let errors = validate(json!({}))
            .expect_err("no storage is refused")
            .into_vec();
        assert_eq!(errors.len(), 1, "{kind}: {errors:?}");
        assert_eq!(errors[0].message, ONE_KIND);
        assert_eq!(
            errors[0].field_path, "spec",
            "{kind}: the error points at the spec"
        );

        let mut bad = json!({"azureBlob": blob("ML", "a--b")});
        bad["azureBlob"]["credentials"] = json!({
            "secretRef": {"name": "blob-creds"},
            "workloadIdentity": {"clientId": "id"},
        });
        let mut found: Vec<(String, String)> = validate(bad)
            .expect_err("bad names and two credential sources are refused")
            .into_vec()
            .into_iter()
            .map(|e| (e.field_path, e.message))
            .collect();
        found.sort();
        assert_eq!(
            found,
            vec![
                (
                    "spec.azureBlob.accountName".to_string(),
                    ACCOUNT.to_string()
                ),
                (
                    "spec.azureBlob.containerName".to_string(),
                    CONTAINER.to_string()
                ),
                (
                    "spec.azureBlob.credentials".to_string(),
                    NOT_BOTH.to_string()
                ),
            ],
            "{kind}: each failed rule names its field"
        );
    }
}
