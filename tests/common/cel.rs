//! The CRDs' CEL rules as the apiserver evaluates them: the CRD schemas, and the messages of
//! the rules a value fails.

use datastore_operator::api::crds;
use kube::core::cel::{ErrorKind, ValidationErrors};
use serde_json::Value;

/// The messages of the failed rules, asserting each is a rule that evaluated to false (not a
/// compilation or evaluation error, which would mean a broken rule rather than a rejected value).
pub fn messages(errors: ValidationErrors) -> Vec<String> {
    errors
        .into_vec()
        .into_iter()
        .map(|e| {
            assert_eq!(
                e.kind,
                ErrorKind::ValidationFailure,
                "rule `{}` did not evaluate: {e}",
                e.rule
            );
            e.message
        })
        .collect()
}

/// The `openAPIV3Schema` of the CRD of `kind`, as JSON.
pub fn crd_schema(kind: &str) -> Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD of kind {kind}"));
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the CRD has an openAPIV3Schema");
    serde_json::to_value(schema).expect("the schema serializes to JSON")
}
