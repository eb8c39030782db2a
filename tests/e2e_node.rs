//! The real node (tests/common/real_node.rs): a kubelet and containerd joined to the real
//! control plane run a Job, and what the kubelet reports through the apiserver is what a test
//! may believe about a kubelet; kube-proxy carries a pod's request to a Service. The kubelet
//! and kube-proxy are in the `kube` binary `make test-deps` builds.

mod common;

use std::time::{Duration, Instant};

use common::real_node::{NODE, NODE_IP, RealNode, STANDIN_IMAGE};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Namespace, Node, Pod, Service, ServiceAccount};
use kube::api::{Api, ListParams, LogParams, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

/// The sysctls the kubelet sets, as this machine has them.
fn host_sysctls() -> Vec<String> {
    [
        "vm/overcommit_memory",
        "vm/panic_on_oom",
        "kernel/panic",
        "kernel/panic_on_oops",
        "kernel/keys/root_maxkeys",
        "kernel/keys/root_maxbytes",
    ]
    .iter()
    .map(|k| std::fs::read_to_string(format!("/proc/sys/{k}")).unwrap())
    .collect()
}

/// Creates namespace `name` and waits for its `default` ServiceAccount, which a pod needs.
async fn namespace(client: &kube::Client, name: &str) {
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
        )
        .await
        .unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    let deadline = Instant::now() + WAIT;
    while accounts.get_opt("default").await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "no default ServiceAccount in {name}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Job: an init container, a native sidecar whose startup probe gates `main`, and `main`,
/// which sees what both wrote, says why it fails in its termination message and exits 3.
fn job() -> Job {
    let sh = |script: &str| json!(["sh", "-c", script]);
    serde_json::from_value(json!({
        "metadata": {"name": "ordered"},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 5,
                "volumes": [{"name": "shared", "emptyDir": {}}],
                "initContainers": [
                    {
                        "name": "prepare",
                        "image": STANDIN_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": sh("echo prepare >> /shared/order; echo prepared the folder"),
                        "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
                    },
                    {
                        "name": "sidecar",
                        "image": STANDIN_IMAGE,
                        "imagePullPolicy": "Never",
                        "restartPolicy": "Always",
                        "command": sh("echo sidecar >> /shared/order; trap 'exit 0' TERM; while true; do sleep 1 & wait; done"),
                        "startupProbe": {
                            "exec": {"command": ["grep", "-q", "sidecar", "/shared/order"]},
                            "periodSeconds": 1,
                        },
                        "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
                    },
                ],
                "containers": [{
                    "name": "main",
                    "image": STANDIN_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": sh("cat /shared/order; echo the loss diverged > /dev/termination-log; exit 3"),
                    "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
                }],
            }},
        },
    }))
    .unwrap()
}

fn status<'a>(statuses: &'a Option<Vec<ContainerStatus>>, name: &str) -> &'a ContainerStatus {
    statuses
        .iter()
        .flatten()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no status for {name}: {statuses:?}"))
}

fn terminated(statuses: &Option<Vec<ContainerStatus>>, name: &str) -> (i32, String, String) {
    let t = status(statuses, name)
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .unwrap_or_else(|| panic!("{name} has not terminated: {statuses:?}"));
    (
        t.exit_code,
        t.reason.clone().unwrap_or_default(),
        t.message.clone().unwrap_or_default(),
    )
}

#[test]
fn a_real_kubelet_runs_a_job_and_the_node_leaves_nothing_behind() {
    let sysctls = host_sysctls();
    let started = Instant::now();
    let node = RealNode::start();
    let ready = started.elapsed();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let job_took = runtime.block_on(async {
        let client = node.cluster.admin();

        // The node as the kubelet registered it with its own certificate.
        let registered = Api::<Node>::all(client.clone()).get(NODE).await.unwrap();
        let info = registered.status.as_ref().unwrap();
        let version = &info.node_info.as_ref().unwrap();
        assert_eq!(version.kubelet_version, common::cluster::kubernetes());
        assert!(
            version
                .container_runtime_version
                .starts_with("containerd://"),
            "{version:?}"
        );
        assert!(
            info.addresses
                .iter()
                .flatten()
                .any(|a| a.type_ == "InternalIP" && a.address == NODE_IP),
            "{:?}",
            info.addresses
        );

        let ns = "node-e2e";
        namespace(&client, ns).await;
        let applied = Instant::now();
        let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
        jobs.create(&PostParams::default(), &job()).await.unwrap();
        let deadline = Instant::now() + WAIT;
        let failed = loop {
            let job = jobs.get("ordered").await.unwrap();
            let conditions = job.status.as_ref().and_then(|s| s.conditions.clone());
            if let Some(c) = conditions
                .iter()
                .flatten()
                .find(|c| (c.type_ == "Failed" || c.type_ == "Complete") && c.status == "True")
            {
                break c.clone();
            }
            assert!(
                Instant::now() < deadline,
                "the Job did not finish within {WAIT:?}: {:?}",
                job.status
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let job_took = applied.elapsed();
        assert_eq!(
            (failed.type_.as_str(), failed.reason.as_deref()),
            ("Failed", Some("BackoffLimitExceeded"))
        );

        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let listed = pods
            .list(&ListParams::default().labels("job-name=ordered"))
            .await
            .unwrap();
        assert_eq!(listed.items.len(), 1, "one pod: backoffLimit 0");
        let pod = &listed.items[0];
        let name = pod.metadata.name.clone().unwrap();
        let spec_node = pod.spec.as_ref().unwrap().node_name.as_deref();
        assert_eq!(spec_node, Some(NODE));
        let st = pod.status.as_ref().unwrap();
        assert_eq!(st.phase.as_deref(), Some("Failed"));
        assert_eq!(st.host_ip.as_deref(), Some(NODE_IP));
        let pod_ip = st.pod_ip.as_deref().unwrap_or_default();
        assert!(
            pod_ip.starts_with("10.244.0."),
            "an address from the CNI bridge's range: {pod_ip:?}"
        );

        // What the kubelet reports: the init container completed, the sidecar ran until the
        // kubelet stopped it (its TERM trap exits 0), main failed with its code and message.
        assert_eq!(
            terminated(&st.init_container_statuses, "prepare"),
            (0, "Completed".into(), String::new())
        );
        let sidecar = status(&st.init_container_statuses, "sidecar");
        assert_eq!(sidecar.restart_count, 0);
        assert_eq!(terminated(&st.init_container_statuses, "sidecar").0, 0);
        assert_eq!(
            terminated(&st.container_statuses, "main"),
            (3, "Error".into(), "the loss diverged\n".into())
        );

        // pods/log through the apiserver (it dials the kubelet): main saw the init
        // container's line, then the sidecar's, which its startup probe waited for.
        let log = |container: &str| {
            let pods = pods.clone();
            let name = name.clone();
            let params = LogParams {
                container: Some(container.into()),
                ..LogParams::default()
            };
            async move { pods.logs(&name, &params).await.unwrap() }
        };
        assert_eq!(log("main").await, "prepare\nsidecar\n");
        assert_eq!(log("prepare").await, "prepared the folder\n");
        job_took
    });
    drop(runtime);

    let stopping = Instant::now();
    let left = node.stop();
    let teardown = stopping.elapsed();
    assert_eq!(left, Default::default(), "the node left something behind");
    assert_eq!(
        host_sysctls(),
        sysctls,
        "the kubelet's sysctls stayed inside"
    );
    eprintln!(
        "node Ready after {:.1}s, the Job failed as it should {:.1}s after it was created, teardown {:.1}s",
        ready.as_secs_f64(),
        job_took.as_secs_f64(),
        teardown.as_secs_f64(),
    );
}

/// A pod reaches another through a Service: the ClusterIP and port the kubelet puts in the
/// client's environment, rewritten by kube-proxy's rules inside the node's namespaces.
#[test]
fn a_pod_reaches_a_service_through_kube_proxy() {
    let node = RealNode::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = node.cluster.admin();
        let ns = "services";
        namespace(&client, ns).await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let pod = |value: serde_json::Value| serde_json::from_value::<Pod>(value).unwrap();
        pods.create(
            &PostParams::default(),
            &pod(json!({
                "metadata": {"name": "web", "labels": {"app": "web"}},
                "spec": {"containers": [{
                    "name": "httpd",
                    "image": STANDIN_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", "mkdir /www && echo served by web > /www/index.html && exec httpd -f -p 8080 -h /www"],
                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                }]},
            })),
        )
        .await
        .unwrap();
        Api::<Service>::namespaced(client.clone(), ns)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "web"},
                    "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        // The client retries a few times: kube-proxy writes the rules a moment after web's
        // endpoint is ready, as on any cluster; its log shows the failed tries only if all
        // fail. (busybox-static's wget crashes, even on this machine: nc speaks the HTTP.)
        pods.create(
            &PostParams::default(),
            &pod(json!({
                "metadata": {"name": "client"},
                "spec": {"restartPolicy": "Never", "containers": [{
                    "name": "wget",
                    "image": STANDIN_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 $WEB_SERVICE_HOST $WEB_SERVICE_PORT > /tmp/answer 2>> /tmp/tries && grep -q 'served by web' /tmp/answer && tail -n 1 /tmp/answer && exit 0; sleep 1; done; cat /tmp/tries /tmp/answer; exit 1"],
                }]},
            })),
        )
        .await
        .unwrap();
        let deadline = Instant::now() + WAIT;
        let phase = loop {
            let pod = pods.get("client").await.unwrap();
            let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
            if phase == "Succeeded" || phase == "Failed" {
                break phase;
            }
            assert!(Instant::now() < deadline, "the client is still {phase}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let log = pods.logs("client", &LogParams::default()).await.unwrap();
        assert_eq!((phase.as_str(), log.as_str()), ("Succeeded", "served by web\n"));
        // The rules that did it are the namespaces' own: none on this machine.
        for table in ["nat", "filter"] {
            let out = std::process::Command::new("iptables")
                .args(["-t", table, "-S"])
                .output()
                .unwrap();
            let rules = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && !rules.contains("KUBE-"),
                "this machine's {table} table: {rules}"
            );
        }
    });
    drop(runtime);
    assert_eq!(
        node.stop(),
        Default::default(),
        "the node left something behind"
    );
}
