//! End to end on a real control plane (Kubernetes 1.30 built from Go modules: tests/common/
//! cluster.rs), with the operator installed from `deploy/` (the rendered chart) and `datastore
//! controller` running as the chart's ServiceAccount, against a real Azurite. The real
//! apiserver judges RBAC, admission (Pod Security, OwnerReferencesPermissionEnforcement), the
//! CRDs' schemas and CEL rules; the real Job controller makes the pods, the real scheduler
//! places them and the real garbage collector removes children.
//!
//! No node runs here: pods are created, admitted and found unschedulable, but never run. What
//! a run does is tested by tests/wiring.rs; running pods here is the next step.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::cluster::cluster;
use common::operator::{self, eventually};
use datastore_operator::api::{Datastore, Experiment, limits};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// The operator, installed once for this test binary: the controller's health port.
fn operator() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        // A runtime of its own: the tests' runtimes come and go.
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let token = runtime.block_on(operator::install(cluster(), |_| {}));
            operator::start_controller(
                cluster(),
                &token,
                "controller-0",
                // The sidecar needs an image to be chosen at all (then refused by Pod Security).
                &["--blobfuse-image=registry.example.com/blobfuse2:test"],
            )
            .port
        })
        .join()
        .unwrap()
    })
}

fn admin() -> kube::Client {
    operator();
    cluster().admin()
}

/// A namespace with these labels.
async fn namespace(client: &kube::Client, name: &str, labels: serde_json::Value) {
    common::operator::apply(
        client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}),
    )
    .await;
}

/// A Datastore `blob-ds` in `ns` on a fresh Azurite container, with its account key Secret.
async fn blob_datastore(client: &kube::Client, ns: &str) -> String {
    let container = common::unique_container();
    common::client(&container).create_container().await.unwrap();
    common::operator::apply(
        client,
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "blob-ds-key", "namespace": ns},
                "stringData": {"accountKey": common::KEY}}),
    )
    .await;
    common::operator::apply(
        client,
        &json!({"apiVersion": "datastore.dev/v1alpha1", "kind": "Datastore",
                "metadata": {"name": "blob-ds", "namespace": ns},
                "spec": {"azureBlob": {"accountName": common::ACCOUNT, "containerName": container,
                                       "endpoint": common::endpoint(),
                                       "credentials": {"secretRef": {"name": "blob-ds-key"}}}}}),
    )
    .await;
    container
}

/// The seed's Experiment shape: a download and an upload reference on `datastore`.
fn seed_experiment(ns: &str, name: &str, datastore: &str) -> serde_json::Value {
    json!({
        "apiVersion": "datastore.dev/v1alpha1", "kind": "Experiment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "image": "python:3.12-slim",
            "sourceDirectory": "/app",
            "entryScript": "training_script.py",
            "scriptParams": [
                {"name": "--data_folder", "dataReference": {"datastore": datastore, "path": "data/files", "mode": "download", "pathOnCompute": "training_data"}},
                {"name": "--output_dir", "dataReference": {"datastore": datastore, "path": "outputs/run1", "mode": "upload", "pathOnCompute": "outputs"}},
                {"name": "--regularization", "value": "0.1"},
            ],
        },
    })
}

async fn status_message(api: &Api<Experiment>, name: &str) -> Option<String> {
    api.get(name).await.ok()?.status?.message
}

/// The seed's scenario as far as a cluster without nodes takes it: the controller, with only
/// the chart's RBAC, applies the credentials Secret, the outputs claim and the run Job (owned by
/// the Experiment, blockOwnerDeletion under OwnerReferencesPermissionEnforcement); the Job
/// controller's pod is admitted by Pod Security `restricted`; the scheduler finds no node, and
/// the Experiment's status says so. The Datastore is Ready from a real listing of Azurite.
#[tokio::test(flavor = "multi_thread")]
async fn an_experiment_creates_its_run_on_the_real_apiserver_with_the_charts_rbac() {
    let client = admin();
    let ns = "e2e-seed";
    namespace(
        &client,
        ns,
        json!({"pod-security.kubernetes.io/enforce": "restricted"}),
    )
    .await;
    blob_datastore(&client, ns).await;
    let datastores: Api<Datastore> = Api::namespaced(client.clone(), ns);
    eventually("Datastore blob-ds Ready", WAIT, || {
        let datastores = datastores.clone();
        async move {
            let ds = datastores.get("blob-ds").await.ok()?;
            ds.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True" && c.reason == "Reachable")
                .then_some(())
        }
    })
    .await;

    common::operator::apply(&client, &seed_experiment(ns, "train", "blob-ds")).await;
    let experiments: Api<Experiment> = Api::namespaced(client.clone(), ns);
    let uid = experiments
        .get("train")
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();

    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let run = eventually("Job train-run", WAIT, || {
        let jobs = jobs.clone();
        async move { jobs.get_opt("train-run").await.ok()? }
    })
    .await;
    let owner = &run.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.uid.as_str(), owner.block_owner_deletion),
        (uid.as_str(), Some(true))
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let credentials = secrets.get("train-credentials").await.unwrap();
    assert!(credentials.data.unwrap().contains_key("datastores.yaml"));
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    pvcs.get("train-outputs").await.unwrap();

    // The Job controller made the pod, so Pod Security `restricted` admitted it.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually("the run's pod", WAIT, || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("batch.kubernetes.io/job-name=train-run"))
                .await
                .ok()?;
            (!list.items.is_empty()).then_some(())
        }
    })
    .await;
    let message = eventually("the status says why the pod waits", WAIT, || {
        let experiments = experiments.clone();
        async move {
            let message = status_message(&experiments, "train").await?;
            message.contains("cannot be scheduled").then_some(message)
        }
    })
    .await;
    assert!(
        message.starts_with(
            "waiting for the run's pod to start: the pod cannot be scheduled (Unschedulable)"
        ),
        "{message}"
    );
}

/// A download reference asking for the node cache, in a namespace that enforces `restricted`,
/// where the cluster has the CSIDriver `cache.datastore.dev` (created here as the chart's
/// `nodeCache` creates it): the controller, with only the chart's RBAC, renders the driver's
/// read-only inline volume with the run's read+list SAS Secret as its `nodePublishSecretRef`
/// instead of staging, the pod says why, and Pod Security `restricted` admits the pod (the Job
/// controller made it). No kubelet publishes the volume here: the node plugin's side is
/// tests/csi.rs.
#[tokio::test(flavor = "multi_thread")]
async fn a_cached_download_is_admitted_in_a_restricted_namespace() {
    let client = admin();
    let ns = "e2e-cache";
    namespace(
        &client,
        ns,
        json!({"pod-security.kubernetes.io/enforce": "restricted"}),
    )
    .await;
    common::operator::node_cache_driver(&client).await;
    let container = blob_datastore(&client, ns).await;
    let mut exp = seed_experiment(ns, "cached", "blob-ds");
    exp["spec"]["scriptParams"][0]["dataReference"]["cache"] = json!(true);
    common::operator::apply(&client, &exp).await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = eventually("the run's pod", WAIT, || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("batch.kubernetes.io/job-name=cached-run"))
                .await
                .ok()?;
            list.items.into_iter().next()
        }
    })
    .await;
    let spec = pod.spec.unwrap();
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "cache-0")
        .expect("the cached download's volume");
    let csi = volume.csi.as_ref().unwrap();
    assert_eq!(csi.driver, "cache.datastore.dev");
    assert_eq!(csi.read_only, Some(true));
    let attributes = csi.volume_attributes.clone().unwrap();
    assert_eq!(attributes["containerName"], container);
    assert_eq!(attributes["path"], "data/files");
    let secret = &csi.node_publish_secret_ref.as_ref().unwrap().name;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let sas = secrets.get(secret).await.unwrap().data.unwrap()["sasToken"].clone();
    let sas = String::from_utf8(sas.0).unwrap();
    assert!(sas.contains("sp=rl&"), "read and list only: {sas}");
    assert!(
        spec.volumes.iter().flatten().all(|v| v.name != "staging"),
        "nothing is staged in the pod"
    );
    let annotations = pod.metadata.annotations.unwrap_or_default();
    assert_eq!(
        annotations
            .get("datastore.dev/cache.download-0")
            .map(String::as_str),
        Some("served from the node cache: cache: true on the reference")
    );
}

/// The CRDs' schemas and CEL rules, enforced by the apiserver itself.
#[tokio::test(flavor = "multi_thread")]
async fn the_apiserver_enforces_the_crds_rules() {
    let client = admin();
    let ns = "e2e-cel";
    namespace(&client, ns, json!({})).await;
    let experiments: Api<Experiment> = Api::namespaced(client.clone(), ns);
    let refused = |spec: serde_json::Value| {
        let experiments = experiments.clone();
        async move {
            let object: Experiment = serde_json::from_value(json!({
                "apiVersion": "datastore.dev/v1alpha1", "kind": "Experiment",
                "metadata": {"name": "bad"}, "spec": spec,
            }))
            .unwrap();
            match experiments.create(&PostParams::default(), &object).await {
                Err(kube::Error::Api(status)) => {
                    assert_eq!(status.code, 422, "{status:?}");
                    status.message
                }
                other => panic!("created: {other:?}"),
            }
        }
    };
    let mount = json!({"datastore": "ds", "path": "p", "mode": "mount"});
    let message = refused(json!({
        "image": "i", "entryScript": "t.py", "computeTarget": "local",
        "scriptParams": [{"name": "--d", "dataReference": mount}],
    }))
    .await;
    assert!(
        message.contains(datastore_operator::api::MOUNT_ON_LOCAL),
        "{message}"
    );
    let message = refused(json!({
        "image": "i", "entryScript": "t.py",
        "scriptParams": [{"name": "--a", "value": "1"}, {"name": "--a", "value": "2"}],
    }))
    .await;
    assert!(
        message.contains("scriptParams names must be unique"),
        "{message}"
    );
    let message = refused(json!({
        "image": "i", "entryScript": "t.py", "staging": {"claimName": "c", "size": "1Gi"},
    }))
    .await;
    assert!(
        message.contains("staging.claimName names a volume that exists"),
        "{message}"
    );
    let message = refused(json!({
        "image": "i", "entryScript": "t.py",
        "scriptParams": [{"name": "--d", "dataReference": {"datastore": "ds", "mode": "upload", "cache": true}}],
    }))
    .await;
    assert!(
        message.contains("cache applies to download references only"),
        "{message}"
    );
    let message = refused(json!({"image": "", "entryScript": "t.py"})).await;
    assert!(
        message.contains("image must name a container image"),
        "{message}"
    );
    // Names by Kubernetes' own rule: a `/` would make the controller's lookup a request for a
    // subresource (refused, 403, forever).
    let message = refused(json!({
        "image": "i", "entryScript": "t.py",
        "scriptParams": [{"name": "--d", "dataReference": {"datastore": "team-b/blob-ds", "mode": "download"}}],
    }))
    .await;
    assert!(
        message.contains("spec.scriptParams[0].dataReference.datastore")
            && message.contains(limits::DATASTORE_NAME),
        "{message}"
    );
    let message = refused(json!({
        "image": "i", "entryScript": "t.py", "serviceAccountName": "Trainer_1",
        "staging": {"claimName": "scratch/x"},
    }))
    .await;
    assert!(
        message.contains(limits::SERVICE_ACCOUNT_NAME) && message.contains(limits::CLAIM_NAME),
        "{message}"
    );
    // The 1 MiB value: over what the kernel takes in one argument.
    let message = refused(json!({
        "image": "i", "entryScript": "t.py",
        "scriptParams": [{"name": "--config", "value": "x".repeat(1 << 20)}],
    }))
    .await;
    assert!(
        message.contains("spec.scriptParams[0].value")
            && message.contains("Too long")
            && message.contains(&limits::ARG_MAX_CHARS.to_string()),
        "{message}"
    );
    // Each value within it, all of them together over the command line's limit.
    let params: Vec<serde_json::Value> = (0..40)
        .map(|n| json!({"name": format!("--p{n}"), "value": "x".repeat(30_000)}))
        .collect();
    let message =
        refused(json!({"image": "i", "entryScript": "t.py", "scriptParams": params})).await;
    assert!(message.contains(limits::COMMAND_LINE_MESSAGE), "{message}");
    // A Datastore's Secret too.
    let datastores: Api<Datastore> = Api::namespaced(client.clone(), ns);
    let object: Datastore = serde_json::from_value(json!({
        "apiVersion": "datastore.dev/v1alpha1", "kind": "Datastore", "metadata": {"name": "bad"},
        "spec": {"azureBlob": {"accountName": "mlstorage", "containerName": "data",
                               "credentials": {"secretRef": {"name": "team-b/key"}}}},
    }))
    .unwrap();
    match datastores.create(&PostParams::default(), &object).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains(limits::SECRET_NAME),
                "{}",
                status.message
            );
        }
        other => panic!("created: {other:?}"),
    }
}

/// A mount by the privileged blobfuse2 sidecar in a namespace that enforces `restricted` is
/// refused with the reason, and nothing is created.
#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_mount_in_a_restricted_namespace_is_refused_with_the_reason() {
    let client = admin();
    let ns = "e2e-restricted";
    namespace(
        &client,
        ns,
        json!({"pod-security.kubernetes.io/enforce": "restricted"}),
    )
    .await;
    blob_datastore(&client, ns).await;
    common::operator::apply(
        &client,
        &json!({
            "apiVersion": "datastore.dev/v1alpha1", "kind": "Experiment",
            "metadata": {"name": "mounted", "namespace": ns},
            "spec": {"image": "i", "entryScript": "t.py", "scriptParams": [
                {"name": "--d", "dataReference": {"datastore": "blob-ds", "path": "p", "mode": "mount", "mountDriver": "sidecar"}},
            ]},
        }),
    )
    .await;
    let experiments: Api<Experiment> = Api::namespaced(client.clone(), ns);
    let reason = eventually("the refusal", WAIT, || {
        let experiments = experiments.clone();
        async move {
            let status = experiments.get("mounted").await.ok()?.status?;
            status
                .conditions
                .iter()
                .find(|c| c.type_ == "Accepted" && c.status == "False")
                .map(|c| (c.reason.clone(), c.message.clone()))
        }
    })
    .await;
    assert_eq!(reason.0, "PrivilegedForbidden", "{reason:?}");
    assert!(
        reason.1.contains("namespace e2e-restricted forbids"),
        "{reason:?}"
    );
    let jobs: Api<Job> = Api::namespaced(client, ns);
    assert!(jobs.get_opt("mounted-run").await.unwrap().is_none());
}

/// A ClusterDatastore serves the namespaces its `allowedNamespaces` selects, and refuses the
/// others with the reason; its Secret is read from the operator's namespace.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_datastore_serves_only_the_namespaces_it_allows() {
    let client = admin();
    let container = common::unique_container();
    common::client(&container).create_container().await.unwrap();
    common::operator::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "shared-key", "namespace": common::operator::NAMESPACE},
                "stringData": {"accountKey": common::KEY}}),
    )
    .await;
    common::operator::apply(
        &client,
        &json!({"apiVersion": "datastore.dev/v1alpha1", "kind": "ClusterDatastore",
                "metadata": {"name": "shared-ds"},
                "spec": {"azureBlob": {"accountName": common::ACCOUNT, "containerName": container,
                                       "endpoint": common::endpoint(),
                                       "credentials": {"secretRef": {"name": "shared-key"}}},
                         "allowedNamespaces": {"matchLabels": {"team": "vision"}}}}),
    )
    .await;
    namespace(&client, "e2e-vision", json!({"team": "vision"})).await;
    namespace(&client, "e2e-other", json!({"team": "nlp"})).await;
    for ns in ["e2e-vision", "e2e-other"] {
        common::operator::apply(&client, &seed_experiment(ns, "train", "shared-ds")).await;
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), "e2e-vision");
    eventually("the allowed namespace's run Job", WAIT, || {
        let jobs = jobs.clone();
        async move { jobs.get_opt("train-run").await.ok()? }
    })
    .await;
    let other: Api<Experiment> = Api::namespaced(client.clone(), "e2e-other");
    let refusal = eventually("the refusal", WAIT, || {
        let other = other.clone();
        async move {
            let status = other.get("train").await.ok()?.status?;
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Accepted" && c.status == "False")
        }
    })
    .await;
    assert_eq!(refusal.reason, "DatastoreNotAllowed", "{refusal:?}");
    let jobs: Api<Job> = Api::namespaced(client, "e2e-other");
    assert!(jobs.get_opt("train-run").await.unwrap().is_none());
}

/// Deleting an Experiment removes its children: the real garbage collector follows the owner
/// references the controller set.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_an_experiment_removes_its_children() {
    let client = admin();
    let ns = "e2e-gc";
    namespace(&client, ns, json!({})).await;
    blob_datastore(&client, ns).await;
    common::operator::apply(&client, &seed_experiment(ns, "doomed", "blob-ds")).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    eventually("the children", WAIT, || {
        let (jobs, secrets, pvcs) = (jobs.clone(), secrets.clone(), pvcs.clone());
        async move {
            jobs.get_opt("doomed-run").await.ok()??;
            secrets.get_opt("doomed-credentials").await.ok()??;
            pvcs.get_opt("doomed-outputs").await.ok()??;
            Some(())
        }
    })
    .await;
    let experiments: Api<Experiment> = Api::namespaced(client.clone(), ns);
    experiments
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the children gone", WAIT, || {
        let (jobs, secrets, pvcs) = (jobs.clone(), secrets.clone(), pvcs.clone());
        async move {
            let gone = jobs.get_opt("doomed-run").await.ok()?.is_none()
                && secrets.get_opt("doomed-credentials").await.ok()?.is_none()
                && pvcs.get_opt("doomed-outputs").await.ok()?.is_none();
            gone.then_some(())
        }
    })
    .await;
}

/// The controller holds the chart's Lease in the operator's namespace (leader election through
/// the Role the chart grants).
#[tokio::test(flavor = "multi_thread")]
async fn the_controller_leads_through_the_charts_lease() {
    let client = admin();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client, common::operator::NAMESPACE);
    let holder = eventually("the Lease held", WAIT, || {
        let leases = leases.clone();
        async move {
            leases
                .get("datastore-operator")
                .await
                .ok()?
                .spec?
                .holder_identity
        }
    })
    .await;
    assert_eq!(holder, "controller-0");
}
