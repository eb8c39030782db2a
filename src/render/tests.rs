use std::path::PathBuf;

use super::*;
use crate::api::ExperimentSpec;
use crate::plan::{CLUSTER, plan};
use crate::store::resolve::{Catalog, Scope};
use crate::store::sas;
use crate::store::{AzureBlobConfig, Secret as Hidden};

const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const UID: &str = "0f6b5a3e-1111-2222-3333-444455556666";

fn experiment(yaml: &str) -> Experiment {
    let spec: ExperimentSpec = serde_saphyr::from_str(yaml).unwrap();
    let mut exp = Experiment::new("train-iris", spec);
    exp.metadata.namespace = Some("ml".to_string());
    exp.metadata.uid = Some(UID.to_string());
    exp
}

const EXAMPLE: &str = r#"
image: python:3.12-slim
sourceDirectory: /app/experiment_folder
entryScript: training_script.py
activeDeadlineSeconds: 7200
backoffLimit: 2
serviceAccountName: trainer
nodeSelector: {agentpool: gpu}
tolerations: [{key: sku, operator: Equal, value: gpu, effect: NoSchedule}]
env: [{name: EPOCHS, value: "3"}]
resources: {limits: {cpu: "2"}}
scriptParams:
  - name: --data_folder
    dataReference: {datastore: blob-ds, path: data/files, mode: download, pathOnCompute: training_data}
  - name: --labels
    dataReference: {datastore: public-ds, path: labels, mode: download}
  - name: --output_dir
    dataReference: {datastore: blob-ds, path: outputs/run1, mode: upload, pathOnCompute: outputs}
  - name: --regularization
    value: "0.1"
"#;

fn azure(name: &str, credential: AzureCredential) -> (String, StoreConfig) {
    (
        name.to_string(),
        StoreConfig::AzureBlob(AzureBlobConfig {
            account: "devstoreaccount1".to_string(),
            container: "data".to_string(),
            endpoint: url::Url::parse("http://127.0.0.1:10000/devstoreaccount1").unwrap(),
            credential,
            credential_source: format!("Secret ml/{name}-credentials"),
            read_only: false,
        }),
    )
}

fn datastores() -> BTreeMap<String, StoreConfig> {
    BTreeMap::from([
        azure(
            "blob-ds",
            AzureCredential::AccountKey(Hidden::new(KEY.to_string())),
        ),
        azure("public-ds", AzureCredential::Anonymous),
    ])
}

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn children(yaml: &str) -> (Experiment, ExecutionPlan, Children) {
    let exp = experiment(yaml);
    let stores = datastores();
    let plan = plan(&exp.spec, &crate::store::capabilities(&stores), CLUSTER).unwrap();
    let children = build_default(&exp, &plan, &stores).unwrap();
    (exp, plan, children)
}

/// Every child, with the operator's defaults, no mounts and nothing cached.
fn build_default(
    exp: &Experiment,
    plan: &ExecutionPlan,
    stores: &BTreeMap<String, StoreConfig>,
) -> Result<Children> {
    build(exp, plan, stores, &BuildContext::default(), &[], &[], now())
}

fn check_meta(meta: &ObjectMeta, name: &str) {
    assert_eq!(meta.name.as_deref(), Some(name));
    assert_eq!(meta.namespace.as_deref(), Some("ml"));
    let labels = meta.labels.as_ref().unwrap();
    assert_eq!(labels[EXPERIMENT_LABEL], "train-iris");
    assert_eq!(labels[MANAGED_BY_LABEL], "datastore-operator");
    let owners = meta.owner_references.as_ref().unwrap();
    assert_eq!(owners.len(), 1);
    let owner = &owners[0];
    assert_eq!(owner.api_version, "datastore.dev/v1alpha1");
    assert_eq!(owner.kind, "Experiment");
    assert_eq!(owner.name, "train-iris");
    assert_eq!(owner.uid, UID);
    assert_eq!(owner.controller, Some(true));
    assert_eq!(owner.block_owner_deletion, Some(true));
}

fn pod(job: &Job) -> &PodSpec {
    job.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn mounts(c: &Container) -> Vec<(String, String, Option<String>, bool)> {
    c.volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            (
                m.name.clone(),
                m.mount_path.clone(),
                m.sub_path.clone(),
                m.read_only == Some(true),
            )
        })
        .collect()
}

fn check_restricted(pod: &PodSpec) {
    let ps = pod.security_context.as_ref().unwrap();
    assert_eq!(ps.run_as_non_root, Some(true));
    assert_eq!(ps.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_string()]),
            "{}",
            c.name
        );
        assert!(sc.privileged.is_none() && sc.capabilities.as_ref().unwrap().add.is_none());
        if c.name != "main" {
            assert_eq!(sc.run_as_user, Some(RUN_AS_USER), "{}", c.name);
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
        }
    }
}

#[test]
fn every_child_is_labelled_and_owned_by_the_experiment() {
    let (_, _, c) = children(EXAMPLE);
    check_meta(
        &c.credentials.as_ref().unwrap().metadata,
        "train-iris-credentials",
    );
    check_meta(&c.outputs.as_ref().unwrap().metadata, "train-iris-outputs");
    check_meta(&c.run.metadata, "train-iris-run");
    check_meta(&c.upload.as_ref().unwrap().metadata, "train-iris-upload");
    for job in [&c.run, c.upload.as_ref().unwrap()] {
        let template_labels = job
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap();
        assert_eq!(
            template_labels.labels.as_ref().unwrap()[EXPERIMENT_LABEL],
            "train-iris"
        );
    }
}

#[test]
fn run_job_downloads_each_reference_in_its_own_init_container() {
    let (_, plan, c) = children(EXAMPLE);
    let spec = c.run.spec.as_ref().unwrap();
    assert_eq!(spec.backoff_limit, Some(2));
    assert_eq!(spec.active_deadline_seconds, Some(7200));
    let pod = pod(&c.run);
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.service_account_name.as_deref(), Some("trainer"));
    assert_eq!(pod.node_selector.as_ref().unwrap()["agentpool"], "gpu");
    assert_eq!(pod.tolerations.as_ref().unwrap().len(), 1);
    check_restricted(pod);

    let inits = pod.init_containers.as_ref().unwrap();
    assert_eq!(inits.len(), 2);
    assert_eq!(inits[0].name, "download-0");
    assert_eq!(inits[0].image.as_deref(), Some(DEFAULT_AGENT_IMAGE));
    assert_eq!(inits[0].command, Some(vec!["/datastore".to_string()]));
    assert_eq!(
        inits[0].args.as_ref().unwrap(),
        &[
            "agent",
            "download",
            "--datastores",
            "/etc/datastore/datastores.yaml",
            "--datastore",
            "blob-ds",
            "--retry-budget",
            "5m",
            "--path",
            "data/files",
            "--target",
            "/mnt/datastore/training_data",
            "--report",
            "/dev/termination-log",
            "--staging-dir",
            "/mnt/.staging",
            "--staging-size",
            "10Gi"
        ]
    );
    assert_eq!(
        mounts(&inits[0]),
        vec![
            (
                "staging".into(),
                "/mnt/datastore/training_data".into(),
                Some("download-0".into()),
                false
            ),
            ("staging".into(), "/mnt/.staging".into(), None, false),
            ("credentials".into(), "/etc/datastore".into(), None, true),
        ]
    );
    assert_eq!(inits[1].name, "download-1");
    assert!(
        inits[1]
            .args
            .as_ref()
            .unwrap()
            .contains(&"public-ds".to_string())
    );
    assert!(
        inits[1]
            .args
            .as_ref()
            .unwrap()
            .contains(&"/mnt/datastore/labels".to_string())
    );

    let main = &pod.containers[0];
    assert_eq!(pod.containers.len(), 1);
    assert_eq!(main.name, "main");
    assert_eq!(main.image.as_deref(), Some("python:3.12-slim"));
    assert_eq!(main.working_dir.as_deref(), Some("/app/experiment_folder"));
    assert_eq!(
        main.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    assert_eq!(main.command.as_ref(), Some(&plan.command));
    assert_eq!(
        main.args.as_ref().unwrap(),
        &[
            "--data_folder",
            "/mnt/datastore/training_data",
            "--labels",
            "/mnt/datastore/labels",
            "--output_dir",
            "/mnt/datastore/outputs",
            "--regularization",
            "0.1"
        ]
    );
    let env: Vec<(&str, &str)> = main
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e.value.as_deref().unwrap()))
        .collect();
    assert_eq!(
        env,
        [
            ("EPOCHS", "3"),
            (
                "AZUREML_DATAREFERENCE_DATA_FOLDER",
                "/mnt/datastore/training_data"
            ),
            ("AZUREML_DATAREFERENCE_LABELS", "/mnt/datastore/labels"),
            ("AZUREML_DATAREFERENCE_OUTPUT_DIR", "/mnt/datastore/outputs"),
        ]
    );
    assert!(main.resources.as_ref().unwrap().limits.is_some());
    assert_eq!(
        mounts(main),
        vec![
            (
                "staging".into(),
                "/mnt/datastore/training_data".into(),
                Some("download-0".into()),
                true
            ),
            (
                "staging".into(),
                "/mnt/datastore/labels".into(),
                Some("download-1".into()),
                true
            ),
            (
                "outputs".into(),
                "/mnt/datastore/outputs".into(),
                Some("upload-0".into()),
                false
            ),
        ]
    );

    let volumes = pod.volumes.as_ref().unwrap();
    let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["staging", "outputs", "credentials"]);
    assert!(volumes[0].empty_dir.is_some());
    assert_eq!(
        volumes[1]
            .persistent_volume_claim
            .as_ref()
            .unwrap()
            .claim_name,
        "train-iris-outputs"
    );
    assert_eq!(
        volumes[2].secret.as_ref().unwrap().secret_name.as_deref(),
        Some("train-iris-credentials")
    );
}

#[test]
fn the_users_container_gets_no_credentials() {
    let (_, _, c) = children(EXAMPLE);
    let main = &pod(&c.run).containers[0];
    assert!(
        mounts(main)
            .iter()
            .all(|(name, path, ..)| name != "credentials" && !path.starts_with(CREDENTIALS_DIR)),
        "{:?}",
        mounts(main)
    );
    assert!(main.env_from.is_none());
    for e in main.env.iter().flatten() {
        assert!(e.value_from.is_none(), "{}", e.name);
        assert!(!e.value.as_deref().unwrap_or("").contains("sig="));
    }
    let rendered = to_yaml(main);
    assert!(
        !rendered.contains(KEY)
            && !rendered.contains("sasToken")
            && !rendered.contains("credentials")
    );
}

#[test]
fn outputs_pvc_and_upload_job() {
    let (_, _, c) = children(EXAMPLE);
    let pvc = c.outputs.unwrap();
    let spec = pvc.spec.unwrap();
    assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
    assert_eq!(
        spec.resources.unwrap().requests.unwrap()["storage"].0,
        "10Gi"
    );
    assert_eq!(spec.storage_class_name, None);

    let upload = c.upload.unwrap();
    let pod = pod(&upload);
    check_restricted(pod);
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert!(pod.init_containers.is_none());
    assert_eq!(pod.containers.len(), 1);
    let container = &pod.containers[0];
    assert_eq!(container.name, "upload-0");
    assert_eq!(
        container.args.as_ref().unwrap(),
        &[
            "agent",
            "upload",
            "--datastores",
            "/etc/datastore/datastores.yaml",
            "--datastore",
            "blob-ds",
            "--retry-budget",
            "5m",
            "--src-dir",
            "/mnt/datastore/outputs",
            "--path",
            "outputs/run1",
            "--report",
            "/dev/termination-log"
        ]
    );
    assert_eq!(
        mounts(container),
        vec![
            (
                "outputs".into(),
                "/mnt/datastore/outputs".into(),
                Some("upload-0".into()),
                true
            ),
            ("credentials".into(), "/etc/datastore".into(), None, true),
        ]
    );
    // The run's placement (the claim may be bound to a zonal disk only those nodes reach) and
    // service account.
    let run = c.run;
    let run_pod = self::pod(&run);
    assert_eq!(pod.node_selector, run_pod.node_selector);
    assert!(pod.node_selector.is_some());
    assert_eq!(pod.tolerations, run_pod.tolerations);
    assert_eq!(pod.service_account_name.as_deref(), Some("trainer"));
}

/// The Azure workload identity webhook mutates only pods labelled for it, and only the
/// containers it is not told to skip: the agents that use an identity get it, the script never.
#[test]
fn pods_whose_agents_use_workload_identity_are_labelled_for_the_webhook() {
    let exp = experiment(EXAMPLE);
    let identity = AzureCredential::WorkloadIdentity {
        client_id: "00000000-0000-0000-0000-000000000001".to_string(),
    };
    let template = |job: &Job| {
        job.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .clone()
            .unwrap()
    };
    let build_with = |stores: &BTreeMap<String, StoreConfig>| {
        let plan = plan(&exp.spec, &crate::store::capabilities(stores), CLUSTER).unwrap();
        build_default(&exp, &plan, stores).unwrap()
    };
    // blob-ds (download and upload) with an identity: both pods.
    let mut stores = datastores();
    stores.extend([azure("blob-ds", identity.clone())]);
    let c = build_with(&stores);
    let run = template(&c.run);
    assert_eq!(
        run.labels.as_ref().unwrap()[WORKLOAD_IDENTITY_LABEL],
        "true"
    );
    assert_eq!(
        run.annotations.as_ref().unwrap()[WORKLOAD_IDENTITY_SKIP_ANNOTATION],
        "main"
    );
    let upload = template(c.upload.as_ref().unwrap());
    assert_eq!(
        upload.labels.as_ref().unwrap()[WORKLOAD_IDENTITY_LABEL],
        "true"
    );
    assert_eq!(
        upload.annotations, None,
        "every upload container is an agent"
    );
    // Only the public datastore with an identity: the run pod (it downloads from it), not the
    // upload pod.
    let mut stores = datastores();
    stores.extend([azure("public-ds", identity)]);
    let c = build_with(&stores);
    assert!(
        template(&c.run)
            .labels
            .unwrap()
            .contains_key(WORKLOAD_IDENTITY_LABEL)
    );
    assert!(
        !template(c.upload.as_ref().unwrap())
            .labels
            .unwrap()
            .contains_key(WORKLOAD_IDENTITY_LABEL)
    );
    // Keys and anonymous access: no label.
    let (_, _, c) = children(EXAMPLE);
    assert!(
        !template(&c.run)
            .labels
            .unwrap()
            .contains_key(WORKLOAD_IDENTITY_LABEL)
    );
}

/// A namespace with a compute ResourceQuota refuses a pod whose containers do not say what
/// they request and are limited to: every container the operator adds says both.
#[test]
fn agent_containers_request_and_limit_cpu_and_memory() {
    let code = EXAMPLE.replace(
        "sourceDirectory: /app/experiment_folder\n",
        "code: {datastore: blob-ds, path: snapshots/abc}\n",
    );
    let (_, _, c) = children(&code);
    let run = pod(&c.run);
    let upload = c.upload.unwrap();
    let agents: Vec<&Container> = run
        .init_containers
        .iter()
        .flatten()
        .chain(&pod(&upload).containers)
        .collect();
    assert_eq!(agents.len(), 4, "code, two downloads, one upload");
    for container in agents {
        let resources = container
            .resources
            .as_ref()
            .unwrap_or_else(|| panic!("{}", container.name));
        for map in [&resources.requests, &resources.limits] {
            let map = map.as_ref().unwrap();
            assert!(
                map.contains_key("cpu") && map.contains_key("memory"),
                "{}",
                container.name
            );
        }
        let mut expected = BuildContext::default().agent_resources;
        if container.name.starts_with("download-") {
            // Staged on the node's disk: the pod asks for the room its inputs may take.
            expected
                .requests
                .as_mut()
                .unwrap()
                .insert("ephemeral-storage".into(), Quantity("10Gi".into()));
        }
        assert_eq!(resources, &expected);
    }
}

/// Downloads land on one staging volume, a folder each: an emptyDir of the staging size on
/// the node's disk by default (its sizeLimit, and the download containers' ephemeral-storage
/// request), a volume made from a StorageClass, or an existing claim (a folder of the run's
/// own there; what fits is its free space).
#[test]
fn downloads_are_staged_where_the_spec_says_with_its_size() {
    let staging = |c: &Children| {
        pod(&c.run)
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "staging")
            .cloned()
            .expect("a staging volume")
    };
    let download = |c: &Children| pod(&c.run).init_containers.as_ref().unwrap()[0].clone();
    let args = |c: &Container| c.args.clone().unwrap().join(" ");

    let (_, _, c) = children(EXAMPLE);
    let empty_dir = staging(&c).empty_dir.unwrap();
    assert_eq!(empty_dir.size_limit, Some(Quantity("10Gi".into())));

    let sized = EXAMPLE.to_string() + "staging: {size: 200Gi}\n";
    let (_, _, c) = children(&sized);
    assert_eq!(
        staging(&c).empty_dir.unwrap().size_limit,
        Some(Quantity("200Gi".into()))
    );
    assert!(args(&download(&c)).ends_with("--staging-dir /mnt/.staging --staging-size 200Gi"));
    let requests = download(&c).resources.unwrap().requests.unwrap();
    assert_eq!(requests["ephemeral-storage"].0, "200Gi");
    // main reads the folder, read-only.
    let main = &pod(&c.run).containers[0];
    assert!(mounts(main).contains(&(
        "staging".into(),
        "/mnt/datastore/training_data".into(),
        Some("download-0".into()),
        true
    )));

    let nvme = EXAMPLE.to_string() + "staging: {size: 500Gi, storageClassName: local-nvme}\n";
    let (_, _, c) = children(&nvme);
    let template = staging(&c)
        .ephemeral
        .unwrap()
        .volume_claim_template
        .unwrap();
    assert_eq!(
        template.spec.storage_class_name.as_deref(),
        Some("local-nvme")
    );
    assert_eq!(
        template.spec.resources.unwrap().requests.unwrap()["storage"].0,
        "500Gi"
    );
    assert!(args(&download(&c)).ends_with("--staging-size 500Gi"));
    // Not on the node's disk: no ephemeral-storage request.
    assert!(
        !download(&c)
            .resources
            .unwrap()
            .requests
            .unwrap()
            .contains_key("ephemeral-storage")
    );

    let claim = EXAMPLE.to_string() + "staging: {claimName: datasets-cache}\n";
    let (_, _, c) = children(&claim);
    assert_eq!(
        staging(&c).persistent_volume_claim.unwrap().claim_name,
        "datasets-cache"
    );
    assert!(args(&download(&c)).ends_with("--staging-dir /mnt/.staging"));
    assert_eq!(
        mounts(&download(&c))[0].2.as_deref(),
        Some(format!("{UID}/download-0").as_str())
    );
}

/// The SDK runs a script once: without `backoffLimit` a failing script is not run again (a
/// retry would download again and mix its outputs with the first attempt's); a pod lost to a
/// disruption is replaced without counting.
#[test]
fn a_failing_script_runs_once_unless_the_spec_asks_for_retries() {
    let without = EXAMPLE.replace("backoffLimit: 2\n", "");
    let (_, _, c) = children(&without);
    let spec = c.run.spec.unwrap();
    assert_eq!(spec.backoff_limit, Some(0));
    let policy = spec.pod_failure_policy.expect("a pod failure policy");
    assert_eq!(policy.rules.len(), 1);
    let rule = &policy.rules[0];
    assert_eq!(rule.action, "Ignore");
    let conditions = rule.on_pod_conditions.as_ref().unwrap();
    assert_eq!(conditions[0].type_, "DisruptionTarget");
    assert_eq!(conditions[0].status.as_deref(), Some("True"));
    // Opted in: the spec's count, disruptions still not counted.
    let (_, _, c) = children(EXAMPLE);
    let spec = c.run.spec.unwrap();
    assert_eq!(spec.backoff_limit, Some(2));
    assert!(spec.pod_failure_policy.is_some());
}

#[test]
fn an_upload_reference_with_overwrite_replaces_existing_blobs() {
    let yaml = EXAMPLE.replace(
        "mode: upload, pathOnCompute: outputs}",
        "mode: upload, pathOnCompute: outputs, overwrite: true}",
    );
    let (_, _, c) = children(&yaml);
    let args = pod(c.upload.as_ref().unwrap()).containers[0]
        .args
        .clone()
        .unwrap();
    assert_eq!(args.last().map(String::as_str), Some("--overwrite"));
    let (_, _, c) = children(EXAMPLE);
    let args = pod(c.upload.as_ref().unwrap()).containers[0]
        .args
        .clone()
        .unwrap();
    assert!(!args.contains(&"--overwrite".to_string()), "{args:?}");
}

#[test]
fn outputs_size_and_class_come_from_the_spec() {
    let yaml = format!("{EXAMPLE}outputs: {{size: 50Gi, storageClassName: managed-csi}}\n");
    let (_, _, c) = children(&yaml);
    let spec = c.outputs.unwrap().spec.unwrap();
    assert_eq!(
        spec.resources.unwrap().requests.unwrap()["storage"].0,
        "50Gi"
    );
    assert_eq!(spec.storage_class_name.as_deref(), Some("managed-csi"));
}

#[test]
fn without_references_there_is_only_the_run_job() {
    let (_, _, c) = children(
        "image: python:3.12-slim\nentryScript: train.py\nscriptParams: [{name: --lr, value: '0.1'}]\n",
    );
    assert!(c.credentials.is_none() && c.outputs.is_none() && c.upload.is_none());
    let pod = pod(&c.run);
    assert!(pod.init_containers.is_none() && pod.volumes.is_none());
    assert_eq!(
        pod.containers[0].command,
        Some(vec!["python".into(), "train.py".into()])
    );
    assert_eq!(
        pod.containers[0].args,
        Some(vec!["--lr".into(), "0.1".into()])
    );
    check_restricted(pod);
}

// ---------------------------------------------------------------------------------------------
// Credentials

fn sas_of(file: &str, name: &str) -> String {
    let catalog = Catalog::parse(file, "datastores.yaml", PathBuf::new()).unwrap();
    let scope = Scope {
        namespace: "default".to_string(),
        operator_namespace: "datastore-operator".to_string(),
    };
    match catalog.resolve(name, &scope).unwrap().config {
        StoreConfig::AzureBlob(AzureBlobConfig {
            credential: AzureCredential::SasToken(token),
            ..
        }) => token.expose().to_string(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_account_key_becomes_a_sas_with_exactly_the_plans_permissions() {
    let (exp, plan, c) = children(EXAMPLE);
    let file = &secret_values(&c.credentials.unwrap())[DATASTORES_KEY];
    assert!(!file.contains(KEY), "{file}");
    assert!(!file.contains("accountKey"), "{file}");
    // The agent reads it back through the same resolver as the CLI.
    let token = sas_of(file, "blob-ds");
    assert!(token.contains("sp=rcwl&"), "{token}");
    assert!(token.contains("sr=c&"), "{token}");
    // now + activeDeadlineSeconds (2 h) + 1 h.
    assert!(token.contains("se=2030-01-01T03%3A00%3A00Z"), "{token}");
    assert_eq!(exp.spec.active_deadline_seconds, Some(7200));
    // Exactly what the planner asked for.
    let expected = sas::container_sas(
        "devstoreaccount1",
        KEY,
        "data",
        plan.permissions["blob-ds"].into(),
        now() + Duration::hours(3),
    )
    .unwrap();
    assert_eq!(token, expected);
}

#[test]
fn download_only_gets_read_and_list_and_the_default_deadline() {
    let exp = experiment(
        "image: x\nentryScript: t.py\nscriptParams: [{name: --d, dataReference: {datastore: blob-ds, mode: download}}]\n",
    );
    let stores = datastores();
    let plan = plan(&exp.spec, &crate::store::capabilities(&stores), CLUSTER).unwrap();
    let file = render_credentials(&plan, &stores, now(), None)
        .unwrap()
        .unwrap();
    let token = sas_of(&file, "blob-ds");
    assert!(token.contains("sp=rl&"), "{token}");
    // 24 h + 1 h.
    assert!(token.contains("se=2030-01-02T01%3A00%3A00Z"), "{token}");
}

#[test]
fn datastores_file_shapes_per_credential_kind() {
    let stores = BTreeMap::from([
        azure(
            "key-ds",
            AzureCredential::AccountKey(Hidden::new(KEY.to_string())),
        ),
        azure(
            "sas-ds",
            AzureCredential::SasToken(Hidden::new("sv=2024&sp=rl&sig=given".to_string())),
        ),
        azure("anon-ds", AzureCredential::Anonymous),
        azure(
            "wi-ds",
            AzureCredential::WorkloadIdentity {
                client_id: "1234-abcd".to_string(),
            },
        ),
    ]);
    let params: String = ["key-ds", "sas-ds", "anon-ds", "wi-ds"]
        .iter()
        .map(|ds| {
            format!("  - {{name: --{ds}, dataReference: {{datastore: {ds}, mode: download}}}}\n")
        })
        .collect();
    let exp = experiment(&format!(
        "image: x\nentryScript: t.py\nscriptParams:\n{params}"
    ));
    let plan = plan(&exp.spec, &crate::store::capabilities(&stores), CLUSTER).unwrap();
    let file = render_credentials(&plan, &stores, now(), Some(60))
        .unwrap()
        .unwrap();
    assert!(!file.contains(KEY));

    let docs: Vec<serde_json::Value> = crate::yaml::documents(&file).unwrap();
    let kinds: Vec<(String, String)> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_string(),
                d["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect = |k: &str, n: &str| (k.to_string(), n.to_string());
    assert_eq!(
        kinds,
        [
            expect("Datastore", "anon-ds"),
            expect("Datastore", "key-ds"),
            expect("Secret", "key-ds-sas"),
            expect("Datastore", "sas-ds"),
            expect("Secret", "sas-ds-sas"),
            expect("Datastore", "wi-ds"),
        ]
    );
    let blob = |i: usize| &docs[i]["spec"]["azureBlob"];
    assert_eq!(blob(0)["accountName"], "devstoreaccount1");
    assert_eq!(blob(0)["containerName"], "data");
    assert_eq!(
        blob(0)["endpoint"],
        "http://127.0.0.1:10000/devstoreaccount1"
    );
    assert!(blob(0).get("credentials").is_none());
    assert_eq!(blob(1)["credentials"]["secretRef"]["name"], "key-ds-sas");
    assert_eq!(docs[4]["stringData"]["sasToken"], "sv=2024&sp=rl&sig=given");
    assert_eq!(
        blob(5)["credentials"]["workloadIdentity"]["clientId"],
        "1234-abcd"
    );
    assert!(blob(5)["credentials"].get("secretRef").is_none());

    assert_eq!(sas_of(&file, "sas-ds"), "sv=2024&sp=rl&sig=given");
    assert!(sas_of(&file, "key-ds").contains("sp=rl&"));
}

#[test]
fn an_invalid_account_key_is_a_config_error_that_does_not_show_it() {
    let stores = BTreeMap::from([azure(
        "blob-ds",
        AzureCredential::AccountKey(Hidden::new("not base64!".to_string())),
    )]);
    let exp = experiment(
        "image: x\nentryScript: t.py\nscriptParams: [{name: --d, dataReference: {datastore: blob-ds, mode: download}}]\n",
    );
    let plan = plan(&exp.spec, &crate::store::capabilities(&stores), CLUSTER).unwrap();
    let err = render_credentials(&plan, &stores, now(), None).unwrap_err();
    assert!(matches!(err, Error::Config(_)));
    assert!(!err.to_string().contains("not base64!"), "{err}");
}

#[test]
fn render_is_deterministic_and_none_without_datastores() {
    let (_, plan, _) = children(EXAMPLE);
    let stores = datastores();
    let a = render_credentials(&plan, &stores, now(), Some(10)).unwrap();
    let b = render_credentials(&plan, &stores, now(), Some(10)).unwrap();
    assert_eq!(a, b);
    let empty = ExecutionPlan {
        permissions: BTreeMap::new(),
        ..plan
    };
    assert_eq!(
        render_credentials(&empty, &stores, now(), None).unwrap(),
        None
    );
}

/// A relative `sourceDirectory` is entered by a shell; run the rendered command for real, from a
/// directory standing for the image's WORKDIR, with arguments a shell would mangle if quoted.
#[test]
fn a_relative_source_directory_is_entered_before_the_script_runs() {
    let exp = experiment(
        r#"
image: python:3.12-slim
sourceDirectory: code dir/src
entryScript: unused.py
command: [sh, show.sh]
scriptParams:
  - name: --tricky
    value: "a b 'c\" $HOME `x` ; exit 3"
"#,
    );
    let plan = plan(&exp.spec, &BTreeMap::new(), CLUSTER).unwrap();
    let job = run_job(
        &exp,
        &plan,
        &BTreeMap::new(),
        &BuildContext::default(),
        &StorageVolumes::default(),
        &CachedVolumes::default(),
        false,
    );
    let main = &pod(&job).containers[0];
    assert_eq!(
        main.working_dir, None,
        "a relative workingDir is not valid in a container"
    );

    let workdir = tempfile::tempdir().unwrap();
    let src = workdir.path().join("code dir/src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("show.sh"),
        "pwd\nfor a in \"$@\"; do echo \"[$a]\"; done\n",
    )
    .unwrap();
    let command = main.command.as_ref().unwrap();
    let out = std::process::Command::new(&command[0])
        .args(command[1..].iter().chain(main.args.as_ref().unwrap()))
        .current_dir(workdir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        std::path::Path::new(lines[0]).canonicalize().unwrap(),
        src.canonicalize().unwrap()
    );
    assert_eq!(&lines[1..], ["[--tricky]", "[a b 'c\" $HOME `x` ; exit 3]"]);

    // An absolute one is the working directory itself, without a shell.
    let absolute = ExecutionPlan {
        working_dir: Some("/app".into()),
        ..plan
    };
    let (dir, command, args) = main_command(&absolute);
    assert_eq!(dir.as_deref(), Some("/app"));
    assert_eq!((command, args), (absolute.command, absolute.args));
}

#[test]
fn a_name_too_long_for_the_job_labels_is_refused() {
    let mut exp = experiment(EXAMPLE);
    exp.metadata.name = Some("x".repeat(MAX_NAME_LEN));
    let stores = datastores();
    let plan = plan(&exp.spec, &crate::store::capabilities(&stores), CLUSTER).unwrap();
    let children = build_default(&exp, &plan, &stores).unwrap();
    assert_eq!(children.upload.unwrap().metadata.name.unwrap().len(), 63);
    exp.metadata.name = Some("x".repeat(MAX_NAME_LEN + 1));
    let err = build_default(&exp, &plan, &stores).unwrap_err();
    assert!(err.to_string().contains("choose a shorter name"), "{err}");
}

#[test]
fn code_from_a_datastore_is_fetched_by_the_first_init_container_into_the_working_directory() {
    let yaml = EXAMPLE.replace(
        "sourceDirectory: /app/experiment_folder",
        "code: {datastore: public-ds, path: snapshots/sha256-ab}",
    );
    let (_, plan, children) = children(&yaml);
    let pod = pod(&children.run);
    let init = pod.init_containers.as_ref().unwrap();
    let names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["code", "download-0", "download-1"]);
    let code = &init[0];
    assert_eq!(
        code.args.as_ref().unwrap(),
        &[
            "agent",
            "download",
            "--datastores",
            "/etc/datastore/datastores.yaml",
            "--datastore",
            "public-ds",
            "--retry-budget",
            "5m",
            "--path",
            "snapshots/sha256-ab",
            "--target",
            "/mnt/code",
            "--report",
            "/dev/termination-log",
        ]
    );
    assert_eq!(
        mounts(code),
        [
            ("code".into(), "/mnt/code".into(), None, false),
            ("credentials".into(), "/etc/datastore".into(), None, true),
        ]
    );
    let main = &pod.containers[0];
    // An absolute working directory: no shell needed in the image.
    assert_eq!(main.working_dir.as_deref(), Some("/mnt/code"));
    assert_eq!(
        main.command.as_ref().unwrap(),
        &["python", "training_script.py"]
    );
    // Writable for the script (it may write next to its code); the data stays read-only.
    let main_mounts = mounts(main);
    assert_eq!(
        main_mounts[0],
        ("code".into(), "/mnt/code".into(), None, false)
    );
    assert!(main_mounts[1].3, "{main_mounts:?}");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "code")
        .unwrap();
    assert!(volume.empty_dir.is_some());
    // The code's datastore can be read with the run's credentials.
    assert_eq!(
        sas::Permissions::from(plan.permissions["public-ds"]).as_str(),
        "rl"
    );
}

mod cached;
mod mounts;
