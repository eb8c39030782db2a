//! The blobfuse2 native sidecar: an init container with `restartPolicy: Always` that mounts an
//! Azure Blob container into an emptyDir shared with `main`, and the blobfuse2 config it reads.
//!
//! The config's keys are blobfuse2's documented ones
//! (<https://github.com/Azure/azure-storage-fuse/blob/main/setup/baseConfig.yaml>); the command is
//! `blobfuse2 mount <dir> --config-file=<file> --foreground` (`cmd/mount.go` there).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ExecAction, Lifecycle, LifecycleHandler, Probe, ResourceRequirements,
    SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::store::AzureBlobConfig;

/// Where the sidecar mounts the container: the root of the emptyDir it shares with `main`.
pub const SIDECAR_MOUNT_DIR: &str = "/mnt/blobfuse";
/// Where the sidecar finds its config (the Secret `<exp>-mount-<n>`).
pub const SIDECAR_CONFIG_DIR: &str = "/etc/blobfuse2";
/// The key of the config in the sidecar's Secret.
pub const CONFIG_KEY: &str = "config.yaml";

/// blobfuse2's block size here, in MiB (its default).
pub const BLOCK_SIZE_MB: u64 = 16;
/// Blocks read ahead per file: the least blobfuse2 accepts when prefetching at all ("Min - 11").
pub const PREFETCH: u64 = 11;
/// What the blobfuse2 process itself needs beside its block cache, at the least (MiB).
pub const MIN_PROCESS_MB: u64 = 48;
/// The least memory limit the sidecar is given (MiB); the operator refuses less.
pub const MIN_MEMORY_MB: u64 = 64;

/// The `block_cache` section: a memory-only cache (no disk `path`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockCache {
    pub block_size_mb: u64,
    pub mem_size_mb: u64,
    /// Blocks read ahead per file; 0 turns read-ahead off.
    pub prefetch: u64,
    /// Parallel download/upload workers.
    pub parallelism: u64,
}

/// The block cache for a sidecar whose memory limit is `limit_bytes`: a quarter of the limit (at
/// least [`MIN_PROCESS_MB`]) is left to the process, the rest holds whole blocks. The largest
/// block size (16 MiB down to 1 MiB) that still gives two files their [`PREFETCH`] blocks is
/// used; below that, read-ahead is off. The cache is always smaller than the limit.
pub fn block_cache(limit_bytes: u64) -> BlockCache {
    let limit_mb = limit_bytes >> 20;
    let budget = limit_mb.saturating_sub((limit_mb / 4).max(MIN_PROCESS_MB));
    for block in [BLOCK_SIZE_MB, 8, 4, 2, 1] {
        let blocks = budget / block;
        if blocks >= 2 * PREFETCH {
            return BlockCache {
                block_size_mb: block,
                mem_size_mb: blocks * block,
                prefetch: PREFETCH,
                parallelism: blocks.min(32),
            };
        }
    }
    BlockCache {
        block_size_mb: 1,
        mem_size_mb: budget.max(1),
        prefetch: 0,
        parallelism: budget.clamp(1, 8),
    }
}

/// Bytes of a Kubernetes memory quantity (`512Mi`, `1Gi`, `1.5Gi`, `2G`, `1073741824`).
pub fn memory_bytes(quantity: &Quantity) -> Result<u64> {
    crate::quantity::bytes(&quantity.0).ok_or_else(|| {
        Error::Config(format!(
            "the blobfuse2 sidecar's memory limit {:?} is not a quantity of memory such as 512Mi or 2Gi",
            quantity.0.trim()
        ))
    })
}

/// The blobfuse2 config of one mount, authenticated by a SAS token.
pub struct Blobfuse2<'a> {
    pub store: &'a AzureBlobConfig,
    /// The folder of the container to mount (`""`: all of it).
    pub subdirectory: &'a str,
    pub read_only: bool,
    /// A SAS token for the container, with or without its leading `?`.
    pub sas: &'a str,
    pub cache: BlockCache,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ConfigFile<'a> {
    /// The script runs as 65532, blobfuse2 as root.
    allow_other: bool,
    read_only: bool,
    logging: Logging,
    components: [&'static str; 4],
    // Component sections keep their component's name (snake case).
    #[serde(rename = "block_cache")]
    block_cache: BlockCache,
    #[serde(rename = "attr_cache")]
    attr_cache: AttrCache,
    azstorage: AzStorage<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Logging {
    #[serde(rename = "type")]
    kind: &'static str,
    level: &'static str,
    file_path: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct AttrCache {
    timeout_sec: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct AzStorage<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    account_name: &'a str,
    container: &'a str,
    endpoint: &'a str,
    mode: &'static str,
    sas: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    subdirectory: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    use_http: bool,
}

/// The config file (YAML). Logs go to the container's stderr (the `base` logger writing to
/// `/dev/stderr`): there is no syslog in a container. Attributes are cached for 2 h on a
/// read-only mount (the data does not change under a training run), 2 min (blobfuse2's default)
/// on a read-write one.
pub fn config_yaml(config: &Blobfuse2) -> String {
    let endpoint = config.store.endpoint.as_str().trim_end_matches('/');
    let file = ConfigFile {
        allow_other: true,
        read_only: config.read_only,
        logging: Logging {
            kind: "base",
            level: "log_warning",
            file_path: "/dev/stderr",
        },
        components: ["libfuse", "block_cache", "attr_cache", "azstorage"],
        block_cache: config.cache,
        attr_cache: AttrCache {
            timeout_sec: if config.read_only { 7200 } else { 120 },
        },
        azstorage: AzStorage {
            kind: "block",
            account_name: &config.store.account,
            container: &config.store.container,
            endpoint,
            mode: "sas",
            sas: config.sas.trim_start_matches('?'),
            subdirectory: config.subdirectory,
            use_http: config.store.endpoint.scheme() == "http",
        },
    };
    crate::yaml::to_string(&file)
}

/// The sidecar `mount-<n>`: blobfuse2 in the foreground, privileged (a FUSE mount propagated out
/// of its container needs it; this container alone overrides the pod's restricted context),
/// started before `main` (a native sidecar's startup probe holds the next containers until the
/// mount is in `/proc/mounts`), unmounting on the way out.
pub fn sidecar(
    name: &str,
    image: &str,
    volume: &str,
    config_volume: &str,
    memory: &Quantity,
    cpu: &Quantity,
) -> Container {
    let resources = |cpu: &Quantity| {
        BTreeMap::from([
            ("cpu".to_string(), cpu.clone()),
            ("memory".to_string(), memory.clone()),
        ])
    };
    Container {
        name: name.to_string(),
        image: Some(image.to_string()),
        command: Some(vec!["blobfuse2".to_string()]),
        args: Some(vec![
            "mount".to_string(),
            SIDECAR_MOUNT_DIR.to_string(),
            format!("--config-file={SIDECAR_CONFIG_DIR}/{CONFIG_KEY}"),
            "--foreground".to_string(),
        ]),
        restart_policy: Some("Always".to_string()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: volume.to_string(),
                mount_path: SIDECAR_MOUNT_DIR.to_string(),
                mount_propagation: Some("Bidirectional".to_string()),
                ..Default::default()
            },
            VolumeMount {
                name: config_volume.to_string(),
                mount_path: SIDECAR_CONFIG_DIR.to_string(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        // Memory requested as limited: the block cache is sized to use it.
        resources: Some(ResourceRequirements {
            requests: Some(resources(&Quantity(super::SIDECAR_CPU_REQUEST.to_string()))),
            limits: Some(resources(cpu)),
            ..Default::default()
        }),
        startup_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![
                    "grep".to_string(),
                    "-qF".to_string(),
                    format!(" {SIDECAR_MOUNT_DIR} fuse"),
                    "/proc/mounts".to_string(),
                ]),
            }),
            period_seconds: Some(1),
            failure_threshold: Some(120),
            ..Default::default()
        }),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "fusermount3".to_string(),
                        "-u".to_string(),
                        SIDECAR_MOUNT_DIR.to_string(),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            privileged: Some(true),
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: u64 = 1 << 20;

    fn store(endpoint: &str) -> AzureBlobConfig {
        crate::store::fixtures::blob("data", endpoint, crate::store::fixtures::key())
    }

    #[test]
    fn the_cache_stays_under_the_limit_and_leaves_room_for_the_process() {
        for (limit, quantity) in [
            (64 * MI, "64Mi"),
            (300 * MI, "300Mi"),
            (512 * MI, "512Mi"),
            (1 << 30, "1Gi"),
            (4 << 30, "4Gi"),
            (2_000_000_000, "2G"),
        ] {
            assert_eq!(memory_bytes(&Quantity(quantity.into())).unwrap(), limit);
            let cache = block_cache(limit);
            let limit_mb = limit / MI;
            assert!(
                cache.mem_size_mb + MIN_PROCESS_MB <= limit_mb,
                "{quantity}: {cache:?}"
            );
            assert!(
                cache.mem_size_mb * 4 <= limit_mb * 3,
                "{quantity}: {cache:?}"
            );
            assert_eq!(cache.mem_size_mb % cache.block_size_mb, 0, "{quantity}");
            if cache.prefetch > 0 {
                assert!(
                    cache.mem_size_mb >= 2 * cache.prefetch * cache.block_size_mb,
                    "{quantity}: {cache:?}"
                );
            }
        }
        assert_eq!(
            block_cache(1 << 30),
            BlockCache {
                block_size_mb: 16,
                mem_size_mb: 768,
                prefetch: 11,
                parallelism: 32
            }
        );
        assert_eq!(block_cache(512 * MI).mem_size_mb, 384);
        assert_eq!(block_cache(4 << 30).mem_size_mb, 3072);
        assert_eq!(block_cache(300 * MI).block_size_mb, 8);
        assert_eq!(block_cache(64 * MI).prefetch, 0);
        assert!(memory_bytes(&Quantity("1.5Gi".into())).unwrap() == 3 << 29);
        assert!(memory_bytes(&Quantity("500m".into())).is_err());
        assert!(memory_bytes(&Quantity("lots".into())).is_err());
    }

    #[test]
    fn the_config_carries_account_container_folder_auth_and_cache() {
        let store = store("https://mlstorage.blob.core.windows.net/");
        let yaml = config_yaml(&Blobfuse2 {
            store: &store,
            subdirectory: "images/train",
            read_only: true,
            sas: "?sv=2024&sp=rl&sig=abc",
            cache: block_cache(1 << 30),
        });
        let v: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
        let az = &v["azstorage"];
        assert_eq!(az["account-name"], "mlstorage");
        assert_eq!(az["container"], "data");
        assert_eq!(az["endpoint"], "https://mlstorage.blob.core.windows.net");
        assert_eq!(az["mode"], "sas");
        assert_eq!(az["sas"], "sv=2024&sp=rl&sig=abc");
        assert_eq!(az["subdirectory"], "images/train");
        assert_eq!(az["type"], "block");
        assert!(az.get("use-http").is_none() && az.get("account-key").is_none());
        assert_eq!(v["read-only"], true);
        assert_eq!(v["allow-other"], true);
        assert_eq!(
            v["components"],
            serde_saphyr::from_str::<serde_json::Value>(
                "[libfuse, block_cache, attr_cache, azstorage]"
            )
            .unwrap()
        );
        assert_eq!(v["block_cache"]["block-size-mb"], 16);
        assert_eq!(v["block_cache"]["mem-size-mb"], 768);
        assert_eq!(v["block_cache"]["prefetch"], 11);
        assert!(v["block_cache"].get("path").is_none(), "memory only");
        assert_eq!(v["attr_cache"]["timeout-sec"], 7200);
        assert_eq!(v["logging"]["type"], "base");
        assert_eq!(v["logging"]["file-path"], "/dev/stderr");

        let azurite = self::store("http://127.0.0.1:10000/devstoreaccount1");
        let yaml = config_yaml(&Blobfuse2 {
            store: &azurite,
            subdirectory: "",
            read_only: false,
            sas: "sv=1",
            cache: block_cache(512 * MI),
        });
        let v: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(v["read-only"], false);
        assert_eq!(
            v["azstorage"]["endpoint"],
            "http://127.0.0.1:10000/devstoreaccount1"
        );
        assert_eq!(v["azstorage"]["use-http"], true);
        assert!(v["azstorage"].get("subdirectory").is_none());
        assert_eq!(v["attr_cache"]["timeout-sec"], 120);
        assert_eq!(v["block_cache"]["mem-size-mb"], 384);
    }
}
