//! Downloads served from the node cache: which are, why, and what the run pod holds for them.

use std::collections::BTreeSet;

use super::*;
use crate::plan::contract::{NODE_CACHE_DRIVER, cache_annotation};
use crate::render::cached::{SAS_KEY, choose_caches};

const CACHED: &str = r#"
image: python:3.12-slim
entryScript: train.py
scriptParams:
  - name: --data
    dataReference: {datastore: blob-ds, path: data/files, mode: download, cache: true}
  - name: --labels
    dataReference: {datastore: blob-ds, path: labels, mode: download}
"#;

fn env(node_cache: Option<bool>) -> MountEnvironment {
    MountEnvironment {
        node_cache,
        namespace: "ml".into(),
        ..MountEnvironment::default()
    }
}

/// (cached, reason) of each download of `yaml`.
fn choices(
    yaml: &str,
    stores: &BTreeMap<String, StoreConfig>,
    cache_downloads: &[&str],
    operator_default: bool,
    node_cache: Option<bool>,
) -> Vec<(bool, Option<String>)> {
    let exp = experiment(yaml);
    let plan = plan(&exp.spec, &crate::store::capabilities(stores), CLUSTER).unwrap();
    let ctx = BuildContext {
        cache_downloads: operator_default,
        ..BuildContext::default()
    };
    let set: BTreeSet<String> = cache_downloads.iter().map(|s| s.to_string()).collect();
    choose_caches(&plan, stores, &set, &ctx, &env(node_cache))
        .into_iter()
        .map(|c| (c.cached, c.reason))
        .collect()
}

fn served(why: &str) -> (bool, Option<String>) {
    (true, Some(format!("served from the node cache: {why}")))
}
fn downloaded(why: &str) -> (bool, Option<String>) {
    (false, Some(format!("downloaded into the pod: {why}")))
}

#[test]
fn the_reference_then_the_datastore_then_the_operator_ask_for_the_cache() {
    let stores = datastores();
    // Only the reference that asks, where the cluster has the driver.
    assert_eq!(
        choices(CACHED, &stores, &[], false, Some(true)),
        [served("cache: true on the reference"), (false, None)]
    );
    // The datastore's cacheDownloads covers the other one.
    assert_eq!(
        choices(CACHED, &stores, &["blob-ds"], false, Some(true))[1],
        served("cacheDownloads on datastore blob-ds")
    );
    // The operator's default too; `cache: false` wins over both.
    assert_eq!(
        choices(CACHED, &stores, &[], true, Some(true))[1],
        served("the operator's default (--cache-downloads)")
    );
    let refused = CACHED.replace("mode: download}", "mode: download, cache: false}");
    assert_eq!(
        choices(&refused, &stores, &["blob-ds"], true, Some(true))[1],
        downloaded("cache: false on the reference")
    );
}

#[test]
fn without_the_driver_or_a_sas_the_reference_is_downloaded_and_says_why() {
    let stores = datastores();
    assert_eq!(
        choices(CACHED, &stores, &[], false, Some(false))[0],
        downloaded(
            "cache: true on the reference, but the cluster has no CSIDriver cache.datastore.dev (Helm value nodeCache.enabled)"
        )
    );
    assert_eq!(
        choices(CACHED, &stores, &[], false, None)[0],
        downloaded(
            "cache: true on the reference, but whether the cluster has the CSIDriver cache.datastore.dev is not known (the operator may not read CSIDrivers)"
        )
    );
    // A public container: the node cache lists with the pod's own SAS, and there is none.
    let public = CACHED.replace(
        "datastore: blob-ds, path: data",
        "datastore: public-ds, path: data",
    );
    assert_eq!(
        choices(&public, &stores, &[], false, Some(true))[0],
        downloaded(
            "cache: true on the reference, but datastore public-ds has no credentials, and the node cache lists the folder with a SAS token (from an account key or a sasToken)"
        )
    );
    let identity = BTreeMap::from([azure(
        "blob-ds",
        AzureCredential::WorkloadIdentity {
            client_id: "c".into(),
        },
    )]);
    assert!(
        choices(CACHED, &identity, &[], false, Some(true))[0]
            .1
            .as_deref()
            .unwrap()
            .contains("authenticates with workload identity")
    );
}

#[test]
fn a_cached_download_is_a_read_only_volume_of_the_node_cache_that_its_container_checks() {
    let exp = experiment(CACHED);
    let stores = datastores();
    let plan = plan(&exp.spec, &crate::store::capabilities(&stores), CLUSTER).unwrap();
    let ctx = BuildContext::default();
    let caches = choose_caches(&plan, &stores, &BTreeSet::new(), &ctx, &env(Some(true)));
    let children = build(&exp, &plan, &stores, &ctx, &[], &caches, now()).unwrap();
    let pod_spec = pod(&children.run);
    check_restricted(pod_spec);

    // The volume: the driver, read-only, the folder's place, the Secret with a read+list SAS.
    let volumes = pod_spec.volumes.as_ref().unwrap();
    let cache = volumes.iter().find(|v| v.name == "cache-0").unwrap();
    let csi = cache.csi.as_ref().unwrap();
    assert_eq!(csi.driver, NODE_CACHE_DRIVER);
    assert_eq!(csi.read_only, Some(true));
    assert_eq!(
        csi.volume_attributes.clone().unwrap(),
        BTreeMap::from([
            ("accountName".to_string(), "devstoreaccount1".to_string()),
            ("containerName".to_string(), "data".to_string()),
            (
                "endpoint".to_string(),
                "http://127.0.0.1:10000/devstoreaccount1".to_string()
            ),
            ("path".to_string(), "data/files".to_string()),
        ])
    );
    let secret_name = &csi.node_publish_secret_ref.as_ref().unwrap().name;
    assert_eq!(secret_name, "train-iris-cache-0");
    let secret = children
        .volume_secrets
        .iter()
        .find(|s| s.metadata.name.as_ref() == Some(secret_name))
        .unwrap();
    check_meta(&secret.metadata, secret_name);
    let values = secret_values(secret);
    assert_eq!(values.keys().collect::<Vec<_>>(), [SAS_KEY]);
    let token = &values[SAS_KEY];
    assert!(
        token.contains("sp=rl&") && token.contains("sr=c&"),
        "{token}"
    );

    // The other download is staged as ever; the cached one uses no staging.
    let init = pod_spec.init_containers.as_ref().unwrap();
    let checked = init.iter().find(|c| c.name == "download-0").unwrap();
    assert_eq!(
        mounts(checked),
        [
            ("cache-0".into(), "/mnt/datastore/data".into(), None, true),
            ("credentials".into(), CREDENTIALS_DIR.into(), None, true),
        ]
    );
    let args = checked.args.clone().unwrap();
    assert!(args.contains(&"--cached".to_string()), "{args:?}");
    assert!(!args.contains(&"--staging-dir".to_string()), "{args:?}");
    let no_storage_request = checked
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .is_none_or(|r| !r.contains_key("ephemeral-storage"));
    assert!(no_storage_request);
    let staged = init.iter().find(|c| c.name == "download-1").unwrap();
    assert!(
        !staged
            .args
            .clone()
            .unwrap()
            .contains(&"--cached".to_string())
    );
    assert_eq!(mounts(staged)[0].0, "staging");
    let main = &pod_spec.containers[0];
    assert!(
        mounts(main).contains(&("cache-0".into(), "/mnt/datastore/data".into(), None, true)),
        "main reads the cached tree, read-only"
    );

    // Why, on the pod: only for the reference that asked.
    let annotations = children
        .run
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(
        annotations
            .get(&cache_annotation("download-0"))
            .map(String::as_str),
        Some("served from the node cache: cache: true on the reference")
    );
    assert!(!annotations.contains_key(&cache_annotation("download-1")));
}

#[test]
fn when_every_download_is_cached_there_is_no_staging_volume() {
    let exp = experiment(&CACHED.replace("mode: download}", "mode: download, cache: true}"));
    let stores = datastores();
    let plan = plan(&exp.spec, &crate::store::capabilities(&stores), CLUSTER).unwrap();
    let ctx = BuildContext::default();
    let caches = choose_caches(&plan, &stores, &BTreeSet::new(), &ctx, &env(Some(true)));
    let children = build(&exp, &plan, &stores, &ctx, &[], &caches, now()).unwrap();
    let names: Vec<_> = pod(&children.run)
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(names, ["cache-0", "cache-1", "credentials"]);
}
