//! An Experiment's start: what is created, and the refusals that create nothing (an invalid
//! spec, a missing or disallowed datastore, a name taken by another's Job, a quota or an
//! invalid Job) or leave the experiment alone (being deleted, the local compute target).

use std::sync::Arc;

use datastore_operator::api::{Experiment, Phase};
use datastore_operator::controller::experiment::{ACTIVE_RECHECK, BLOCKED_RECHECK};
use datastore_operator::controller::referencing;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use serde_json::json;

use crate::common;
use crate::common::apiserver::{apply, expect};
use crate::fixtures::*;

#[tokio::test]
async fn creation_applies_the_secret_the_pvc_and_the_run_job() {
    created().await;
}

#[tokio::test]
async fn an_invalid_spec_creates_nothing_and_says_why() {
    // Two references on the same path on compute: a rule the schema cannot check.
    let exp = experiment(
        r#"
image: python:3.12-slim
entryScript: train.py
scriptParams:
  - name: --a
    dataReference: {datastore: blob-ds, path: a, mode: download, pathOnCompute: data}
  - name: --b
    dataReference: {datastore: blob-ds, path: b, mode: download, pathOnCompute: data/b}
"#,
    );
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    script.extend([
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Failed));
            assert_eq!(s.start_time, None);
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", "PathOnComputeClash")
            );
            assert!(
                accepted.message.contains("--a and --b overlap"),
                "{}",
                accepted.message
            );
        }),
        event_about(
            "Warning",
            "PathOnComputeClash",
            "give each a pathOnCompute of its own",
        ),
    ]);
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_missing_datastore_waits_and_the_experiment_starts_when_it_appears() {
    let exp = experiment(EXAMPLE);
    let status = Arc::default();
    let script = vec![
        expect(&format!("GET {RUN}")).not_found(),
        expect(&format!("GET {GROUP}/namespaces/ml/datastores/blob-ds")).not_found(),
        expect(&format!("GET {GROUP}/clusterdatastores/blob-ds")).not_found(),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", "DatastoreNotFound")
            );
            assert!(
                accepted.message.contains("create it"),
                "{}",
                accepted.message
            );
        }),
        event_about(
            "Warning",
            "DatastoreNotFound",
            "parameter --data_folder refers to datastore blob-ds",
        ),
    ];
    let action = reconcile_once(&exp, script).await;
    assert_eq!(
        action,
        Action::requeue(BLOCKED_RECHECK),
        "rechecked on a bounded period"
    );
    let waiting = with_status(exp, written(&status));

    // The datastore appears: the watch maps it to the waiting experiment...
    let (reader, mut writer) = reflector::store::<Experiment>();
    writer.apply_watcher_event(&watcher::Event::Apply(waiting.clone()));
    writer.apply_watcher_event(&watcher::Event::Apply({
        let mut other = experiment("image: x\nentryScript: y.py\n");
        other.metadata.name = Some("unrelated".into());
        other
    }));
    writer.apply_watcher_event(&watcher::Event::Apply({
        let mut code_only = experiment(
            "image: x\nentryScript: y.py\ncode: {datastore: code-ds, path: snapshots/a}\n",
        );
        code_only.metadata.name = Some("code-only".into());
        code_only
    }));
    assert_eq!(
        referencing(&reader, "blob-ds", Some(NS)),
        vec![ObjectRef::new("train").within(NS)]
    );
    // The datastore of the code counts as used too.
    assert_eq!(
        referencing(&reader, "code-ds", Some(NS)),
        vec![ObjectRef::new("code-only").within(NS)]
    );
    assert_eq!(referencing(&reader, "blob-ds", Some("elsewhere")), vec![]);
    assert_eq!(
        referencing(&reader, "blob-ds", None),
        vec![ObjectRef::new("train").within(NS)],
        "a ClusterDatastore of that name"
    );

    // ... and its reconcile creates the run.
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    script.extend([
        apply(CREDENTIALS),
        apply(PVC),
        apply(RUN),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(accepted.status, "True");
        }),
        event_about("Normal", "Created", "created Job train-run"),
    ]);
    let action = reconcile_once(&waiting, script).await;
    assert_eq!(action, Action::requeue(ACTIVE_RECHECK));
}

#[tokio::test]
async fn a_cluster_datastore_refuses_namespaces_its_selector_does_not_allow() {
    let exp = experiment(EXAMPLE);
    let status = Arc::default();
    let script = vec![
        expect(&format!("GET {RUN}")).not_found(),
        expect(&format!("GET {GROUP}/namespaces/ml/datastores/blob-ds")).not_found(),
        expect(&format!("GET {GROUP}/clusterdatastores/blob-ds")).ok(cluster_datastore(
            json!({"matchLabels": {"team": "vision"}}),
        )),
        expect("GET /api/v1/namespaces/ml").ok(namespace(json!({"team": "nlp"}))),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", "DatastoreNotAllowed")
            );
            assert!(
                accepted.message.contains("does not select namespace ml"),
                "{}",
                accepted.message
            );
        }),
        event_about("Warning", "DatastoreNotAllowed", "ClusterDatastore blob-ds"),
    ];
    // No Secret of the operator's namespace is read, nothing is created.
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::requeue(BLOCKED_RECHECK));
}

#[tokio::test]
async fn a_cluster_datastore_serves_the_namespaces_it_allows_without_copying_its_key() {
    let exp = experiment(EXAMPLE);
    let status = Arc::default();
    let script =
        vec![
        expect(&format!("GET {RUN}")).not_found(),
        expect(&format!("GET {GROUP}/namespaces/ml/datastores/blob-ds")).not_found(),
        expect(&format!("GET {GROUP}/clusterdatastores/blob-ds")).ok(cluster_datastore(json!({
            "matchExpressions": [{"key": "team", "operator": "In", "values": ["vision", "nlp"]}]
        }))),
        expect("GET /api/v1/namespaces/ml").ok(namespace(json!({"team": "nlp"}))),
        expect(&format!("GET /api/v1/namespaces/{OPERATOR_NS}/secrets/shared-key"))
            .ok(secret(OPERATOR_NS, "shared-key", "accountKey", ACCOUNT_KEY)),
        apply(CREDENTIALS).body(|secret| {
            assert_eq!(secret["metadata"]["namespace"], NS);
            let file = &common::secret_values(secret)["datastores.yaml"];
            assert!(!file.contains(ACCOUNT_KEY), "{file}");
            assert!(file.contains("containerName: datasets"), "{file}");
        }),
        apply(PVC),
        apply(RUN),
        status_patch(&status, |s| assert_eq!(s.phase, Some(Phase::Pending))),
        event_about("Normal", "Created", "created Job train-run"),
    ];
    reconcile_once(&exp, script).await;
}

#[tokio::test]
async fn a_leftover_job_of_a_deleted_namesake_is_neither_followed_nor_adopted() {
    // `kubectl delete exp train && kubectl apply -f train.yaml`: the old Job (another uid)
    // may still be there, Complete. It must not pass for this Experiment's run.
    let exp = experiment(EXAMPLE);
    let mut leftover = job("train-run", condition("Complete", "Completed"));
    leftover["metadata"]["ownerReferences"][0]["uid"] = json!("uid-of-the-deleted-one");
    let status = Arc::default();
    let script = vec![
        expect(&format!("GET {RUN}")).ok(leftover),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", "NameConflict")
            );
        }),
        event_about(
            "Warning",
            "NameConflict",
            "does not belong to this Experiment",
        ),
    ];
    let action = reconcile_once(&exp, script).await;
    assert_eq!(
        action,
        Action::requeue(BLOCKED_RECHECK),
        "it goes away with the garbage collector"
    );
}

#[tokio::test]
async fn an_experiment_being_deleted_creates_nothing() {
    let mut exp = experiment(EXAMPLE);
    exp.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1_790_000_000).unwrap(),
    ));
    assert_eq!(reconcile_once(&exp, vec![]).await, Action::await_change());
}

#[tokio::test]
async fn a_local_experiment_is_left_to_datastore_run() {
    let mut exp = experiment(EXAMPLE);
    exp.spec.compute_target = datastore_operator::api::ComputeTarget::Local;
    let status = Arc::default();
    let script = vec![
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            assert!(s.message.as_deref().unwrap().contains("datastore run"));
        }),
        event_about("Normal", "LocalComputeTarget", "datastore run"),
    ];
    assert_eq!(reconcile_once(&exp, script).await, Action::await_change());
}

/// A quota (or the operator's RBAC) refusing an object is the cluster's to fix, not the spec's:
/// what the start applied is deleted again, and the experiment waits, tried again with
/// backoff, the reason in its status.
#[tokio::test]
async fn a_quota_refusing_the_run_waits_and_retries_from_nothing() {
    let exp = experiment(EXAMPLE);
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    let (code, body) = refused(
        403,
        "Forbidden",
        "persistentvolumeclaims \"train-outputs\" is forbidden: exceeded quota: storage, requested: requests.storage=10Gi",
    );
    script.extend([
        apply(CREDENTIALS),
        apply(PVC).reply(code, body),
        // The Secret this start applied goes again; no Job is applied.
        deleted(CREDENTIALS),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            assert!(s.completion_time.is_none());
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", "QuotaExceeded")
            );
            assert!(
                accepted.message.contains("exceeded quota"),
                "{}",
                accepted.message
            );
            assert!(
                accepted.message.contains("tried again"),
                "{}",
                accepted.message
            );
        }),
        event_about("Warning", "QuotaExceeded", "exceeded quota"),
    ]);
    assert_eq!(
        reconcile_once(&exp, script).await,
        Action::requeue(datastore_operator::controller::experiment::REFUSED_RETRY_MIN)
    );
}

/// An object the apiserver finds invalid is the spec's to fix: Failed (InvalidJob) until the
/// spec changes, and what the start applied is deleted so that the next start can apply a
/// claim of another size or class (an unbound claim is immutable).
#[tokio::test]
async fn an_invalid_run_job_is_reported_and_what_was_applied_goes() {
    let exp = experiment(EXAMPLE);
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    let (code, body) = refused(
        422,
        "Invalid",
        "Job.batch \"train-run\" is invalid: spec.template.spec.tolerations[0].operator: Invalid value",
    );
    script.extend([
        apply(CREDENTIALS),
        apply(PVC),
        apply(RUN).reply(code, body),
        deleted(CREDENTIALS),
        deleted(PVC),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Failed));
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", "InvalidJob")
            );
            assert!(
                accepted.message.contains("tolerations"),
                "{}",
                accepted.message
            );
        }),
        event_about("Warning", "InvalidJob", "is invalid"),
    ]);
    assert_eq!(reconcile_once(&exp, script).await, Action::await_change());
}

/// An Experiment stored before the CRD checked names (or applied around it): a datastore name
/// with a `/` is refused by the spec alone, and nothing is looked up (the lookup would have
/// asked for a subresource of Datastore team-b and been refused, 403, forever).
#[tokio::test]
async fn a_datastore_name_with_a_slash_is_refused_without_a_lookup() {
    let exp = experiment(&EXAMPLE.replace("datastore: blob-ds", "datastore: team-b/blob-ds"));
    let status = Arc::default();
    let script = vec![
        expect(&format!("GET {RUN}")).not_found(),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Failed));
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", "InvalidDatastoreName")
            );
            assert!(
                accepted.message.starts_with(
                    "parameter --data_folder refers to datastore \"team-b/blob-ds\", which is not a name a datastore can have: datastore must be the name of a Datastore"
                ),
                "{}",
                accepted.message
            );
        }),
        event_about("Warning", "InvalidDatastoreName", "no namespace/ prefix"),
    ];
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::await_change());
}

/// A pass that keeps failing (here the Secret read, refused) says so: after the second failure
/// in a row, the status (phase, message, a Reconciled condition) and a Warning event carry the
/// apiserver's own answer; the third, with the same cause, writes nothing.
#[tokio::test]
async fn a_reconcile_that_keeps_failing_says_why_in_the_status_and_an_event() {
    let refused = || {
        vec![
            expect(&format!("GET {RUN}")).not_found(),
            expect(&format!("GET {GROUP}/namespaces/ml/datastores/blob-ds"))
                .ok(blob_datastore(NS, "blob-ds")),
            expect("GET /api/v1/namespaces/ml/secrets/mlstorage-key").reply(
                http::StatusCode::FORBIDDEN,
                json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": FORBIDDEN, "reason": "Forbidden",
                    "details": {"name": "mlstorage-key", "kind": "secrets"}, "code": 403,
                }),
            ),
        ]
    };
    const FORBIDDEN: &str = "secrets \"mlstorage-key\" is forbidden: User \"system:serviceaccount:datastore-operator:datastore-operator\" cannot get resource \"secrets\" in API group \"\" in the namespace \"ml\"";
    let status = Arc::default();
    let mut script = refused();
    script.extend(refused());
    script.extend([
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            let failing = s
                .conditions
                .iter()
                .find(|c| c.type_ == "Reconciled")
                .expect("a Reconciled condition");
            assert_eq!(
                (failing.status.as_str(), failing.reason.as_str()),
                ("False", "KubeForbidden")
            );
            let expected = format!(
                "the controller cannot reconcile this Experiment and retries every 30s: the Kubernetes API answered 403 Forbidden: {FORBIDDEN}"
            );
            assert_eq!(failing.message, expected);
            assert_eq!(s.message.as_deref(), Some(expected.as_str()));
        }),
        event_about("Warning", "KubeForbidden", "cannot get resource \"secrets\""),
    ]);
    let third = refused();
    let exp = experiment(EXAMPLE);
    let (client, server) = common::apiserver::start_as_controller(
        script.into_iter().chain(third).collect(),
        OPERATOR_NS,
    );
    let ctx = context(client, Default::default());
    let pass = |exp: Experiment| {
        datastore_operator::controller::experiment::reconcile(Arc::new(exp), ctx.clone())
    };
    for n in 1..=2 {
        let error = pass(exp.clone()).await.expect_err("the pass fails");
        assert_eq!(error.reason(), "KubeForbidden", "pass {n}");
    }
    // The third pass sees the status the second wrote: the same cause is not written again.
    let failing = with_status(exp, written(&status));
    pass(failing).await.expect_err("the pass fails");
    drop(ctx);
    server.done().await;
}
