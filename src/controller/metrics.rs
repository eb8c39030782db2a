//! The operator's Prometheus metrics, served on `/metrics` (OpenMetrics text).
//!
//! - `datastore_reconciles_total{controller}`: reconciles run (experiment, datastore,
//!   clusterdatastore);
//! - `datastore_reconcile_failures_total{controller,reason}`: reconciles that failed, by the
//!   kind of error (a bounded set: see [`ReconcileError::reason`](super::ReconcileError::reason));
//! - `datastore_reconcile_duration_seconds{controller}`: how long reconciles took;
//! - `datastore_experiments{phase}`: Experiments by phase, counted from the leader's watch cache
//!   at each scrape (a standby replica has no cache and reports none);
//! - `datastore_downloaded_bytes_total`, `datastore_uploaded_bytes_total`: bytes the Experiments'
//!   agents moved, as this process recorded them (new `status.inputs`, upload reports);
//! - `datastore_leader`: 1 while this replica holds the leader Lease (or runs without leader
//!   election), else 0.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

use super::ReconcileError;
use crate::api::{Experiment, ExperimentStatus, Phase};

/// Reconcile durations are mostly API round trips; datastore checks can take seconds.
const DURATION_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `controller` label's values.
pub const CONTROLLERS: [&str; 3] = ["experiment", "datastore", "clusterdatastore"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabel {
    controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    controller: &'static str,
    reason: &'static str,
}

/// Every metric of the process, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabel, Counter>,
    failures: Family<FailureLabels, Counter>,
    durations: Family<ControllerLabel, Histogram>,
    downloaded: Counter,
    uploaded: Counter,
    leader: Gauge,
    experiments: std::sync::Arc<ExperimentsByPhase>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let reconciles = Family::<ControllerLabel, Counter>::default();
        registry.register(
            "datastore_reconciles",
            "Reconciles run, by controller",
            reconciles.clone(),
        );
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "datastore_reconcile_failures",
            "Reconciles that failed (and are retried), by controller and kind of error",
            failures.clone(),
        );
        let durations = Family::<ControllerLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(DURATION_BUCKETS)) as fn() -> Histogram,
        );
        registry.register_with_unit(
            "datastore_reconcile_duration",
            "How long reconciles took, by controller",
            Unit::Seconds,
            durations.clone(),
        );
        let downloaded = Counter::default();
        registry.register_with_unit(
            "datastore_downloaded",
            "Bytes the download agents delivered to runs, from the inputs recorded in Experiment status",
            Unit::Bytes,
            downloaded.clone(),
        );
        let uploaded = Counter::default();
        registry.register_with_unit(
            "datastore_uploaded",
            "Bytes the upload agents wrote to datastores, from their reports",
            Unit::Bytes,
            uploaded.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "datastore_leader",
            "Whether this replica runs the controllers (holds the leader Lease): 1 or 0",
            leader.clone(),
        );
        let experiments = std::sync::Arc::new(ExperimentsByPhase::default());
        registry.register_collector(Box::new(experiments.clone()));
        // A family is exposed once it has a series: start every controller's at zero, so that
        // dashboards and alerts see the names before the first reconcile.
        for controller in CONTROLLERS {
            let _ = reconciles.get_or_create(&ControllerLabel { controller });
            let _ = durations.get_or_create(&ControllerLabel { controller });
        }
        Metrics {
            registry,
            reconciles,
            failures,
            durations,
            downloaded,
            uploaded,
            leader,
            experiments,
        }
    }

    /// Records one reconcile of `controller` that took `elapsed` and ended in `error`, if any.
    pub fn reconciled(
        &self,
        controller: &'static str,
        elapsed: Duration,
        error: Option<&ReconcileError>,
    ) {
        let label = ControllerLabel { controller };
        self.reconciles.get_or_create(&label).inc();
        self.durations
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        if let Some(error) = error {
            self.failures
                .get_or_create(&FailureLabels {
                    controller,
                    reason: error.reason().as_str(),
                })
                .inc();
        }
    }

    /// Called after an Experiment's status went from `before` to `after`: counts the bytes of
    /// the inputs recorded by this write.
    pub fn status_written(&self, before: &ExperimentStatus, after: &ExperimentStatus) {
        let bytes = |s: &ExperimentStatus| s.inputs.iter().map(|i| i.bytes.max(0) as u64).sum();
        let (before, after): (u64, u64) = (bytes(before), bytes(after));
        self.downloaded.inc_by(after.saturating_sub(before));
    }

    /// Counts the bytes an upload Job reported.
    pub fn uploaded(&self, bytes: u64) {
        self.uploaded.inc_by(bytes);
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Counts Experiments by phase from `store` at each scrape (`None`: report none).
    pub fn watch_experiments(&self, store: Option<Store<Experiment>>) {
        *self.experiments.store.lock().expect("not poisoned") = store;
    }

    /// The exposition, OpenMetrics text ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// The bytes the upload agents of these pods reported (the newest pod's).
pub fn uploaded_bytes(pods: &[Pod]) -> u64 {
    super::experiment::progress::upload_totals(pods).bytes
}

/// `datastore_experiments{phase}`, read from the Experiment controller's cache when scraped.
#[derive(Debug, Default)]
struct ExperimentsByPhase {
    store: Mutex<Option<Store<Experiment>>>,
}

struct Experiments;

impl TypedMetric for Experiments {
    const TYPE: MetricType = MetricType::Gauge;
}

const PHASES: [Phase; 6] = [
    Phase::Pending,
    Phase::Downloading,
    Phase::Running,
    Phase::Uploading,
    Phase::Succeeded,
    Phase::Failed,
];

impl Collector for ExperimentsByPhase {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(store) = self.store.lock().expect("not poisoned").clone() else {
            return Ok(());
        };
        let mut counts = [0i64; PHASES.len()];
        for exp in store.state() {
            // Not reconciled yet: it waits, as Pending ones do.
            let phase = exp
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .unwrap_or(Phase::Pending);
            if let Some(i) = PHASES.iter().position(|p| *p == phase) {
                counts[i] += 1;
            }
        }
        let mut family = encoder.encode_descriptor(
            "datastore_experiments",
            "Experiments by phase, from the leader's watch cache",
            None,
            Experiments::TYPE,
        )?;
        for (phase, n) in PHASES.iter().zip(counts) {
            let phase = format!("{phase:?}");
            let labels = [("phase", phase.as_str())];
            ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ExperimentSpec, InputRecord};
    use kube::runtime::reflector;
    use kube::runtime::watcher;

    fn input(bytes: i64) -> InputRecord {
        InputRecord {
            bytes,
            ..Default::default()
        }
    }

    fn experiment(name: &str, phase: Option<Phase>) -> Experiment {
        let spec: ExperimentSpec =
            serde_saphyr::from_str("image: python:3.12-slim\nentryScript: train.py\n").unwrap();
        let mut exp = Experiment::new(name, spec);
        exp.metadata.namespace = Some("ml".to_string());
        exp.status = phase.map(|phase| ExperimentStatus {
            phase: Some(phase),
            ..Default::default()
        });
        exp
    }

    /// The sample lines (no comments) of the exposition, for exact comparisons.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn a_fresh_registry_describes_every_metric_and_ends_in_eof() {
        let text = Metrics::new().encode();
        for line in [
            "# TYPE datastore_reconciles counter",
            "# TYPE datastore_reconcile_duration_seconds histogram",
            "# UNIT datastore_reconcile_duration_seconds seconds",
            "# TYPE datastore_downloaded_bytes counter",
            "# TYPE datastore_uploaded_bytes counter",
            "# TYPE datastore_leader gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        let lines = samples(&text);
        for controller in CONTROLLERS {
            let want = format!(r#"datastore_reconciles_total{{controller="{controller}"}} 0"#);
            assert!(lines.contains(&want.as_str()), "{want} missing in\n{text}");
            let want = format!(
                r#"datastore_reconcile_duration_seconds_count{{controller="{controller}"}} 0"#
            );
            assert!(lines.contains(&want.as_str()), "{want} missing in\n{text}");
        }
        for want in [
            "datastore_downloaded_bytes_total 0",
            "datastore_uploaded_bytes_total 0",
            "datastore_leader 0",
        ] {
            assert!(lines.contains(&want), "{want} missing in\n{text}");
        }
        // No failure yet: no series, so no family either.
        assert!(!text.contains("datastore_reconcile_failures"), "{text}");
    }

    #[test]
    fn reconciles_failures_and_durations_are_counted_per_controller() {
        let metrics = Metrics::new();
        metrics.reconciled("experiment", Duration::from_millis(30), None);
        let error = ReconcileError::Resolve(crate::error::Error::Auth("no".into()));
        metrics.reconciled("experiment", Duration::from_millis(2), Some(&error));
        metrics.reconciled("datastore", Duration::from_secs(20), None);
        let text = metrics.encode();
        let lines = samples(&text);
        for want in [
            r#"datastore_reconciles_total{controller="experiment"} 2"#,
            r#"datastore_reconciles_total{controller="datastore"} 1"#,
            r#"datastore_reconcile_failures_total{controller="experiment",reason="AuthFailed"} 1"#,
            r#"datastore_reconcile_duration_seconds_count{controller="experiment"} 2"#,
            r#"datastore_reconcile_duration_seconds_bucket{le="0.005",controller="experiment"} 1"#,
            r#"datastore_reconcile_duration_seconds_bucket{le="0.05",controller="experiment"} 2"#,
            r#"datastore_reconcile_duration_seconds_bucket{le="10.0",controller="datastore"} 0"#,
            r#"datastore_reconcile_duration_seconds_bucket{le="+Inf",controller="datastore"} 1"#,
        ] {
            assert!(lines.contains(&want), "{want} missing in\n{text}");
        }
        assert!(
            !text.contains(r#"datastore_reconcile_failures_total{controller="datastore""#),
            "{text}"
        );
        assert!(text.contains("# TYPE datastore_reconcile_failures counter"));
    }

    #[test]
    fn downloaded_bytes_count_only_newly_recorded_inputs() {
        let metrics = Metrics::new();
        let none = ExperimentStatus::default();
        let one = ExperimentStatus {
            inputs: vec![input(100)],
            ..Default::default()
        };
        let two = ExperimentStatus {
            inputs: vec![input(100), input(23)],
            ..Default::default()
        };
        metrics.status_written(&none, &one);
        metrics.status_written(&one, &two);
        // A phase change that keeps the record counts nothing again.
        metrics.status_written(&two, &two);
        metrics.uploaded(7);
        let text = metrics.encode();
        assert!(
            samples(&text).contains(&"datastore_downloaded_bytes_total 123"),
            "{text}"
        );
        assert!(
            samples(&text).contains(&"datastore_uploaded_bytes_total 7"),
            "{text}"
        );
    }

    #[test]
    fn experiments_are_counted_by_phase_from_the_cache_and_leader_is_a_gauge() {
        let metrics = Metrics::new();
        let (store, mut writer) = reflector::store::<Experiment>();
        for exp in [
            experiment("a", Some(Phase::Running)),
            experiment("b", Some(Phase::Running)),
            experiment("c", Some(Phase::Failed)),
            experiment("d", None),
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(exp));
        }
        metrics.watch_experiments(Some(store));
        metrics.set_leader(true);
        let text = metrics.encode();
        let lines = samples(&text);
        for want in [
            r#"datastore_experiments{phase="Pending"} 1"#,
            r#"datastore_experiments{phase="Downloading"} 0"#,
            r#"datastore_experiments{phase="Running"} 2"#,
            r#"datastore_experiments{phase="Uploading"} 0"#,
            r#"datastore_experiments{phase="Succeeded"} 0"#,
            r#"datastore_experiments{phase="Failed"} 1"#,
            "datastore_leader 1",
        ] {
            assert!(lines.contains(&want), "{want} missing in\n{text}");
        }
        assert!(
            text.contains("# TYPE datastore_experiments gauge"),
            "{text}"
        );
        metrics.watch_experiments(None);
        assert!(!metrics.encode().contains("datastore_experiments"));
    }

    #[test]
    fn uploaded_bytes_come_from_the_newest_pods_reports() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "creationTimestamp": "2030-01-01T00:00:00Z"},
            "status": {"containerStatuses": [
                {"name": "upload-0", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 0, "message": "{\"uploaded\":2,\"skipped\":0,\"bytes\":300}"}}},
                {"name": "upload-1", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 0, "message": "{\"uploaded\":1,\"skipped\":1,\"bytes\":45}"}}},
                {"name": "other", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 0, "message": "not a report"}}}
            ]}
        }))
        .unwrap();
        assert_eq!(uploaded_bytes(&[pod]), 345);
        assert_eq!(uploaded_bytes(&[]), 0);
    }
}
