//! The node plugin's metrics, served with `/healthz` and `/readyz` on `--http-addr`
//! ([`crate::serve`]): volumes published from the cache (hits) and after a download (misses),
//! their bytes, and what the cache holds when scraped.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::cache::Cache;

pub struct Metrics {
    registry: Registry,
    hits: Counter,
    misses: Counter,
    hit_bytes: Counter,
    downloaded_bytes: Counter,
    size: Gauge,
    entries: Gauge,
    cache: Arc<Cache>,
}

impl Metrics {
    pub fn new(cache: Arc<Cache>) -> Metrics {
        let mut registry = Registry::default();
        let (hits, misses) = (Counter::default(), Counter::default());
        registry.register(
            "datastore_node_cache_hits",
            "Volumes published from a tree the node had cached already",
            hits.clone(),
        );
        registry.register(
            "datastore_node_cache_misses",
            "Volumes published after the node downloaded their folder into the cache",
            misses.clone(),
        );
        let (hit_bytes, downloaded_bytes) = (Counter::default(), Counter::default());
        registry.register_with_unit(
            "datastore_node_cache_hit",
            "Bytes of the trees published from the cache (not downloaded)",
            Unit::Bytes,
            hit_bytes.clone(),
        );
        registry.register_with_unit(
            "datastore_node_cache_downloaded",
            "Bytes downloaded into the cache for published volumes",
            Unit::Bytes,
            downloaded_bytes.clone(),
        );
        let (size, entries) = (Gauge::default(), Gauge::default());
        registry.register_with_unit(
            "datastore_node_cache_size",
            "Bytes of the cached trees, in use or not",
            Unit::Bytes,
            size.clone(),
        );
        registry.register(
            "datastore_node_cache_entries",
            "Cached trees",
            entries.clone(),
        );
        Metrics {
            registry,
            hits,
            misses,
            hit_bytes,
            downloaded_bytes,
            size,
            entries,
            cache,
        }
    }

    /// A volume of `bytes` was published: from the cache (`hit`) or after a download.
    pub fn published(&self, hit: bool, bytes: u64) {
        if hit {
            self.hits.inc();
            self.hit_bytes.inc_by(bytes);
        } else {
            self.misses.inc();
            self.downloaded_bytes.inc_by(bytes);
        }
    }
}

impl crate::serve::Endpoints for Metrics {
    /// Serving CSI is all it does: ready while it runs.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    fn metrics(&self) -> String {
        let (entries, bytes) = self.cache.usage();
        self.entries.set(entries as i64);
        self.size.set(bytes as i64);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
