//! The Kubernetes API calls the controller process makes, as RBAC rules: the ground truth of
//! the Helm chart's ClusterRole and Role (tests/chart.rs fails when they differ in any verb,
//! resource or name, or use a wildcard).
//!
//! Derived from the code, not from habit:
//! - a kube `Controller` (its main resource, `owns`, `watches`) lists and watches;
//! - `Api::get_opt`/`get` is `get`; `Api::list` is `list`;
//! - server-side apply (`Patch::Apply`) is `patch`, and when it creates the object also
//!   `create`: the apiserver authorizes the request as `patch`, then the creation as `create`
//!   (apiserver `endpoints/handlers/patch.go`, `createAuthorizerAttributes`) — see
//!   [`apply_creates`];
//! - an owner reference with `blockOwnerDeletion: true` needs `update` on the owner's
//!   `finalizers` subresource where the OwnerReferencesPermissionEnforcement admission plugin is
//!   on (kubernetes/kubernetes#49133);
//! - `patch_status` is `patch` on the `<resource>/status` subresource;
//! - kube's event `Recorder` creates `events.k8s.io` events and patches a repeated one;
//! - leader election (`kube-lease-manager`) gets, creates and patches one Lease;
//! - a `get` of a cluster-scoped object by a fixed name is limited to that name.
//!
//! A change that calls the API in a new way adds its rule here and in the chart's templates
//! (`charts/datastore-operator/templates/clusterrole.yaml`, `role.yaml`).

/// Where a rule is granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every namespace, and cluster-scoped resources: the chart's ClusterRole.
    Cluster,
    /// Only the operator's own namespace: the chart's Role.
    OperatorNamespace,
}

/// One RBAC rule: `verbs` on `resource` (with its subresource, `experiments/status`) of API
/// group `group` (`""` is the core group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub scope: Scope,
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// `resourceNames`: the only objects the rule grants; empty for any.
    pub names: &'static [&'static str],
    /// Which code makes these calls.
    pub why: &'static str,
}

/// The name of the leader-election Lease, in the operator's namespace.
pub use super::leader::LEASE_NAME;

use crate::plan::contract::NODE_CACHE_DRIVER;
use crate::render::{BLOB_CSI_DRIVER, FILE_CSI_DRIVER};

const fn cluster(
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
    why: &'static str,
) -> Rule {
    Rule {
        scope: Scope::Cluster,
        group,
        resource,
        verbs,
        names: &[],
        why,
    }
}

/// Every call the controller process makes, and nothing more.
pub const RULES: &[Rule] = &[
    cluster(
        "datastore.dev",
        "experiments",
        &["list", "watch"],
        "the Experiment controller's watch; the start-up check that the CRDs exist lists one",
    ),
    cluster(
        "datastore.dev",
        "experiments/finalizers",
        &["update"],
        "every child names its Experiment as owner with blockOwnerDeletion, which the OwnerReferencesPermissionEnforcement admission plugin allows only to who may update the owner's finalizers",
    ),
    cluster(
        "datastore.dev",
        "experiments/status",
        &["patch"],
        "an Experiment's status, written by server-side apply (apply_status)",
    ),
    cluster(
        "datastore.dev",
        "datastores",
        &["get", "list", "watch"],
        "watched by the readiness controller and to wake the Experiments that wait for one; read by name when resolving a reference (store::resolve::find)",
    ),
    cluster(
        "datastore.dev",
        "datastores/status",
        &["patch"],
        "a Datastore's Ready condition",
    ),
    cluster(
        "datastore.dev",
        "clusterdatastores",
        &["get", "list", "watch"],
        "as datastores, for the cluster-wide ones",
    ),
    cluster(
        "datastore.dev",
        "clusterdatastores/status",
        &["patch"],
        "a ClusterDatastore's Ready condition",
    ),
    cluster(
        "batch",
        "jobs",
        &["get", "list", "watch", "create", "patch"],
        "the run and upload Jobs: applied (an apply that creates needs create too), read by name, watched (ours only, by label)",
    ),
    cluster(
        "",
        "pods",
        &["list", "watch", "delete"],
        "the pods of those Jobs (by label): progress, download reports, failures; deleted once the outputs are uploaded, so that the outputs claim they name can go",
    ),
    cluster(
        "",
        "pods/log",
        &["get"],
        "the newest lines of a running agent container's log (its progress line), at most once per --progress-period per transferring Experiment: status.progress",
    ),
    cluster(
        "",
        "secrets",
        &["get", "create", "patch", "delete"],
        "get: a datastore's credentials Secret; create/patch: the per-Experiment Secrets, applied; delete: those of a start the cluster refused",
    ),
    cluster(
        "",
        "persistentvolumeclaims",
        &["create", "patch", "delete"],
        "the outputs volume: applied with the run, deleted once its outputs are uploaded (or when the cluster refused the start)",
    ),
    cluster(
        "",
        "namespaces",
        &["get"],
        "the Experiment namespace's labels: a ClusterDatastore's allowedNamespaces is matched against them; its Pod Security level (pod-security.kubernetes.io/enforce) decides whether a mount may use the privileged blobfuse2 sidecar",
    ),
    Rule {
        scope: Scope::Cluster,
        group: "storage.k8s.io",
        resource: "csidrivers",
        verbs: &["get"],
        names: &[BLOB_CSI_DRIVER, FILE_CSI_DRIVER, NODE_CACHE_DRIVER],
        why: "whether the cluster has the Azure Blob and Azure Files CSI drivers decides (and records) how a mount reference is mounted, and whether it has the node cache's, whether a download reference asking for it is served from it; read by name when an Experiment with mounts, an Azure Files datastore or such a download starts",
    },
    cluster(
        "",
        "events",
        &["list"],
        "why a Job's pod does not start: the Warning events about the pod (FailedMount, FailedScheduling) or, without a pod, the Job (FailedCreate: a quota, Pod Security)",
    ),
    cluster(
        "events.k8s.io",
        "events",
        &["create", "patch"],
        "kube's event Recorder: an event per Experiment step, a repeated one patched into a series",
    ),
    Rule {
        scope: Scope::OperatorNamespace,
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create"],
        names: &[],
        why: "leader election: the first replica creates the Lease (a create cannot be limited to a name)",
    },
    Rule {
        scope: Scope::OperatorNamespace,
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "patch"],
        names: &[LEASE_NAME],
        why: "leader election: the Lease is read, renewed, and taken over when it expires",
    },
];

/// One API request as RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub verb: &'static str,
    pub group: String,
    /// With its subresource: `experiments/status`.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// What RBAC checks for `method` on `path` (no scheme or host) with `query` (without `?`);
/// `None` for a path that is not a resource (`/version`, discovery).
pub fn access(method: &str, path: &str, query: &str) -> Option<Access> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        // `/api/v1/namespaces/ml` is the Namespace `ml` itself.
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name, sub) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(name.to_string()), None),
        [resource, name, sub] => (*resource, Some(name.to_string()), Some(*sub)),
        _ => return None,
    };
    let watch = query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    let verb = match (method, name.is_some()) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    Some(Access {
        verb,
        group: group.to_string(),
        resource: match sub {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_string(),
        },
        namespace,
        name,
    })
}

/// The second access an apply (a PATCH with `application/apply-patch+yaml`) of `path` needs when
/// the object does not exist yet and the apply creates it: `create` on the same resource and
/// name (apiserver `endpoints/handlers/patch.go`: `createAuthorizerAttributes`). `None` for a
/// subresource (applying `status` never creates) or a path that is not an object.
pub fn apply_creates(path: &str) -> Option<Access> {
    let access = access("PATCH", path, "")?;
    if access.resource.contains('/') || access.name.is_none() {
        return None;
    }
    Some(Access {
        verb: "create",
        ..access
    })
}

/// Whether [`RULES`] grant `access` to the controller running in `operator_namespace`.
pub fn allows(access: &Access, operator_namespace: &str) -> bool {
    RULES.iter().any(|rule| {
        let in_scope = match rule.scope {
            Scope::Cluster => true,
            Scope::OperatorNamespace => access.namespace.as_deref() == Some(operator_namespace),
        };
        in_scope
            && rule.group == access.group
            && rule.resource == access.resource
            && rule.verbs.contains(&access.verb)
            && (rule.names.is_empty()
                || access
                    .name
                    .as_deref()
                    .is_some_and(|n| rule.names.contains(&n)))
    })
}

/// Fails, saying what is missing, when RULES do not grant the request: for mocked-apiserver
/// tests, so that a new call without its rule fails a test rather than a cluster.
pub fn check(
    method: &str,
    path: &str,
    query: &str,
    operator_namespace: &str,
) -> Result<(), String> {
    match access(method, path, query) {
        None => Ok(()),
        Some(a) => refused(&a, operator_namespace, &format!("{method} {path}"), query),
    }
}

/// [`check`] for a server-side apply of `path` that creates the object: it needs `patch` (the
/// request) and `create` (the creation).
pub fn check_apply_create(path: &str, query: &str, operator_namespace: &str) -> Result<(), String> {
    check("PATCH", path, query, operator_namespace)?;
    match apply_creates(path) {
        None => Ok(()),
        Some(a) => refused(
            &a,
            operator_namespace,
            &format!("an apply creating {path}"),
            query,
        ),
    }
}

fn refused(a: &Access, operator_namespace: &str, request: &str, query: &str) -> Result<(), String> {
    if allows(a, operator_namespace) {
        return Ok(());
    }
    Err(format!(
        "{request}{}{query} needs `{}` on {}{} (group \"{}\"), which RULES in src/controller/rbac.rs do not grant: add the rule there and to the chart's templates",
        if query.is_empty() { "" } else { "?" },
        a.verb,
        a.resource,
        a.namespace
            .as_ref()
            .map(|ns| format!(" in namespace {ns}"))
            .unwrap_or_default(),
        a.group
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPS: &str = "datastore-operator";

    fn allowed(method: &str, path: &str, query: &str) -> bool {
        check(method, path, query, OPS).is_ok()
    }

    #[test]
    fn requests_map_to_their_verbs() {
        let a = access("GET", "/apis/batch/v1/namespaces/ml/jobs/train-run", "").unwrap();
        assert_eq!(
            a,
            Access {
                verb: "get",
                group: "batch".into(),
                resource: "jobs".into(),
                namespace: Some("ml".into()),
                name: Some("train-run".into()),
            }
        );
        let verb = |m, p, q| access(m, p, q).unwrap().verb;
        assert_eq!(verb("GET", "/api/v1/pods", "labelSelector=a%3Db"), "list");
        assert_eq!(
            verb("GET", "/api/v1/pods", "watch=true&resourceVersion=1"),
            "watch"
        );
        assert_eq!(
            verb("POST", "/apis/events.k8s.io/v1/namespaces/ml/events", ""),
            "create"
        );
        assert_eq!(
            verb(
                "DELETE",
                "/api/v1/namespaces/ml/persistentvolumeclaims/o",
                ""
            ),
            "delete"
        );
        assert_eq!(
            verb("DELETE", "/api/v1/namespaces/ml/pods", ""),
            "deletecollection"
        );
        let status = access(
            "PATCH",
            "/apis/datastore.dev/v1alpha1/clusterdatastores/blob-ds/status",
            "fieldManager=datastore-operator&force=true",
        )
        .unwrap();
        assert_eq!(
            (status.verb, status.resource.as_str()),
            ("patch", "clusterdatastores/status")
        );
        assert_eq!(status.namespace, None);
        let ns = access("GET", "/api/v1/namespaces/ml", "").unwrap();
        assert_eq!(
            (ns.resource.as_str(), ns.name.as_deref()),
            ("namespaces", Some("ml"))
        );
        assert_eq!(access("GET", "/version", ""), None);
    }

    #[test]
    fn what_the_controller_does_is_allowed() {
        for (method, path, query) in [
            ("GET", "/apis/datastore.dev/v1alpha1/experiments", "limit=1"),
            (
                "GET",
                "/apis/datastore.dev/v1alpha1/experiments",
                "watch=true",
            ),
            (
                "PATCH",
                "/apis/datastore.dev/v1alpha1/namespaces/ml/experiments/e/status",
                "",
            ),
            (
                "GET",
                "/apis/datastore.dev/v1alpha1/namespaces/ml/datastores/blob-ds",
                "",
            ),
            (
                "GET",
                "/apis/datastore.dev/v1alpha1/clusterdatastores/blob-ds",
                "",
            ),
            ("GET", "/apis/batch/v1/namespaces/ml/jobs/e-run", ""),
            (
                "PATCH",
                "/apis/batch/v1/namespaces/ml/jobs/e-run",
                "fieldManager=x",
            ),
            ("GET", "/api/v1/namespaces/ml/pods", "labelSelector=x"),
            (
                "GET",
                "/api/v1/namespaces/ml/pods/train-run-x/log",
                "container=download-0&tailLines=5",
            ),
            ("GET", "/api/v1/namespaces/ml/secrets/ds-key", ""),
            (
                "GET",
                "/api/v1/namespaces/datastore-operator/secrets/shared-key",
                "",
            ),
            ("PATCH", "/api/v1/namespaces/ml/secrets/e-credentials", ""),
            (
                "PATCH",
                "/api/v1/namespaces/ml/persistentvolumeclaims/e-outputs",
                "",
            ),
            (
                "DELETE",
                "/api/v1/namespaces/ml/persistentvolumeclaims/e-outputs",
                "",
            ),
            ("GET", "/api/v1/namespaces/ml", ""),
            (
                "GET",
                "/apis/storage.k8s.io/v1/csidrivers/blob.csi.azure.com",
                "",
            ),
            (
                "GET",
                "/apis/storage.k8s.io/v1/csidrivers/file.csi.azure.com",
                "",
            ),
            (
                "GET",
                "/apis/storage.k8s.io/v1/csidrivers/cache.datastore.dev",
                "",
            ),
            ("POST", "/apis/events.k8s.io/v1/namespaces/ml/events", ""),
            (
                "PATCH",
                "/apis/events.k8s.io/v1/namespaces/ml/events/e.1",
                "",
            ),
            (
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/datastore-operator/leases",
                "",
            ),
            (
                "GET",
                "/apis/coordination.k8s.io/v1/namespaces/datastore-operator/leases/datastore-operator",
                "",
            ),
            (
                "PATCH",
                "/apis/coordination.k8s.io/v1/namespaces/datastore-operator/leases/datastore-operator",
                "",
            ),
        ] {
            assert!(
                allowed(method, path, query),
                "{:?}",
                check(method, path, query, OPS)
            );
        }
    }

    #[test]
    fn what_it_never_does_is_refused() {
        for (method, path) in [
            // Replacing Jobs, deleting Jobs, reading pods one by one, listing secrets.
            ("PUT", "/apis/batch/v1/namespaces/ml/jobs/e-run"),
            ("DELETE", "/apis/batch/v1/namespaces/ml/jobs/e-run"),
            ("GET", "/api/v1/namespaces/ml/pods/p"),
            ("GET", "/api/v1/namespaces/ml/secrets"),
            (
                "PUT",
                "/apis/datastore.dev/v1alpha1/namespaces/ml/experiments/e",
            ),
            (
                "PATCH",
                "/apis/datastore.dev/v1alpha1/namespaces/ml/experiments/e",
            ),
            ("POST", "/api/v1/namespaces/ml/events"),
            // CSIDrivers: only the two Azure ones, only read.
            ("GET", "/apis/storage.k8s.io/v1/csidrivers"),
            (
                "GET",
                "/apis/storage.k8s.io/v1/csidrivers/disk.csi.azure.com",
            ),
            (
                "PATCH",
                "/apis/storage.k8s.io/v1/csidrivers/blob.csi.azure.com",
            ),
            // Namespaces: read one, never list or change.
            ("GET", "/api/v1/namespaces"),
            ("PATCH", "/api/v1/namespaces/ml"),
            // Leases only in the operator's namespace, and only its own by name.
            (
                "GET",
                "/apis/coordination.k8s.io/v1/namespaces/ml/leases/datastore-operator",
            ),
            (
                "PATCH",
                "/apis/coordination.k8s.io/v1/namespaces/datastore-operator/leases/other",
            ),
            (
                "DELETE",
                "/apis/coordination.k8s.io/v1/namespaces/datastore-operator/leases/datastore-operator",
            ),
        ] {
            let refused = check(method, path, "", OPS);
            assert!(refused.is_err(), "{method} {path} should be refused");
        }
        let message =
            check("DELETE", "/apis/batch/v1/namespaces/ml/jobs/e-run", "", OPS).unwrap_err();
        assert!(
            message.contains("`delete` on jobs in namespace ml"),
            "{message}"
        );
    }

    /// What the first reconcile of an Experiment does on a real apiserver: each apply creates
    /// its object, which is authorized as `patch` and then as `create`.
    #[test]
    fn applies_that_create_are_allowed() {
        for path in [
            "/api/v1/namespaces/ml/secrets/e-credentials",
            "/api/v1/namespaces/ml/secrets/e-mount-0",
            "/api/v1/namespaces/ml/persistentvolumeclaims/e-outputs",
            "/apis/batch/v1/namespaces/ml/jobs/e-run",
            "/apis/batch/v1/namespaces/ml/jobs/e-upload",
        ] {
            let q = "fieldManager=datastore-operator&force=true";
            assert_eq!(check_apply_create(path, q, OPS), Ok(()), "{path}");
        }
        let create = apply_creates("/apis/batch/v1/namespaces/ml/jobs/e-run").unwrap();
        assert_eq!(
            (
                create.verb,
                create.resource.as_str(),
                create.name.as_deref()
            ),
            ("create", "jobs", Some("e-run"))
        );
        // A status is applied to an object that exists: never a create.
        assert_eq!(
            apply_creates("/apis/datastore.dev/v1alpha1/namespaces/ml/experiments/e/status"),
            None
        );
    }

    /// blockOwnerDeletion on every child's owner reference (OwnerReferencesPermissionEnforcement).
    #[test]
    fn owner_references_that_block_deletion_are_allowed() {
        assert!(allowed(
            "PUT",
            "/apis/datastore.dev/v1alpha1/namespaces/ml/experiments/e/finalizers",
            ""
        ));
    }

    #[test]
    fn rules_are_explicit_and_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for rule in RULES {
            for field in [rule.group, rule.resource]
                .iter()
                .chain(rule.verbs)
                .chain(rule.names)
            {
                assert!(!field.contains('*'), "no wildcards: {rule:?}");
            }
            assert!(!rule.verbs.is_empty() && !rule.why.is_empty(), "{rule:?}");
            let key = (rule.scope, rule.group, rule.resource, rule.names);
            assert!(
                seen.insert(key),
                "one rule per resource and names: {rule:?}"
            );
        }
    }
}
