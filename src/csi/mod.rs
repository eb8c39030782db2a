//! `datastore csi-node`: a CSI node plugin serving ephemeral inline volumes from the node's
//! download cache ([`crate::cache`]). A volume is a datastore folder (its location in the
//! volume attributes, its credentials in the `nodePublishSecretRef` Secret); publishing it
//! lists the folder with those credentials, then bind-mounts the cached tree read-only at the
//! pod's target path: at once on a hit, after a verified download on a miss.
//!
//! A download must not hold one kubelet call (each has a bounded time, and the kubelet retries):
//! it runs in the background, and NodePublishVolume answers `Unavailable` (retried, the pod
//! waits in ContainerCreating with the message) until the tree is ready. Node service only: no
//! controller, no staging (`volumeLifecycleModes: [Ephemeral]`).

// tonic's Status is every gRPC handler's error type, large or not.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bpfman_csi::v1 as csi;
use clap::Args;
use tonic::{Request, Response, Status};

use crate::cache::{Cache, Entry};
use metrics::Metrics;

mod metrics;
use crate::error::Error;
use crate::store::azure::Tuning;
use crate::store::{AzureBlobConfig, AzureCredential, BlobClient, Secret, Store};
use crate::transfer::{NoProgress, Options};

/// The driver's name, as the CSIDriver object and the pods' inline volumes name it.
pub const DRIVER: &str = crate::plan::contract::NODE_CACHE_DRIVER;

/// How long a NodePublishVolume waits for its tree before answering `Unavailable`: a hit (a
/// listing) is well within it.
const PUBLISH_WAIT: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct CsiNodeArgs {
    /// Where the kubelet reaches the plugin: `unix:///csi/csi.sock`.
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: String,
    /// This node's name (NodeGetInfo).
    #[arg(long, env = "NODE_NAME")]
    pub node_id: String,
    /// The cache's directory on the node.
    #[arg(
        long,
        env = "DATASTORE_CACHE_DIR",
        default_value = "/var/lib/datastore/cache"
    )]
    pub cache_dir: PathBuf,
    /// How much the cache keeps of trees no pod uses, least recently used out first.
    #[arg(long, default_value = "100Gi", value_parser = size)]
    pub cache_size: u64,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, env = "DATASTORE_HTTP_ADDR", default_value = "0.0.0.0:9810")]
    pub http_addr: std::net::SocketAddr,
}

fn size(value: &str) -> Result<u64, String> {
    crate::quantity::bytes(value).ok_or_else(|| {
        format!("`{value}` is not a size: write a number with a suffix such as 100Gi")
    })
}

/// Runs the plugin until SIGTERM; returns the exit code.
pub async fn run(args: CsiNodeArgs) -> i32 {
    let cache = match Cache::open(&args.cache_dir, args.cache_size) {
        Ok(cache) => cache,
        Err(e) => {
            eprintln!("error: {e}");
            return e.exit_code();
        }
    };
    let Some(socket) = args.endpoint.strip_prefix("unix://") else {
        eprintln!("error: --endpoint {} is not unix:///<path>", args.endpoint);
        return crate::exit::CONFIG;
    };
    let socket = PathBuf::from(socket);
    let _ = std::fs::remove_file(&socket);
    let listener = match tokio::net::UnixListener::bind(&socket) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", socket.display());
            return crate::exit::CONFIG;
        }
    };
    let http = match tokio::net::TcpListener::bind(args.http_addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "error: cannot serve /healthz, /readyz and /metrics on {} ({e}): choose another --http-addr",
                args.http_addr
            );
            return crate::exit::CONFIG;
        }
    };
    let plugin = Plugin::new(cache, args.node_id);
    let stop_http = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::serve::serve(
        http,
        plugin.metrics.clone(),
        stop_http.clone(),
    ));
    let adopted = plugin.adopt_mounts();
    if adopted > 0 {
        tracing::info!(
            adopted,
            "leased the cached trees still mounted from before a restart"
        );
    }
    tracing::info!(socket = %socket.display(), driver = DRIVER, "serving CSI");
    let served = tonic::transport::Server::builder()
        .add_service(csi::identity_server::IdentityServer::new(plugin.clone()))
        .add_service(csi::node_server::NodeServer::new(plugin))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            async {
                crate::signal::interrupted().await;
            },
        )
        .await;
    let _ = std::fs::remove_file(&socket);
    stop_http.cancel();
    match served {
        Ok(()) => crate::exit::SUCCESS,
        Err(e) => {
            eprintln!("error: serving CSI failed: {e}");
            crate::exit::UNREACHABLE
        }
    }
}

/// The plugin's state: the cache, the downloads in flight and the volumes published.
#[derive(Clone)]
pub struct Plugin {
    cache: Arc<Cache>,
    node_id: String,
    /// Per volume: the fetch running in the background (its outcome once it ended).
    fetches: Arc<Mutex<HashMap<String, Fetch>>>,
    /// Per volume: the entry its target shows (leased while published).
    published: Arc<Mutex<HashMap<String, (PathBuf, Entry)>>>,
    /// Per target: the entries of mounts a previous run of the plugin published (found in
    /// the mount table at start), leased until they are unpublished.
    adopted: Arc<Mutex<HashMap<PathBuf, Entry>>>,
    metrics: Arc<Metrics>,
}

/// A fetch in the background: a receiver of its outcome.
/// The outcome is the entry's key (and whether it was a hit), not the entry: the fetch's lease
/// ends with it, so a volume whose pod went away before it was published holds nothing.
type Fetch = tokio::sync::watch::Receiver<Option<Result<(String, bool), String>>>;

impl Plugin {
    pub fn new(cache: Cache, node_id: String) -> Plugin {
        let cache = Arc::new(cache);
        Plugin {
            metrics: Arc::new(Metrics::new(cache.clone())),
            cache,
            node_id,
            fetches: Arc::default(),
            published: Arc::default(),
            adopted: Arc::default(),
        }
    }

    /// Leases the trees that are still mounted from an earlier run of the plugin (a restart
    /// keeps the pods' bind mounts but not the leases), so eviction spares them. Returns how
    /// many.
    pub fn adopt_mounts(&self) -> usize {
        let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return 0;
        };
        let mut adopted = self.adopted.lock().expect("not poisoned");
        for (key, target) in cached_mounts(&table) {
            if let Ok(Some(lease)) = self.cache.lease(&key) {
                adopted.insert(target, lease);
            }
        }
        adopted.len()
    }
}

/// The mounts of cached trees in a mount table (`/proc/self/mountinfo`): each entry's key and
/// where it is mounted. A bind mount's root is the tree's path on its file system, which ends
/// in `entries/<key>/tree` whatever the cache directory is called there.
fn cached_mounts(mountinfo: &str) -> Vec<(String, PathBuf)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let root = fields.nth(3)?;
            let mount_point = fields.next()?;
            let key = root
                .strip_suffix("/tree")?
                .rsplit_once("/entries/")
                .map(|(_, key)| key)?;
            let is_key = key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit());
            // The mount table escapes spaces and the like as octal (`\040`).
            is_key.then(|| (key.to_string(), PathBuf::from(unescape(mount_point))))
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let mut out = Vec::new();
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        if bytes[i] == b'\\'
            && let Some(code) = octal
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Plugin {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        // Node service only: no controller service to announce.
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for Plugin {
    async fn node_stage_volume(
        &self,
        _: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented("no staging: ephemeral volumes only"))
    }

    async fn node_unstage_volume(
        &self,
        _: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented("no staging: ephemeral volumes only"))
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if r.target_path.is_empty() {
            return Err(Status::invalid_argument("target_path is required"));
        }
        let Some(capability) = &r.volume_capability else {
            return Err(Status::invalid_argument("volume_capability is required"));
        };
        if !matches!(
            capability.access_type,
            Some(csi::volume_capability::AccessType::Mount(_))
        ) {
            return Err(Status::invalid_argument(
                "only mount volumes: a cached folder is a directory tree",
            ));
        }
        let target = PathBuf::from(&r.target_path);
        if let Some((published, _)) = self
            .published
            .lock()
            .expect("not poisoned")
            .get(&r.volume_id)
        {
            // Published already: the same target is a repeat; another is not allowed.
            return if *published == target {
                Ok(Response::new(csi::NodePublishVolumeResponse {}))
            } else {
                Err(Status::failed_precondition(format!(
                    "volume {} is published at {} already",
                    r.volume_id,
                    published.display()
                )))
            };
        }
        let folder = Folder::of(&r.volume_context, &r.secrets)?;
        let (fetched, hit) = self.fetched(&r.volume_id, folder).await?;
        // A lease of its own for the published volume: the tree stays while the pod uses it.
        let lease = self
            .cache
            .lease(&fetched)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| {
                Status::unavailable("the cached tree went before it was mounted; retry")
            })?;
        bind_read_only(&lease.path, &target).map_err(|e| {
            Status::internal(format!(
                "cannot mount the cached tree at {}: {e}",
                target.display()
            ))
        })?;
        self.metrics.published(hit, lease.bytes);
        self.published
            .lock()
            .expect("not poisoned")
            .insert(r.volume_id.clone(), (target, lease));
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if r.target_path.is_empty() {
            return Err(Status::invalid_argument("target_path is required"));
        }
        let target = Path::new(&r.target_path);
        unmount(target)
            .map_err(|e| Status::internal(format!("cannot unmount {}: {e}", target.display())))?;
        // Dropping the entry releases its lease: eviction may take the tree now.
        self.published
            .lock()
            .expect("not poisoned")
            .remove(&r.volume_id);
        self.adopted.lock().expect("not poisoned").remove(target);
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        _: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented("no volume stats"))
    }

    async fn node_expand_volume(
        &self,
        _: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented("a cached folder does not expand"))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

impl Plugin {
    /// The cache key of the volume's tree, and whether it was cached before: from a fetch that
    /// ended, else one started (or running) in the background, waited for a little.
    /// `Unavailable` while it runs; an ended fetch is answered once and forgotten, so the
    /// kubelet's retry starts it again.
    async fn fetched(&self, volume: &str, folder: Folder) -> Result<(String, bool), Status> {
        let mut outcome = {
            let mut fetches = self.fetches.lock().expect("not poisoned");
            fetches
                .entry(volume.to_string())
                .or_insert_with(|| {
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    let cache = self.cache.clone();
                    tokio::spawn(async move {
                        let result = folder.fetch(&cache).await;
                        let _ = tx.send(Some(
                            result
                                .map(|entry| (entry.key.clone(), entry.hit))
                                .map_err(|e| format!("{}: {e}", e.reason())),
                        ));
                    });
                    rx
                })
                .clone()
        };
        let ended = tokio::time::timeout(PUBLISH_WAIT, outcome.wait_for(Option::is_some)).await;
        let result = match ended {
            Ok(Ok(value)) => value.clone().expect("waited for it"),
            Ok(Err(_)) => Err("the fetch stopped".to_string()),
            Err(_) => {
                return Err(Status::unavailable(
                    "downloading the folder into the node's cache; the pod starts once it is verified",
                ));
            }
        };
        self.fetches.lock().expect("not poisoned").remove(volume);
        result.map_err(|why| match why.split_once(':').map(|(r, _)| r) {
            Some("AuthFailed") => Status::permission_denied(why),
            Some("NotFound") => Status::not_found(why),
            Some("InvalidConfig") => Status::invalid_argument(why),
            _ => Status::internal(why),
        })
    }
}

/// A datastore folder, as a volume's attributes and Secret say.
struct Folder {
    config: AzureBlobConfig,
    path: String,
}

impl Folder {
    /// `accountName`, `containerName`, `endpoint` (optional), `path`; the Secret's `sasToken`
    /// or `accountKey`.
    fn of(
        attributes: &HashMap<String, String>,
        secrets: &HashMap<String, String>,
    ) -> Result<Folder, Status> {
        let get = |key: &str| {
            attributes
                .get(key)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or_else(|| {
                    Status::invalid_argument(format!("volume attribute {key} is required"))
                })
        };
        let account = get("accountName")?;
        let container = get("containerName")?;
        let endpoint = attributes
            .get("endpoint")
            .filter(|v| !v.is_empty())
            .cloned()
            .unwrap_or_else(|| format!("https://{account}.blob.core.windows.net"));
        let credential = match (secrets.get("sasToken"), secrets.get("accountKey")) {
            (Some(sas), _) => AzureCredential::SasToken(Secret::new(sas)),
            (None, Some(key)) => AzureCredential::AccountKey(Secret::new(key)),
            (None, None) => {
                return Err(Status::invalid_argument(
                    "the volume's Secret (nodePublishSecretRef) holds no sasToken or accountKey",
                ));
            }
        };
        Ok(Folder {
            config: AzureBlobConfig {
                account,
                container,
                endpoint: endpoint.parse().map_err(|e| {
                    Status::invalid_argument(format!("volume attribute endpoint {endpoint:?}: {e}"))
                })?,
                credential,
                credential_source: "the volume's Secret".into(),
                read_only: true,
            },
            path: attributes.get("path").cloned().unwrap_or_default(),
        })
    }

    async fn fetch(self, cache: &Cache) -> Result<Entry, Error> {
        let store = Store::Azure(BlobClient::new(self.config, Tuning::default())?);
        cache
            .fetch(&store, &self.path, Options::default(), Arc::new(NoProgress))
            .await
    }
}

/// Bind-mounts `source` at `target` (created), read-only.
fn bind_read_only(source: &Path, target: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    std::fs::create_dir_all(target)?;
    let c =
        |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other);
    let (src, dst) = (c(source)?, c(target)?);
    let check = |rc: i32| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    unsafe {
        check(libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ))?;
        let remounted = check(libc::mount(
            std::ptr::null(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        ));
        if let Err(e) = remounted {
            libc::umount2(dst.as_ptr(), libc::MNT_DETACH);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts `target` if it is mounted, and removes it; a target already gone is fine.
fn unmount(target: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        // EINVAL: not a mount point; ENOENT: gone.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
            return Err(e);
        }
    }
    match std::fs::remove_dir(target) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounted_cached_trees_are_found_in_the_mount_table() {
        let key = "ab".repeat(32);
        let table = format!(
            "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
             612 29 8:1 /var/lib/datastore/cache/entries/{key}/tree /var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/data/mount ro,relatime shared:1 - ext4 /dev/sda1 rw\n\
             613 29 8:1 /cache/entries/{key}/tree /tmp/a\\040b ro - ext4 /dev/sda1 rw\n\
             614 29 8:1 /cache/entries/not-a-key/tree /tmp/c ro - ext4 /dev/sda1 rw\n"
        );
        assert_eq!(
            cached_mounts(&table),
            [
                (
                    key.clone(),
                    PathBuf::from("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/data/mount")
                ),
                (key, PathBuf::from("/tmp/a b")),
            ]
        );
    }
}
