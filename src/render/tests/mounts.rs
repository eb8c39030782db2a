//! Mounts (both drivers, both datastore kinds) and Azure Files transfers.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Volume;

use super::*;
use crate::api::MountDriver;
use crate::render::blobfuse;
use crate::render::csi::{
    BLOB_CSI_ATTRIBUTES, BLOB_CSI_SECRET_KEYS, FILE_CSI_ATTRIBUTES, FILE_CSI_SECRET_KEYS,
};
use crate::store::fixtures;

const SHARE_KEY: &str = "c2hhcmUta2V5LW9mLXRoZS1hY2NvdW50LWZvci1zbWI=";
const GIVEN_SAS: &str = "sv=2024-08-04&sr=c&sp=rl&sig=given";

fn blob_store(credential: AzureCredential, endpoint: &str) -> StoreConfig {
    StoreConfig::AzureBlob(fixtures::blob("training-data", endpoint, credential))
}

fn share_store(credential: AzureCredential, read_only: bool) -> StoreConfig {
    StoreConfig::AzureFile(fixtures::share(credential, read_only))
}

fn key() -> AzureCredential {
    AzureCredential::AccountKey(Hidden::new(KEY.to_string()))
}

/// `blob-ds` (account key), `sas-ds` (a SAS token), `wi-ds` (workload identity), `share-ds` (an
/// Azure Files share with a key), `ro-share-ds` (the same share, marked read-only).
fn stores() -> BTreeMap<String, StoreConfig> {
    let public = "https://mlstorage.blob.core.windows.net";
    BTreeMap::from([
        ("blob-ds".to_string(), blob_store(key(), public)),
        (
            "sas-ds".to_string(),
            blob_store(AzureCredential::SasToken(Hidden::new(GIVEN_SAS)), public),
        ),
        (
            "wi-ds".to_string(),
            blob_store(
                AzureCredential::WorkloadIdentity {
                    client_id: "0000-client".to_string(),
                },
                public,
            ),
        ),
        (
            "share-ds".to_string(),
            share_store(AzureCredential::AccountKey(Hidden::new(SHARE_KEY)), false),
        ),
        (
            "ro-share-ds".to_string(),
            share_store(AzureCredential::AccountKey(Hidden::new(SHARE_KEY)), true),
        ),
    ])
}

fn sidecar_ctx() -> BuildContext {
    BuildContext {
        blobfuse_image: Some("example.io/blobfuse2:2.4".to_string()),
        ..Default::default()
    }
}

/// The children of `params` (scriptParams lines), with the drivers `choose_drivers` picks.
fn build_with(
    params: &str,
    stores: &BTreeMap<String, StoreConfig>,
    ctx: &BuildContext,
) -> Result<(Experiment, ExecutionPlan, Children)> {
    let exp = experiment(&format!(
        "image: python:3.12-slim\nentryScript: train.py\nactiveDeadlineSeconds: 7200\nscriptParams:\n{params}"
    ));
    let plan = plan(&exp.spec, &crate::store::capabilities(stores), CLUSTER).unwrap();
    let choices = choose_drivers(&plan, stores, ctx, &MountEnvironment::default())
        .map_err(|r| Error::Config(r.to_string()))?;
    let children = build(&exp, &plan, stores, ctx, &choices, &[], now())?;
    Ok((exp, plan, children))
}

fn children_of(params: &str, ctx: &BuildContext) -> (Experiment, ExecutionPlan, Children) {
    build_with(params, &stores(), ctx).unwrap()
}

fn volume<'a>(pod: &'a PodSpec, name: &str) -> &'a Volume {
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn attributes(volume: &Volume) -> BTreeMap<String, String> {
    volume
        .csi
        .as_ref()
        .unwrap()
        .volume_attributes
        .clone()
        .unwrap()
}

fn secret(c: &Children, name: &str) -> BTreeMap<String, String> {
    secret_values(
        c.volume_secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no Secret {name}")),
    )
}

/// The value of `field` in a SAS token's query.
fn sas_field(token: &str, field: &str) -> String {
    url::form_urlencoded::parse(token.trim_start_matches('?').as_bytes())
        .find(|(k, _)| k == field)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {field} in {token}"))
}

fn main_container(c: &Children) -> &Container {
    let pod = pod(&c.run);
    pod.containers.iter().find(|c| c.name == "main").unwrap()
}

const TWO_BLOB_MOUNTS: &str = "  - {name: --data_folder, dataReference: {datastore: blob-ds, path: images/train, mode: mount, pathOnCompute: training_data}}\n  - {name: --scratch, dataReference: {datastore: blob-ds, mode: mount, readOnly: false}}\n";

#[test]
fn csi_blob_mounts_get_a_sas_with_exactly_their_permissions() {
    let (_, plan, c) = children_of(TWO_BLOB_MOUNTS, &BuildContext::default());
    let pod = pod(&c.run);
    check_restricted(pod);
    assert!(pod.init_containers.is_none(), "no agent, no sidecar");

    // mount-0: read-only, with a folder.
    let ro = volume(pod, "mount-0");
    let csi = ro.csi.as_ref().unwrap();
    assert_eq!(csi.driver, "blob.csi.azure.com");
    assert_eq!(csi.read_only, Some(true));
    let a = attributes(ro);
    assert_eq!(a["containerName"], "training-data");
    assert_eq!(a["secretName"], "train-iris-mount-0");
    assert_eq!(a["protocol"], "fuse2");
    assert_eq!(
        a["mountOptions"],
        "-o allow_other,--read-only,--subdirectory=images/train"
    );
    // mount-1: read-write, the whole container.
    let rw = volume(pod, "mount-1");
    assert_eq!(rw.csi.as_ref().unwrap().read_only, None);
    assert_eq!(attributes(rw)["mountOptions"], "-o allow_other");
    assert_eq!(attributes(rw)["secretName"], "train-iris-mount-1");

    // The Secrets: account name and a SAS minted for the mount, never the key.
    assert_eq!(c.volume_secrets.len(), 2);
    for (n, permissions) in [(0, "rl"), (1, "racwdl")] {
        let data = secret(&c, &format!("train-iris-mount-{n}"));
        let keys: BTreeSet<&str> = data.keys().map(String::as_str).collect();
        assert_eq!(keys, BLOB_CSI_SECRET_KEYS.iter().copied().collect());
        assert_eq!(data["azurestorageaccountname"], "mlstorage");
        let token = &data["azurestorageaccountsastoken"];
        assert_eq!(sas_field(token, "sp"), permissions, "mount-{n}");
        assert_eq!(
            sas::Permissions::from(plan.mounts[n].permissions()).as_str(),
            permissions
        );
        assert_eq!(sas_field(token, "sr"), "c");
        // Like the credentials Secret's: now + activeDeadlineSeconds (2 h) + 1 h.
        assert_eq!(sas_field(token, "se"), "2030-01-01T03:00:00Z");
        assert!(!data.values().any(|v| v.contains(KEY)));
        let expected = sas::container_sas(
            "mlstorage",
            KEY,
            "training-data",
            plan.mounts[n].permissions().into(),
            now() + Duration::hours(3),
        )
        .unwrap();
        assert_eq!(token, &expected);
    }

    // `main` sees the folders where its args say, read-only where asked.
    let main = main_container(&c);
    assert_eq!(
        mounts(main),
        vec![
            (
                "mount-0".into(),
                "/mnt/datastore/training_data".into(),
                None,
                true
            ),
            (
                "mount-1".into(),
                "/mnt/datastore/scratch".into(),
                None,
                false
            ),
        ]
    );
    assert_eq!(
        main.args.as_ref().unwrap(),
        &[
            "--data_folder",
            "/mnt/datastore/training_data",
            "--scratch",
            "/mnt/datastore/scratch"
        ]
    );
    // Mounts need no agent: no credentials Secret, no outputs, no upload Job.
    assert!(c.credentials.is_none() && c.outputs.is_none() && c.upload.is_none());
}

#[test]
fn a_sas_token_datastore_passes_its_token_and_workload_identity_needs_no_secret() {
    let (_, _, c) = children_of(
        "  - {name: --a, dataReference: {datastore: sas-ds, mode: mount}}\n  - {name: --b, dataReference: {datastore: wi-ds, path: x, mode: mount}}\n",
        &BuildContext::default(),
    );
    assert_eq!(c.volume_secrets.len(), 1);
    assert_eq!(
        secret(&c, "train-iris-mount-0")["azurestorageaccountsastoken"],
        GIVEN_SAS
    );
    let pod = pod(&c.run);
    let a = attributes(volume(pod, "mount-1"));
    assert_eq!(a["storageAccount"], "mlstorage");
    assert_eq!(a["containerName"], "training-data");
    assert_eq!(a["clientID"], "0000-client");
    assert_eq!(a["mountWithWorkloadIdentityToken"], "true");
    assert!(!a.contains_key("secretName"));
    check_restricted(pod);
}

#[test]
fn csi_share_mounts_use_the_shares_secret_and_folder() {
    let (_, _, c) = children_of(
        "  - {name: --labels, dataReference: {datastore: share-ds, path: labels/v2, mode: mount}}\n  - {name: --work, dataReference: {datastore: share-ds, mode: mount, readOnly: false}}\n",
        &BuildContext::default(),
    );
    let pod = pod(&c.run);
    check_restricted(pod);
    let ro = volume(pod, "mount-0");
    let csi = ro.csi.as_ref().unwrap();
    assert_eq!(csi.driver, "file.csi.azure.com");
    assert_eq!(csi.read_only, Some(true));
    let a = attributes(ro);
    assert_eq!(a["shareName"], "datasets");
    assert_eq!(a["folderName"], "labels/v2");
    assert_eq!(a["secretName"], "train-iris-share-0");
    assert_eq!(
        a["mountOptions"],
        "uid=65532,gid=65532,dir_mode=0755,file_mode=0644,ro"
    );
    let rw = attributes(volume(pod, "mount-1"));
    assert!(!rw.contains_key("folderName"));
    assert!(!rw["mountOptions"].contains("ro"), "{}", rw["mountOptions"]);
    assert_eq!(rw["secretName"], "train-iris-share-0");

    // One Secret for the share, with what SMB needs: the account key.
    assert_eq!(c.volume_secrets.len(), 1);
    let data = secret(&c, "train-iris-share-0");
    let keys: BTreeSet<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(keys, FILE_CSI_SECRET_KEYS.iter().copied().collect());
    assert_eq!(data["azurestorageaccountname"], "mlstorage");
    assert_eq!(data["azurestorageaccountkey"], SHARE_KEY);
    assert_eq!(
        mounts(main_container(&c)),
        vec![
            ("mount-0".into(), "/mnt/datastore/labels".into(), None, true),
            ("mount-1".into(), "/mnt/datastore/work".into(), None, false),
        ]
    );
}

#[test]
fn a_sidecar_mounts_the_container_for_main_and_alone_runs_privileged() {
    let ctx = BuildContext {
        sidecar_memory: Quantity("512Mi".to_string()),
        ..sidecar_ctx()
    };
    let (_, _, c) = children_of(
        "  - {name: --data_folder, dataReference: {datastore: blob-ds, path: images/train, mode: mount, mountDriver: sidecar, pathOnCompute: training_data}}\n  - {name: --csi, dataReference: {datastore: blob-ds, mode: mount}}\n",
        &ctx,
    );
    let pod = pod(&c.run);
    let inits = pod.init_containers.as_ref().unwrap();
    assert_eq!(inits.len(), 1);
    let sidecar = &inits[0];
    assert_eq!(sidecar.name, "mount-0");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(sidecar.image.as_deref(), Some("example.io/blobfuse2:2.4"));
    assert_eq!(sidecar.command, Some(vec!["blobfuse2".to_string()]));
    assert_eq!(
        sidecar.args.as_ref().unwrap(),
        &[
            "mount",
            "/mnt/blobfuse",
            "--config-file=/etc/blobfuse2/config.yaml",
            "--foreground"
        ]
    );
    let sc = sidecar.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(true));
    assert_eq!(sc.run_as_user, Some(0));
    assert_eq!(sc.run_as_non_root, Some(false));
    let resources = sidecar.resources.as_ref().unwrap();
    assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "512Mi");
    assert_eq!(resources.requests.as_ref().unwrap()["memory"].0, "512Mi");
    // CPU too: a compute ResourceQuota refuses a container that does not say.
    assert_eq!(
        resources.requests.as_ref().unwrap()["cpu"].0,
        SIDECAR_CPU_REQUEST
    );
    assert_eq!(
        resources.limits.as_ref().unwrap()["cpu"].0,
        DEFAULT_SIDECAR_CPU
    );
    // The startup probe holds `main` until the FUSE mount is there; preStop unmounts.
    let probe = sidecar.startup_probe.as_ref().unwrap();
    assert_eq!(
        probe.exec.as_ref().unwrap().command.as_ref().unwrap(),
        &["grep", "-qF", " /mnt/blobfuse fuse", "/proc/mounts"]
    );
    let pre_stop = sidecar
        .lifecycle
        .as_ref()
        .unwrap()
        .pre_stop
        .as_ref()
        .unwrap();
    assert_eq!(
        pre_stop.exec.as_ref().unwrap().command.as_ref().unwrap(),
        &["fusermount3", "-u", "/mnt/blobfuse"]
    );
    let propagation = |c: &Container, volume: &str| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume)
            .unwrap()
            .clone()
    };
    let shared = propagation(sidecar, "mount-0");
    assert_eq!(shared.mount_path, "/mnt/blobfuse");
    assert_eq!(shared.mount_propagation.as_deref(), Some("Bidirectional"));
    let config_mount = propagation(sidecar, "mount-0-config");
    assert_eq!(config_mount.mount_path, "/etc/blobfuse2");
    assert_eq!(config_mount.read_only, Some(true));
    let main = main_container(&c);
    let seen = propagation(main, "mount-0");
    assert_eq!(seen.mount_path, "/mnt/datastore/training_data");
    assert_eq!(seen.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(seen.read_only, Some(true));
    assert!(
        main.args
            .as_ref()
            .unwrap()
            .windows(2)
            .any(|w| w == ["--data_folder", "/mnt/datastore/training_data"])
    );

    // The shared folder is an emptyDir; the config a Secret only the sidecar mounts.
    assert!(volume(pod, "mount-0").empty_dir.is_some());
    assert_eq!(
        volume(pod, "mount-0-config")
            .secret
            .as_ref()
            .unwrap()
            .secret_name
            .as_deref(),
        Some("train-iris-mount-0")
    );
    // The other mount stays CSI.
    assert_eq!(
        volume(pod, "mount-1").csi.as_ref().unwrap().driver,
        "blob.csi.azure.com"
    );

    // The config: the account, container, folder, a read-and-list SAS, the cache under 512Mi.
    let config = &secret(&c, "train-iris-mount-0")[blobfuse::CONFIG_KEY];
    let v: serde_json::Value = serde_saphyr::from_str(config).unwrap();
    assert_eq!(v["azstorage"]["account-name"], "mlstorage");
    assert_eq!(v["azstorage"]["container"], "training-data");
    assert_eq!(v["azstorage"]["subdirectory"], "images/train");
    assert_eq!(v["azstorage"]["mode"], "sas");
    assert_eq!(
        sas_field(v["azstorage"]["sas"].as_str().unwrap(), "sp"),
        "rl"
    );
    assert_eq!(v["read-only"], true);
    assert_eq!(v["allow-other"], true);
    let cache_mb = v["block_cache"]["mem-size-mb"].as_u64().unwrap();
    assert!(cache_mb > 0 && cache_mb < 512, "{cache_mb}");
    assert!(!config.contains(KEY), "{config}");

    // Only the sidecar is privileged: every other container is still "restricted".
    let others = PodSpec {
        init_containers: None,
        ..pod.clone()
    };
    check_restricted(&others);
}

#[test]
fn azure_files_downloads_and_uploads_copy_through_the_share() {
    let (_, _, c) = children_of(
        "  - {name: --data, dataReference: {datastore: ro-share-ds, path: data/files, mode: download}}\n  - {name: --out, dataReference: {datastore: share-ds, path: outputs/run1, mode: upload}}\n  - {name: --more, dataReference: {datastore: ro-share-ds, path: more, mode: download}}\n",
        &BuildContext::default(),
    );
    // Two share datastores, in name order: ro-share-ds is share 0, share-ds share 1.
    let names: Vec<&str> = c
        .volume_secrets
        .iter()
        .map(|s| s.metadata.name.as_deref().unwrap())
        .collect();
    assert_eq!(names, ["train-iris-share-0", "train-iris-share-1"]);

    // The run Job: each download's agent reads the share, read-only, at /mnt/shares/0.
    let run = pod(&c.run);
    check_restricted(run);
    for init in run.init_containers.as_ref().unwrap() {
        assert!(
            mounts(init).contains(&("share-0".into(), "/mnt/shares/0".into(), None, true)),
            "{}: {:?}",
            init.name,
            mounts(init)
        );
    }
    let share = volume(run, "share-0");
    assert_eq!(share.csi.as_ref().unwrap().driver, "file.csi.azure.com");
    assert_eq!(share.csi.as_ref().unwrap().read_only, Some(true));
    assert_eq!(attributes(share)["secretName"], "train-iris-share-0");
    assert!(attributes(share)["mountOptions"].ends_with(",ro"));
    assert_eq!(
        run.volumes
            .iter()
            .flatten()
            .filter(|v| v.name.starts_with("share-"))
            .count(),
        1,
        "one volume per share"
    );
    assert!(
        mounts(main_container(&c))
            .iter()
            .all(|(n, ..)| !n.starts_with("share-"))
    );

    // The upload Job writes to share 1, read-write.
    let upload = pod(c.upload.as_ref().unwrap());
    check_restricted(upload);
    let container = &upload.containers[0];
    assert!(
        mounts(container).contains(&("share-1".into(), "/mnt/shares/1".into(), None, false)),
        "{:?}",
        mounts(container)
    );
    let share = volume(upload, "share-1");
    assert_eq!(share.csi.as_ref().unwrap().read_only, None);
    assert_eq!(attributes(share)["secretName"], "train-iris-share-1");
    assert!(!attributes(share)["mountOptions"].contains("ro"));

    // The agents' datastores file: each share is the local directory where it is mounted.
    let file = &secret_values(c.credentials.as_ref().unwrap())[DATASTORES_KEY];
    assert!(!file.contains(SHARE_KEY), "{file}");
    let catalog = Catalog::parse(file, "datastores.yaml", PathBuf::new()).unwrap();
    let scope = Scope {
        namespace: "ml".to_string(),
        operator_namespace: "datastore-operator".to_string(),
    };
    assert_eq!(
        catalog.resolve("ro-share-ds", &scope).unwrap().config,
        StoreConfig::Local {
            path: PathBuf::from("/mnt/shares/0"),
            read_only: true
        }
    );
    assert_eq!(
        catalog.resolve("share-ds", &scope).unwrap().config,
        StoreConfig::Local {
            path: PathBuf::from("/mnt/shares/1"),
            read_only: false
        }
    );
}

#[test]
fn code_from_a_share_is_read_through_the_share() {
    let exp = experiment(
        "image: x\nentryScript: t.py\ncode: {datastore: share-ds, path: code/v1}\nscriptParams: [{name: --w, dataReference: {datastore: share-ds, path: w, mode: mount}}]\n",
    );
    let stores = stores();
    let plan = plan(&exp.spec, &crate::store::capabilities(&stores), CLUSTER).unwrap();
    let ctx = BuildContext::default();
    let choices = choose_drivers(&plan, &stores, &ctx, &MountEnvironment::default()).unwrap();
    let c = build(&exp, &plan, &stores, &ctx, &choices, &[], now()).unwrap();
    let pod = pod(&c.run);
    let code = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(code.name, CODE_CONTAINER);
    assert!(mounts(code).contains(&("share-0".into(), "/mnt/shares/0".into(), None, true)));
    // The mount and the code share one Secret.
    assert_eq!(c.volume_secrets.len(), 1);
    assert_eq!(
        attributes(volume(pod, "mount-0"))["secretName"],
        attributes(volume(pod, "share-0"))["secretName"]
    );
}

/// Every volume Secret is the Experiment's child, and they come in a stable order: the shares'
/// (by index), then the mounts' (by index).
#[test]
fn volume_secrets_are_owned_by_the_experiment_in_a_stable_order() {
    let params = "  - {name: --a, dataReference: {datastore: blob-ds, mode: mount, mountDriver: sidecar}}\n  - {name: --b, dataReference: {datastore: share-ds, mode: mount}}\n  - {name: --c, dataReference: {datastore: blob-ds, path: c, mode: mount}}\n  - {name: --d, dataReference: {datastore: ro-share-ds, mode: download}}\n";
    let (_, _, first) = children_of(params, &sidecar_ctx());
    let names: Vec<&str> = first
        .volume_secrets
        .iter()
        .map(|s| s.metadata.name.as_deref().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "train-iris-share-0",
            "train-iris-share-1",
            "train-iris-mount-0",
            "train-iris-mount-2"
        ]
    );
    for s in &first.volume_secrets {
        check_meta(&s.metadata, s.metadata.name.as_deref().unwrap());
        assert_eq!(s.type_.as_deref(), Some("Opaque"));
    }
    let (_, _, again) = children_of(params, &sidecar_ctx());
    assert_eq!(first, again);
}

/// The script's container: no Secret volume, no variable from a Secret, no key or token in any
/// field, whatever the drivers.
#[test]
fn nothing_secret_reaches_main() {
    let params = "  - {name: --a, dataReference: {datastore: blob-ds, mode: mount, mountDriver: sidecar}}\n  - {name: --b, dataReference: {datastore: share-ds, mode: mount}}\n  - {name: --c, dataReference: {datastore: blob-ds, path: c, mode: mount}}\n  - {name: --d, dataReference: {datastore: sas-ds, mode: mount}}\n  - {name: --e, dataReference: {datastore: ro-share-ds, mode: download}}\n  - {name: --f, dataReference: {datastore: blob-ds, mode: download}}\n  - {name: --g, dataReference: {datastore: share-ds, path: out, mode: upload}}\n";
    let (_, _, c) = children_of(params, &sidecar_ctx());
    let pod = pod(&c.run);
    let secret_volumes: Vec<&str> = pod
        .volumes
        .iter()
        .flatten()
        .filter(|v| v.secret.is_some() || v.projected.is_some())
        .map(|v| v.name.as_str())
        .collect();
    assert!(secret_volumes.len() >= 2, "{secret_volumes:?}");
    let main = main_container(&c);
    for m in main.volume_mounts.iter().flatten() {
        assert!(
            !secret_volumes.contains(&m.name.as_str()),
            "main mounts {}",
            m.name
        );
    }
    assert!(main.env_from.is_none());
    for e in main.env.iter().flatten() {
        assert!(e.value_from.is_none(), "{}", e.name);
    }
    // Every secret value any Secret holds, and the datastores' own credentials.
    let mut secrets: Vec<String> = vec![
        KEY.to_string(),
        SHARE_KEY.to_string(),
        GIVEN_SAS.to_string(),
    ];
    for s in c.volume_secrets.iter().chain(c.credentials.iter()) {
        // Applied with `data`: `stringData` is write-only and merges under apply, so a key no
        // longer applied would linger.
        assert!(
            s.string_data.is_none() && s.data.as_ref().is_some_and(|d| !d.is_empty()),
            "Secret {:?} holds its values in data",
            s.metadata.name
        );
        secrets.extend(secret_values(s).into_values());
    }
    let rendered = to_yaml(main);
    for value in &secrets {
        let needle = if value.len() > 40 {
            &value[..40]
        } else {
            value
        };
        assert!(!rendered.contains(needle), "main holds {needle}");
    }
    assert!(!rendered.contains("sig=") && !rendered.contains("sastoken"));
}

/// The issue: "the CSI volume attributes match the drivers' documented names".
#[test]
fn every_rendered_csi_attribute_and_secret_key_is_documented() {
    let mut stores = stores();
    stores.insert(
        "china-ds".into(),
        blob_store(key(), "https://mlstorage.blob.core.chinacloudapi.cn"),
    );
    stores.insert(
        "private-ds".into(),
        blob_store(key(), "https://mlstorage.privatelink.blob.core.windows.net"),
    );
    let params: String = [
        "blob-ds", "sas-ds", "wi-ds", "china-ds", "private-ds", "share-ds",
    ]
    .iter()
    .enumerate()
    .map(|(i, ds)| {
        format!("  - {{name: --m{i}, dataReference: {{datastore: {ds}, path: p{i}, mode: mount, readOnly: {}}}}}\n", i % 2 == 0)
    })
    .chain(std::iter::once(
        "  - {name: --d, dataReference: {datastore: ro-share-ds, mode: download}}\n  - {name: --u, dataReference: {datastore: share-ds, mode: upload}}\n".to_string(),
    ))
    .collect();
    let (_, _, c) = build_with(&params, &stores, &BuildContext::default()).unwrap();
    let mut seen = BTreeSet::new();
    let pods = [pod(&c.run), pod(c.upload.as_ref().unwrap())];
    for volume in pods.iter().flat_map(|p| p.volumes.iter().flatten()) {
        let Some(csi) = &volume.csi else { continue };
        let documented = match csi.driver.as_str() {
            "blob.csi.azure.com" => BLOB_CSI_ATTRIBUTES,
            "file.csi.azure.com" => FILE_CSI_ATTRIBUTES,
            other => panic!("driver {other}"),
        };
        for key in csi.volume_attributes.iter().flatten().map(|(k, _)| k) {
            assert!(
                documented.contains(&key.as_str()),
                "{} attribute {key} of {} is not documented",
                csi.driver,
                volume.name
            );
            seen.insert(key.clone());
        }
    }
    // The variants above render every documented attribute.
    for documented in BLOB_CSI_ATTRIBUTES.iter().chain(FILE_CSI_ATTRIBUTES) {
        assert!(seen.contains(*documented), "{documented} never rendered");
    }
    for s in &c.volume_secrets {
        for key in secret_values(s).keys().map(String::as_str) {
            assert!(
                BLOB_CSI_SECRET_KEYS.contains(&key) || FILE_CSI_SECRET_KEYS.contains(&key),
                "Secret key {key}"
            );
        }
    }
}

#[test]
fn mounts_the_drivers_cannot_make_are_refused_clearly() {
    let refused = |params: &str, stores: &BTreeMap<String, StoreConfig>, ctx: &BuildContext| {
        match build_with(params, stores, ctx) {
            Err(Error::Config(message)) => message,
            other => panic!("{:?}", other.map(|_| ())),
        }
    };
    // Workload identity cannot be handed to the blobfuse2 sidecar.
    let message = refused(
        "  - {name: --a, dataReference: {datastore: wi-ds, mode: mount, mountDriver: sidecar}}\n",
        &stores(),
        &sidecar_ctx(),
    );
    assert!(
        message.starts_with("parameter --a: ") && message.contains("mountDriver: csi"),
        "{message}"
    );
    // Nor is it documented for the share driver's inline volumes.
    let mut wi_share = stores();
    wi_share.insert(
        "share-ds".into(),
        share_store(
            AzureCredential::WorkloadIdentity {
                client_id: "c".into(),
            },
            false,
        ),
    );
    let message = refused(
        "  - {name: --a, dataReference: {datastore: share-ds, mode: mount}}\n",
        &wi_share,
        &BuildContext::default(),
    );
    assert!(message.contains("account key"), "{message}");
    // The blob CSI driver speaks HTTPS to a host: Azurite is for the sidecar.
    let mut azurite = stores();
    azurite.insert(
        "blob-ds".into(),
        blob_store(key(), "http://127.0.0.1:10000/devstoreaccount1"),
    );
    let message = refused(
        "  - {name: --a, dataReference: {datastore: blob-ds, mode: mount, mountDriver: csi}}\n",
        &azurite,
        &BuildContext::default(),
    );
    assert!(message.contains("mountDriver: sidecar"), "{message}");
    let (_, _, c) = build_with(
        "  - {name: --a, dataReference: {datastore: blob-ds, mode: mount, mountDriver: sidecar}}\n",
        &azurite,
        &sidecar_ctx(),
    )
    .unwrap();
    let config = &secret(&c, "train-iris-mount-0")[blobfuse::CONFIG_KEY];
    assert!(
        config.contains("endpoint: http://127.0.0.1:10000/devstoreaccount1"),
        "{config}"
    );
    // Too little memory for blobfuse2.
    let message = refused(
        "  - {name: --a, dataReference: {datastore: blob-ds, mode: mount, mountDriver: sidecar}}\n",
        &stores(),
        &BuildContext {
            sidecar_memory: Quantity("32Mi".into()),
            ..sidecar_ctx()
        },
    );
    assert!(message.contains("--sidecar-memory"), "{message}");
    // A driver the builders are handed but cannot honour (the planner refuses it earlier).
    let exp = experiment(
        "image: x\nentryScript: t.py\nscriptParams: [{name: --a, dataReference: {datastore: share-ds, mode: mount}}]\n",
    );
    let stores = stores();
    let plan = plan(&exp.spec, &crate::store::capabilities(&stores), CLUSTER).unwrap();
    let sidecar = [MountChoice {
        driver: MountDriver::Sidecar,
        reason: "test".into(),
    }];
    let err = build(&exp, &plan, &stores, &sidecar_ctx(), &sidecar, &[], now()).unwrap_err();
    assert!(err.to_string().contains("Azure Files share"), "{err}");
}

#[test]
fn a_run_with_mounts_never_outlives_its_mounts_credentials() {
    let stores = stores();
    let ctx = BuildContext::default();
    let deadline_of = |yaml: &str| {
        let exp = experiment(yaml);
        let plan = plan(&exp.spec, &crate::store::capabilities(&stores), CLUSTER).unwrap();
        let choices = choose_drivers(&plan, &stores, &ctx, &MountEnvironment::default()).unwrap();
        let children = build(&exp, &plan, &stores, &ctx, &choices, &[], now()).unwrap();
        children.run.spec.unwrap().active_deadline_seconds
    };
    let head = "image: python:3.12-slim\nentryScript: train.py\n";
    let mount =
        "scriptParams:\n  - {name: --in, dataReference: {datastore: blob-ds, mode: mount}}\n";
    let download =
        "scriptParams:\n  - {name: --in, dataReference: {datastore: blob-ds, mode: download}}\n";
    // The SAS lives the default deadline and an hour: the Job is stopped at the deadline.
    assert_eq!(
        deadline_of(&format!("{head}{mount}")),
        Some(ctx.default_deadline_seconds)
    );
    assert_eq!(
        deadline_of(&format!("{head}activeDeadlineSeconds: 600\n{mount}")),
        Some(600)
    );
    // Without mounts, no credential outlives the agents' containers: no deadline is imposed.
    assert_eq!(deadline_of(&format!("{head}{download}")), None);
}
