//! An Experiment read from a YAML file, and its datastores resolved: what `plan`, `run` and
//! `submit` start from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kube::ResourceExt;

use crate::api::{Experiment, ExperimentSpec};
use crate::error::{Error, Result};
use crate::store::StoreConfig;
use crate::store::resolve::{self, Scope, Source};
use crate::yaml::{self, YamlError};

pub struct ExperimentFile {
    pub exp: Experiment,
    /// The file, as given.
    pub path: PathBuf,
    /// The folder holding the file: a relative `sourceDirectory` is resolved against it.
    pub dir: PathBuf,
}

impl ExperimentFile {
    /// Reads `path`; the namespace is `namespace` if given, else the file's, else `fallback`.
    pub fn read(path: &Path, namespace: Option<&str>, fallback: &str) -> Result<ExperimentFile> {
        let mut exp: Experiment = yaml::read_file(path)
            .and_then(|text| yaml::from_str(&text))
            .map_err(|e| match e {
                YamlError::Read(e) => Error::Config(format!(
                    "cannot read the Experiment file {}: {e}",
                    path.display()
                )),
                YamlError::Invalid(e) => Error::Config(format!(
                    "{} is not a valid Experiment: {e}; see examples/experiment.yaml",
                    path.display()
                )),
                e => Error::Config(format!("the Experiment file {} {e}", path.display())),
            })?;
        if exp.metadata.name.as_deref().unwrap_or("").is_empty() {
            return Err(Error::Config(format!(
                "{} has no metadata.name: name the Experiment",
                path.display()
            )));
        }
        let namespace = namespace
            .map(str::to_string)
            .or_else(|| exp.namespace())
            .unwrap_or_else(|| fallback.to_string());
        exp.metadata.namespace = Some(namespace);
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = std::path::absolute(&dir).map_err(|e| Error::local("resolve", &dir, e))?;
        Ok(ExperimentFile {
            exp,
            path: path.to_path_buf(),
            dir,
        })
    }

    pub fn namespace(&self) -> String {
        self.exp.namespace().unwrap_or_default()
    }

    pub fn name(&self) -> String {
        self.exp.name_any()
    }
}

/// Every datastore `spec` uses, resolved from `source` (a datastores file or the cluster), and
/// the names of those whose `cacheDownloads` is set.
pub async fn resolve_datastores(
    spec: &ExperimentSpec,
    source: &Source,
    scope: &Scope,
) -> Result<(BTreeMap<String, StoreConfig>, BTreeSet<String>)> {
    // What the spec alone refuses is refused before any lookup (a datastore name with a `/`
    // would ask the cluster for another resource), as the controller does.
    crate::plan::check_spec(spec).map_err(|e| Error::Config(e.to_string()))?;
    let mut datastores = BTreeMap::new();
    let mut cache_downloads = BTreeSet::new();
    for (_, name) in spec.datastore_uses() {
        let resolved = resolve::resolve(name, source, scope).await?;
        if resolved.cache_downloads {
            cache_downloads.insert(name.to_string());
        }
        datastores.insert(name.to_string(), resolved.config);
    }
    Ok((datastores, cache_downloads))
}
