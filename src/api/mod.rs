//! Custom resource types. No IO here.

pub mod datastore;

pub use datastore::*;

use kube::CustomResourceExt;

/// Every CRD the operator owns, in a stable order (the order of `crds/`).
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![ClusterDatastore::crd(), Datastore::crd()]
}

/// The CRDs as one multi-document YAML stream, as `datastore crds` prints it and `crds/` holds it.
pub fn crds_yaml() -> String {
    crds()
        .iter()
        .map(|crd| serde_yaml::to_string(crd).expect("a CRD always serializes"))
        .collect::<Vec<_>>()
        .join("---\n")
}
