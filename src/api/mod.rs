//! Custom resource types. No IO here.

// kube's printcolumn(...) attributes repeat `type_ = ...`, which clippy mistakes for duplicates.
#![allow(clippy::duplicated_attributes)]

pub mod datastore;
pub mod experiment;
pub mod limits;

pub use datastore::*;
pub use experiment::*;

use kube::CustomResourceExt;

/// Every CRD the operator owns, in a stable order (the order of `crds/`).
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![ClusterDatastore::crd(), Datastore::crd(), Experiment::crd()]
}

/// The CRDs as one multi-document YAML stream, as `datastore crds` prints it and `crds/` holds it.
pub fn crds_yaml() -> String {
    crds()
        .iter()
        .map(crate::yaml::to_string)
        .collect::<Vec<_>>()
        .join("---\n")
}
