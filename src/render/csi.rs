//! Inline CSI volumes of the Azure drivers: `blob.csi.azure.com` for Azure Blob containers and
//! `file.csi.azure.com` for Azure Files shares. Pure: a datastore and a mount in, a [`Volume`]
//! out.
//!
//! Every attribute and Secret key rendered here is one of the names the drivers document (the
//! lists below, with where each is documented); a test walks every rendered volume against them.
//! The drivers read attribute names case-insensitively; the spelling here is the documents'.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{CSIVolumeSource, Volume};

use super::RUN_AS_USER;
use crate::store::{AzureBlobConfig, AzureFileConfig};

/// The `volumeAttributes` of `blob.csi.azure.com` the builders may render. Documented in
/// <https://github.com/kubernetes-sigs/blob-csi-driver/blob/master/docs/driver-parameters.md>
/// (`containerName`, `secretName`, `protocol`, `storageAccount`, `server`,
/// `storageEndpointSuffix`), in
/// <https://github.com/kubernetes-sigs/blob-csi-driver/blob/master/docs/workload-identity-static-pv-mount.md>
/// ("option#2: Pod with ephemeral inline volume": `storageAccount`, `containerName`, `clientID`;
/// `mountWithWorkloadIdentityToken`, from driver v1.27.0) and in
/// <https://github.com/kubernetes-sigs/blob-csi-driver/blob/master/deploy/example/nginx-blobfuse-inline-volume.yaml>
/// (`mountOptions` of an inline volume, comma-separated).
pub const BLOB_CSI_ATTRIBUTES: &[&str] = &[
    "containerName",
    "secretName",
    "protocol",
    "mountOptions",
    "storageAccount",
    "server",
    "storageEndpointSuffix",
    "clientID",
    "mountWithWorkloadIdentityToken",
];

/// The keys of the Secret `blob.csi.azure.com` reads (`secretName`), as its
/// `docs/driver-parameters.md` creates it: `kubectl create secret generic azure-secret
/// --from-literal=azurestorageaccountname="xxx" --from-literal azurestorageaccountsastoken="xxx"`.
pub const BLOB_CSI_SECRET_KEYS: &[&str] =
    &["azurestorageaccountname", "azurestorageaccountsastoken"];

/// The `volumeAttributes` of `file.csi.azure.com` the builders may render. Documented in
/// <https://github.com/kubernetes-sigs/azurefile-csi-driver/blob/master/docs/driver-parameters.md>
/// (static provisioning: `shareName`, `secretName`, `folderName`) and in
/// <https://github.com/kubernetes-sigs/azurefile-csi-driver/blob/master/deploy/example/nginx-pod-azurefile-inline-volume.yaml>
/// (`mountOptions` of an inline volume, comma-separated).
pub const FILE_CSI_ATTRIBUTES: &[&str] = &["shareName", "secretName", "folderName", "mountOptions"];

/// The keys of the Secret `file.csi.azure.com` reads (`secretName`), as its
/// `docs/driver-parameters.md` creates it: `--from-literal=azurestorageaccountname="xxx"
/// --from-literal azurestorageaccountkey="xxx"`. An SMB mount needs the account key itself.
pub const FILE_CSI_SECRET_KEYS: &[&str] = &["azurestorageaccountname", "azurestorageaccountkey"];

/// How `blob.csi.azure.com` authenticates the mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobAuth {
    /// The Secret (in the pod's namespace) holding the account name and a SAS token.
    Secret(String),
    /// Workload identity: the driver exchanges the pod's service account token for a storage
    /// token of this client ID (and mounts with that token only, never an account key).
    WorkloadIdentity { client_id: String },
}

/// An inline `blob.csi.azure.com` volume mounting `config`'s container with blobfuse2
/// (`protocol: fuse2`, whose options `--read-only` and `--subdirectory` these are). `Err` is why
/// the driver cannot mount it, for the user.
pub fn blob_volume(
    name: &str,
    config: &AzureBlobConfig,
    subdirectory: &str,
    read_only: bool,
    auth: &BlobAuth,
) -> Result<Volume, String> {
    let mut attributes = BTreeMap::from([
        ("containerName", config.container.clone()),
        ("protocol", "fuse2".to_string()),
    ]);
    attributes.extend(
        blob_endpoint_attributes(config)
            .map_err(|why| format!("{why}; use mountDriver: sidecar"))?,
    );
    match auth {
        BlobAuth::Secret(secret) => {
            attributes.insert("secretName", secret.clone());
        }
        BlobAuth::WorkloadIdentity { client_id } => {
            attributes.insert("storageAccount", config.account.clone());
            attributes.insert("clientID", client_id.clone());
            attributes.insert("mountWithWorkloadIdentityToken", "true".to_string());
        }
    }
    // blobfuse2 runs on the node as root: without allow_other the script (uid 65532) could not
    // open the mount at all.
    let mut options = vec!["-o allow_other".to_string()];
    if read_only {
        options.push("--read-only".to_string());
    }
    if !subdirectory.is_empty() {
        if let Some(why) = unmountable_subdirectory(subdirectory) {
            return Err(format!("{why}; use mountDriver: sidecar"));
        }
        options.push(format!("--subdirectory={subdirectory}"));
    }
    attributes.insert("mountOptions", options.join(","));
    Ok(csi_volume(
        name,
        super::BLOB_CSI_DRIVER,
        read_only,
        attributes,
    ))
}

/// Why `blob.csi.azure.com` cannot mount `config`'s folder `subdirectory`, if it cannot: an
/// endpoint it cannot reach ([`blob_endpoint_attributes`]) or a folder it refuses
/// ([`unmountable_subdirectory`]). Without a suggestion: the caller knows the way out.
pub fn blob_csi_cannot_mount(config: &AzureBlobConfig, subdirectory: &str) -> Option<String> {
    if let Err(why) = blob_endpoint_attributes(config) {
        return Some(why);
    }
    unmountable_subdirectory(subdirectory)
}

/// Why the driver refuses `subdirectory` as blobfuse2's `--subdirectory`: it sanitizes mount
/// option values of inline volumes against `^[a-zA-Z0-9._/-]+$` (kubernetes-sigs/blob-csi-driver
/// `pkg/blob/blob.go`, `SanitizeMountOptions`), and splits options at commas and spaces anyway.
fn unmountable_subdirectory(subdirectory: &str) -> Option<String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-');
    (!subdirectory.is_empty() && !subdirectory.chars().all(allowed)).then(|| {
        format!(
            "the path {subdirectory:?} holds characters the {} driver refuses in a folder to mount (it takes only letters, digits and . _ / -)",
            super::BLOB_CSI_DRIVER
        )
    })
}

/// Where `blob.csi.azure.com` finds the blob service: nothing for the public cloud's
/// `https://<account>.blob.core.windows.net`, `storageEndpointSuffix` for another cloud's
/// `https://<account>.blob.<suffix>`, `server` for any other HTTPS host. The driver always
/// speaks HTTPS to `<server>` and takes no path, so a path-style or plain-HTTP endpoint (Azurite)
/// cannot be mounted by it.
fn blob_endpoint_attributes(
    config: &AzureBlobConfig,
) -> Result<BTreeMap<&'static str, String>, String> {
    let url = &config.endpoint;
    let unreachable = |why: &str| {
        Err(format!(
            "datastore endpoint {url} {why}, and the {} driver reaches storage only as https://<host>",
            super::BLOB_CSI_DRIVER
        ))
    };
    if url.scheme() != "https" {
        return unreachable("is not HTTPS");
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return unreachable("has a path");
    }
    let Some(host) = url.host_str() else {
        return unreachable("has no host");
    };
    let host = host.to_ascii_lowercase();
    let server = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.clone(),
    };
    let prefix = format!("{}.blob.", config.account);
    Ok(match host.strip_prefix(&prefix) {
        Some("core.windows.net") if url.port().is_none() => BTreeMap::new(),
        Some(suffix) if url.port().is_none() && !suffix.is_empty() => {
            BTreeMap::from([("storageEndpointSuffix", suffix.to_string())])
        }
        _ => BTreeMap::from([("server", server)]),
    })
}

/// An inline `file.csi.azure.com` volume mounting `config`'s share (or its folder `folder`)
/// over SMB, authenticated by the Secret `secret` (account name and key). SMB ignores the pod's
/// `fsGroup`: the files belong to [`RUN_AS_USER`] through the mount options.
pub fn file_volume(
    name: &str,
    config: &AzureFileConfig,
    folder: &str,
    read_only: bool,
    secret: &str,
) -> Volume {
    let mut attributes = BTreeMap::from([
        ("shareName", config.share.clone()),
        ("secretName", secret.to_string()),
        ("mountOptions", file_mount_options(read_only)),
    ]);
    if !folder.is_empty() {
        attributes.insert("folderName", folder.to_string());
    }
    csi_volume(name, super::FILE_CSI_DRIVER, read_only, attributes)
}

/// The `mount.cifs` options of a share: owned by the pods' user and group, `ro` when read-only.
pub fn file_mount_options(read_only: bool) -> String {
    let mut options = vec![
        format!("uid={RUN_AS_USER}"),
        format!("gid={RUN_AS_USER}"),
        "dir_mode=0755".to_string(),
        "file_mode=0644".to_string(),
    ];
    if read_only {
        options.push("ro".to_string());
    }
    options.join(",")
}

pub(super) fn csi_volume(
    name: &str,
    driver: &str,
    read_only: bool,
    attributes: BTreeMap<&'static str, String>,
) -> Volume {
    Volume {
        name: name.to_string(),
        csi: Some(CSIVolumeSource {
            driver: driver.to_string(),
            read_only: read_only.then_some(true),
            volume_attributes: Some(
                attributes
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(endpoint: &str) -> AzureBlobConfig {
        crate::store::fixtures::blob("data", endpoint, crate::store::fixtures::key())
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

    #[test]
    fn the_endpoint_reaches_the_driver_as_it_documents() {
        let auth = BlobAuth::Secret("s".into());
        let public = blob_volume(
            "m",
            &blob("https://mlstorage.blob.core.windows.net"),
            "",
            true,
            &auth,
        )
        .unwrap();
        let a = attributes(&public);
        assert!(!a.contains_key("server") && !a.contains_key("storageEndpointSuffix"));
        let china = blob_volume(
            "m",
            &blob("https://mlstorage.blob.core.chinacloudapi.cn/"),
            "",
            true,
            &auth,
        )
        .unwrap();
        assert_eq!(
            attributes(&china)["storageEndpointSuffix"],
            "core.chinacloudapi.cn"
        );
        let private = blob_volume(
            "m",
            &blob("https://mlstorage.privatelink.blob.core.windows.net"),
            "",
            true,
            &auth,
        )
        .unwrap();
        assert_eq!(
            attributes(&private)["server"],
            "mlstorage.privatelink.blob.core.windows.net"
        );
        for endpoint in [
            "http://127.0.0.1:10000/devstoreaccount1",
            "https://azurite.test:10000/devstoreaccount1",
        ] {
            let err = blob_volume("m", &blob(endpoint), "", true, &auth).unwrap_err();
            assert!(err.contains("mountDriver: sidecar"), "{err}");
        }
    }

    #[test]
    fn mount_options_read_only_and_subdirectory() {
        let auth = BlobAuth::Secret("s".into());
        let config = blob("https://mlstorage.blob.core.windows.net");
        let ro = blob_volume("m", &config, "images/train", true, &auth).unwrap();
        assert_eq!(
            attributes(&ro)["mountOptions"],
            "-o allow_other,--read-only,--subdirectory=images/train"
        );
        assert_eq!(ro.csi.as_ref().unwrap().read_only, Some(true));
        let rw = blob_volume("m", &config, "", false, &auth).unwrap();
        assert_eq!(attributes(&rw)["mountOptions"], "-o allow_other");
        assert_eq!(rw.csi.as_ref().unwrap().read_only, None);
        let err = blob_volume("m", &config, "a b", true, &auth).unwrap_err();
        assert!(err.contains("holds characters"), "{err}");
        assert!(blob_volume("m", &config, "a,b", true, &auth).is_err());
        assert!(blob_volume("m", &config, "x_1/y-2.z", true, &auth).is_ok());
        assert_eq!(
            file_mount_options(false),
            "uid=65532,gid=65532,dir_mode=0755,file_mode=0644"
        );
        assert!(file_mount_options(true).ends_with(",ro"));
    }
}
