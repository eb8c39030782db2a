//! datastore-operator: Azure ML style datastores and data references for Kubernetes.

pub mod agent;
pub mod api;
pub mod atomic;
pub mod cache;
pub mod cli;
pub mod controller;
pub mod csi;
pub mod duration;
pub mod error;
pub mod exit;
pub mod local;
pub mod paths;
pub mod plan;
pub mod quantity;
pub mod reason;
pub mod render;
pub mod serve;
pub mod signal;
pub mod store;
pub mod transfer;
pub mod yaml;
