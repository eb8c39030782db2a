//! Controller scenarios against a mocked apiserver: each reconcile's requests are checked in
//! order (method, path, query, body). Scenarios chain: each starts from the status the previous
//! one wrote, as the apiserver would hand it back.
//!
//! One test binary, a module a concern: [`start`] (an Experiment's start and its refusals),
//! [`follow`] (following the run), [`uploads`] (the upload Job and the cleanup), [`mounts`]
//! (the mount driver chosen, recorded or refused) and [`datastores`] (the Datastore controller's
//! Ready checks, against a real Azurite: the harness in `common`). [`fixtures`] holds what they
//! share.

#[path = "../common/mod.rs"]
mod common;

mod fixtures;

mod datastores;
mod follow;
mod mounts;
mod start;
mod uploads;
