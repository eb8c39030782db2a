//! The `datastore controller` process: the built binary against a fake apiserver on a loopback
//! port (CRDs missing, forbidden, unreachable, or installed with a Lease it can take), probed on
//! /healthz, /readyz and /metrics and stopped with SIGTERM; and the leader election loop against
//! the scripted apiserver, request by request.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use common::apiserver::{self, expect};
use datastore_operator::controller::leader::{self, Ended, Timing};
use datastore_operator::controller::metrics::Metrics;
use datastore_operator::controller::rbac;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const OPERATOR_NS: &str = "datastore-operator";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/datastore-operator/leases/datastore-operator";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/datastore-operator/leases";

// -------------------------------------------------------------------------------------------
// A fake apiserver on a loopback port

#[derive(Clone, Copy, Debug, PartialEq)]
enum Crds {
    /// The datastore.dev group is unknown: every list is a 404.
    Missing,
    /// Lists of datastore.dev resources are refused (403), as without the chart's RBAC.
    Forbidden,
    /// Lists (empty but for `Fake::datastores`), watches that stay open, status patches
    /// accepted, and one Lease kept in memory.
    Installed,
    /// Installed, but the controllers' first lists never answer (the readiness check's
    /// `limit=1` lists do): their watch caches never fill.
    StalledLists,
}

#[derive(Debug)]
struct Fake {
    crds: Crds,
    lease: Option<Value>,
    /// The Datastores (in namespace `ml`) that lists return.
    datastores: Vec<Value>,
    /// `METHOD path?query`, in order.
    requests: Vec<String>,
    /// Requests the chart's RBAC rules (controller::rbac::RULES) would refuse.
    refused: Vec<String>,
}

type Shared = Arc<Mutex<Fake>>;

/// Starts the fake apiserver; it serves until the test process ends.
async fn fake_apiserver(crds: Crds) -> (u16, Shared) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = Arc::new(Mutex::new(Fake {
        crds,
        lease: None,
        datastores: Vec::new(),
        requests: Vec::new(),
        refused: Vec::new(),
    }));
    let shared = fake.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let fake = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let fake = fake.clone();
                    async move { Ok::<_, Infallible>(answer(&fake, request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, fake)
}

type Body = BoxBody<Bytes, Infallible>;

fn json_reply(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_reply(
        StatusCode::from_u16(code).unwrap(),
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

async fn answer(fake: &Shared, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    let content_type = request
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let stalled = matches!(fake.lock().unwrap().crds, Crds::StalledLists)
        && method == Method::GET
        && path.starts_with("/apis/datastore.dev/")
        && !query
            .split('&')
            .any(|q| q == "limit=1" || q == "watch=true");
    if stalled {
        fake.lock()
            .unwrap()
            .requests
            .push(format!("{method} {path}?{query} (stalled)"));
        return futures::future::pending().await;
    }
    let mut fake = fake.lock().unwrap();
    fake.requests.push(format!("{method} {path}?{query}"));
    if let Err(why) = rbac::check(method.as_str(), &path, &query, OPERATOR_NS) {
        fake.refused.push(why);
        return status(403, "Forbidden", "RBAC: not granted by the chart's rules");
    }
    if path.starts_with("/apis/datastore.dev/") {
        match fake.crds {
            Crds::Missing => {
                return status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                );
            }
            Crds::Forbidden => {
                return status(
                    403,
                    "Forbidden",
                    "experiments.datastore.dev is forbidden: User \"system:serviceaccount:x:y\" cannot list resource",
                );
            }
            Crds::Installed | Crds::StalledLists => {}
        }
    }
    if path == LEASE || path == LEASES {
        return lease(&mut fake, &method, &content_type, &body);
    }
    let watch = query
        .split('&')
        .any(|q| q == "watch=true" || q == "watch=1");
    if method == Method::GET && watch {
        // A watch with nothing to say: headers, then silence until the client goes.
        let silence = futures::stream::pending::<Result<Frame<Bytes>, Infallible>>();
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(silence)))
            .unwrap();
    }
    if method == Method::GET {
        let items = if path.ends_with("/datastores") {
            fake.datastores.clone()
        } else {
            Vec::new()
        };
        return json_reply(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
        );
    }
    if method == Method::PATCH
        && let Some(name) = path
            .strip_prefix("/apis/datastore.dev/v1alpha1/namespaces/ml/datastores/")
            .and_then(|rest| rest.strip_suffix("/status"))
        && let Some(ds) = fake
            .datastores
            .iter_mut()
            .find(|d| d["metadata"]["name"] == name)
    {
        let sent: Value = serde_json::from_slice(&body).unwrap();
        ds["status"] = sent["status"].clone();
        return json_reply(StatusCode::OK, ds);
    }
    status(404, "NotFound", "not in the fake")
}

/// The Lease: get, create, and patches merged into its spec (`null` removes a field). Taking a
/// lease someone else holds by server-side apply is a conflict, as the real apiserver's field
/// ownership makes it.
fn lease(fake: &mut Fake, method: &Method, content_type: &str, body: &[u8]) -> Response<Body> {
    let sent: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).unwrap()
    };
    match *method {
        Method::GET => match &fake.lease {
            Some(lease) => json_reply(StatusCode::OK, lease),
            None => status(404, "NotFound", "leases \"datastore-operator\" not found"),
        },
        Method::POST => {
            if fake.lease.is_some() {
                return status(
                    409,
                    "AlreadyExists",
                    "leases \"datastore-operator\" already exists",
                );
            }
            let mut lease = sent;
            lease["metadata"]["namespace"] = json!(OPERATOR_NS);
            lease["spec"] = json!({});
            fake.lease = Some(lease.clone());
            json_reply(StatusCode::CREATED, &lease)
        }
        Method::PATCH => {
            let Some(lease) = fake.lease.as_mut() else {
                return status(404, "NotFound", "leases \"datastore-operator\" not found");
            };
            let holder = lease["spec"]["holderIdentity"].as_str().map(str::to_string);
            let taking = sent["spec"]["holderIdentity"].as_str();
            if content_type.starts_with("application/apply-patch")
                && let (Some(holder), Some(taking)) = (&holder, taking)
                && holder != taking
            {
                return status(
                    409,
                    "Conflict",
                    "Apply failed with 1 conflict: conflict with another manager",
                );
            }
            let spec = lease["spec"].as_object_mut().unwrap();
            for (key, value) in sent["spec"].as_object().unwrap() {
                if value.is_null() {
                    spec.remove(key);
                } else {
                    spec.insert(key.clone(), value.clone());
                }
            }
            json_reply(StatusCode::OK, lease)
        }
        _ => status(405, "MethodNotAllowed", "no"),
    }
}

// -------------------------------------------------------------------------------------------
// The controller process

struct Controller {
    child: Child,
    http: SocketAddr,
    stderr: PathBuf,
    _home: tempfile::TempDir,
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn kubeconfig(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    path
}

/// `datastore controller` with nothing of the environment but what is given: no cluster, no
/// DATASTORE_* settings.
fn controller_command(home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_datastore"));
    command.arg("controller").env("HOME", home);
    for (key, _) in std::env::vars() {
        if key.starts_with("DATASTORE_")
            || key.starts_with("KUBERNETES_SERVICE_")
            || ["KUBECONFIG", "POD_NAME", "RUST_LOG"].contains(&key.as_str())
        {
            command.env_remove(key);
        }
    }
    command
}

impl Controller {
    /// Starts the controller against the apiserver on `port`, serving on a free loopback port.
    fn start(port: u16, pod: &str, args: &[&str]) -> Controller {
        Controller::start_with_env(port, pod, args, &[])
    }

    fn start_with_env(port: u16, pod: &str, args: &[&str], env: &[(&str, &str)]) -> Controller {
        let home = tempfile::tempdir().unwrap();
        let http = free_addr();
        let stderr = home.path().join("stderr");
        let child = controller_command(home.path())
            .env("KUBECONFIG", kubeconfig(home.path(), port))
            .env("POD_NAME", pod)
            .arg(format!("--http-addr={http}"))
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Controller {
            child,
            http,
            stderr,
            _home: home,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap()
    }

    /// `GET path`: the status code and body, or `None` when nothing answers (yet).
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let exchange = async {
            let mut socket = tokio::net::TcpStream::connect(self.http).await.ok()?;
            let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            socket.write_all(request.as_bytes()).await.ok()?;
            let mut answer = String::new();
            socket.read_to_string(&mut answer).await.ok()?;
            let code = answer.get(9..12)?.parse().ok()?;
            let body = answer.split_once("\r\n\r\n")?.1.to_string();
            Some((code, body))
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .ok()
            .flatten()
    }

    /// Polls `path` until `wanted` holds (at most `within`); returns the last answer.
    async fn wait_for(
        &mut self,
        path: &str,
        within: Duration,
        wanted: impl Fn(u16, &str) -> bool,
    ) -> (u16, String) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.get(path).await;
            if let Some((code, body)) = &got
                && wanted(*code, body)
            {
                return (*code, body.clone());
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the controller exited ({status}):\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "GET {path}: still {got:?} after {within:?}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then the exit status (within `within`).
    async fn terminate(&mut self, within: Duration) -> ExitStatus {
        let pid = self.child.id() as i32;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "the controller did not exit within {within:?} of SIGTERM; logs:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `text` has this exact line (a HELP text may contain a sample's words).
fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

fn count(requests: &[String], prefix: &str) -> usize {
    requests.iter().filter(|r| r.starts_with(prefix)).count()
}

#[test]
fn without_a_cluster_the_controller_says_so_and_exits() {
    let home = tempfile::tempdir().unwrap();
    let out = controller_command(home.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no Kubernetes cluster is reachable")
            && stderr.contains("point KUBECONFIG at one"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_its_crds_the_controller_waits_serves_health_and_metrics_and_stops_on_sigterm() {
    let (port, fake) = fake_apiserver(Crds::Missing).await;
    let mut controller = Controller::start(port, "replica-a", &[]);
    let within = Duration::from_secs(15);

    let (_, alive) = controller
        .wait_for("/healthz", within, |code, _| code == 200)
        .await;
    assert_eq!(alive, "ok\n");
    let (code, why) = controller
        .wait_for("/readyz", within, |_, body| body.contains("CRDs"))
        .await;
    assert_eq!(code, 503, "{why}");
    assert!(
        why.starts_with("not ready: the datastore.dev CRDs are not installed")
            && why.contains("`datastore crds | kubectl apply -f -` or the Helm chart; waiting")
            && why.ends_with('\n')
            && why.lines().count() == 1,
        "{why}"
    );
    let (code, metrics) = controller.get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    for name in [
        r#"datastore_reconciles_total{controller="experiment"} 0"#,
        r#"datastore_reconciles_total{controller="clusterdatastore"} 0"#,
        "# TYPE datastore_reconcile_duration_seconds histogram",
        "datastore_downloaded_bytes_total 0",
        "datastore_uploaded_bytes_total 0",
        "datastore_leader 0",
        "# EOF",
    ] {
        assert!(metrics.contains(name), "{name} missing in\n{metrics}");
    }
    assert_eq!(controller.get("/").await.unwrap().0, 404);

    // It retries (1 s later) without saying the same thing twice.
    let deadline = Instant::now() + within;
    while count(
        &fake.lock().unwrap().requests,
        "GET /apis/datastore.dev/v1alpha1/experiments?",
    ) < 2
    {
        assert!(Instant::now() < deadline, "no retry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let status = controller.terminate(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "{}", controller.logs());

    let logs = controller.logs();
    for line in logs.lines() {
        // Not a terminal: JSON lines, as a log pipeline wants them.
        let entry: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(entry["level"].is_string() && entry["fields"]["message"].is_string());
    }
    let waiting = logs
        .lines()
        .filter(|l| l.contains("waiting: the datastore.dev CRDs are not installed"))
        .count();
    assert_eq!(waiting, 1, "once per change of reason:\n{logs}");
    assert!(
        logs.contains(&format!(
            "serving /healthz, /readyz and /metrics on http://{}",
            controller.http
        )),
        "{logs}"
    );
    assert!(
        logs.contains("stopping: finishing the reconciles in flight"),
        "{logs}"
    );

    let fake = fake.lock().unwrap();
    assert!(fake.refused.is_empty(), "{:?}", fake.refused);
    for request in &fake.requests {
        assert!(
            request.starts_with("GET /apis/datastore.dev/v1alpha1/") && request.contains("limit=1"),
            "only the CRD check until the CRDs exist: {request}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forbidden_list_is_waited_for_with_the_rbac_it_needs_in_text_logs() {
    let (port, _fake) = fake_apiserver(Crds::Forbidden).await;
    // Empty settings, as a chart may render them, mean the defaults.
    let empty = [
        ("DATASTORE_LOG", ""),
        ("DATASTORE_OUTPUTS_STORAGE_CLASS", ""),
        ("DATASTORE_BLOBFUSE_IMAGE", ""),
        ("DATASTORE_DEFAULT_MOUNT_DRIVER", ""),
        ("DATASTORE_SIDECAR_MEMORY", ""),
    ];
    let mut controller =
        Controller::start_with_env(port, "replica-a", &["--log-format=text"], &empty);
    let (code, why) = controller
        .wait_for("/readyz", Duration::from_secs(15), |_, body| {
            body.contains("refused")
        })
        .await;
    assert_eq!(code, 503);
    assert!(
        why.contains("the cluster refused to list Experiments")
            && why.contains("ServiceAccount needs the RBAC rules of the Helm chart"),
        "{why}"
    );
    assert_eq!(
        controller.terminate(Duration::from_secs(5)).await.code(),
        Some(0)
    );
    let logs = controller.logs();
    assert!(
        logs.lines().all(|l| !l.starts_with('{')) && logs.contains(" WARN "),
        "--log-format=text: human lines\n{logs}"
    );
    assert!(
        logs.contains(" INFO serving /healthz"),
        "the controller logs at info by default:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_apiserver_is_waited_for() {
    let closed = free_addr().port();
    let mut controller = Controller::start(closed, "replica-a", &[]);
    let (code, why) = controller
        .wait_for("/readyz", Duration::from_secs(15), |_, body| {
            body.contains("reach")
        })
        .await;
    assert_eq!(code, 503);
    assert!(
        why.starts_with("not ready: cannot reach the Kubernetes API"),
        "{why}"
    );
    assert_eq!(controller.get("/healthz").await.unwrap().0, 200);
    assert_eq!(
        controller.terminate(Duration::from_secs(5)).await.code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taken_http_address_is_a_clear_error() {
    let (port, _fake) = fake_apiserver(Crds::Missing).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let home = tempfile::tempdir().unwrap();
    let out = controller_command(home.path())
        .env("KUBECONFIG", kubeconfig(home.path(), port))
        .arg(format!("--http-addr={}", taken.local_addr().unwrap()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot serve /healthz, /readyz and /metrics on 127.0.0.1:")
            && stderr.contains("choose another --http-addr"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_leader_election_the_controllers_start_at_once_and_stop_on_sigterm() {
    let (port, fake) = fake_apiserver(Crds::Installed).await;
    // A local datastore: its check needs no storage (LocalOnly), and its status is written.
    fake.lock().unwrap().datastores.push(json!({
        "apiVersion": "datastore.dev/v1alpha1", "kind": "Datastore",
        "metadata": {"name": "laptop", "namespace": "ml", "uid": "uid-laptop", "resourceVersion": "1", "generation": 1},
        "spec": {"local": {"path": "/data"}},
    }));
    let mut controller = Controller::start(port, "replica-a", &["--leader-election=false"]);
    let within = Duration::from_secs(15);
    let (_, ready) = controller
        .wait_for("/readyz", within, |code, _| code == 200)
        .await;
    assert_eq!(ready, "ready\n");
    let (_, metrics) = controller
        .wait_for("/metrics", within, |_, body| {
            has_line(body, "datastore_leader 1")
        })
        .await;
    assert!(
        metrics.contains(r#"datastore_experiments{phase="Running"} 0"#),
        "{metrics}"
    );
    // The datastore was reconciled (its Ready condition written) and counted.
    let (_, metrics) = controller
        .wait_for("/metrics", within, |_, body| {
            has_line(
                body,
                r#"datastore_reconciles_total{controller="datastore"} 1"#,
            )
        })
        .await;
    assert!(
        metrics.contains(r#"datastore_reconcile_duration_seconds_count{controller="datastore"} 1"#),
        "{metrics}"
    );
    let written = fake.lock().unwrap().datastores[0]["status"].clone();
    assert_eq!(written["conditions"][0]["reason"], "LocalOnly", "{written}");
    // The controllers' watches are open.
    let deadline = Instant::now() + within;
    loop {
        let requests = fake.lock().unwrap().requests.clone();
        let watching = |path: &str| {
            requests
                .iter()
                .any(|r| r.starts_with(&format!("GET {path}?")) && r.contains("watch=true"))
        };
        if [
            "/apis/datastore.dev/v1alpha1/experiments",
            "/apis/datastore.dev/v1alpha1/datastores",
            "/apis/datastore.dev/v1alpha1/clusterdatastores",
            "/apis/batch/v1/jobs",
            "/api/v1/pods",
        ]
        .iter()
        .all(|p| watching(p))
        {
            break;
        }
        assert!(Instant::now() < deadline, "not all watches: {requests:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        controller.terminate(Duration::from_secs(10)).await.code(),
        Some(0),
        "{}",
        controller.logs()
    );
    let logs = controller.logs();
    assert!(
        logs.contains("controllers started") && logs.contains("controllers stopped"),
        "{logs}"
    );
    let fake = fake.lock().unwrap();
    assert!(fake.refused.is_empty(), "{:?}", fake.refused);
    assert_eq!(count(&fake.requests, "GET /apis/coordination.k8s.io"), 0);
    assert!(fake.lease.is_none());
}

/// SIGTERM before the controllers' first lists are in (a leader elected a moment before, a slow
/// apiserver): they stop at once, nothing having run, instead of waiting for lists that the
/// stopped watches never finish.
#[tokio::test(flavor = "multi_thread")]
async fn a_sigterm_before_the_first_lists_are_in_stops_at_once() {
    let (port, fake) = fake_apiserver(Crds::StalledLists).await;
    let mut controller = Controller::start(port, "replica-a", &["--leader-election=false"]);
    let within = Duration::from_secs(15);
    controller
        .wait_for("/metrics", within, |_, body| {
            has_line(body, "datastore_leader 1")
        })
        .await;
    let deadline = Instant::now() + within;
    while fake
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.ends_with("(stalled)"))
        .count()
        < 3
    {
        assert!(Instant::now() < deadline, "the controllers did not list");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        controller.terminate(Duration::from_secs(5)).await.code(),
        Some(0),
        "{}",
        controller.logs()
    );
    assert!(controller.logs().contains("controllers stopped"));
}

/// Two replicas: one leads, the other waits ready; SIGTERM to the leader releases the Lease and
/// the other takes over. Every request is one the chart's RBAC grants.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_elect_one_leader_and_hand_over_on_sigterm() {
    let (port, fake) = fake_apiserver(Crds::Installed).await;
    let within = Duration::from_secs(15);
    let mut a = Controller::start(port, "replica-a", &[]);
    a.wait_for("/metrics", within, |_, body| {
        has_line(body, "datastore_leader 1")
    })
    .await;
    let holder = |fake: &Shared| {
        fake.lock().unwrap().lease.as_ref().unwrap()["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_string)
    };
    assert_eq!(holder(&fake).as_deref(), Some("replica-a"));

    let mut b = Controller::start(port, "replica-b", &[]);
    b.wait_for("/readyz", within, |code, _| code == 200).await;
    let (_, standby) = b.wait_for("/metrics", within, |code, _| code == 200).await;
    assert!(has_line(&standby, "datastore_leader 0"), "{standby}");
    assert!(
        !standby.contains("datastore_experiments"),
        "a standby has no cache to count: {standby}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, standby) = b.get("/metrics").await.unwrap();
    assert!(has_line(&standby, "datastore_leader 0"), "{standby}");

    assert_eq!(a.terminate(within).await.code(), Some(0), "{}", a.logs());
    assert!(
        a.logs().contains("released the leader lease"),
        "{}",
        a.logs()
    );
    assert_ne!(holder(&fake).as_deref(), Some("replica-a"));

    // B looks again when the lease it saw would have expired: within its 15 s.
    b.wait_for("/metrics", Duration::from_secs(25), |_, body| {
        has_line(body, "datastore_leader 1")
    })
    .await;
    assert_eq!(holder(&fake).as_deref(), Some("replica-b"));
    assert_eq!(b.terminate(within).await.code(), Some(0), "{}", b.logs());

    let fake = fake.lock().unwrap();
    assert!(fake.refused.is_empty(), "{:?}", fake.refused);
    let verbs: std::collections::BTreeSet<&str> = fake
        .requests
        .iter()
        .filter(|r| r.contains("/leases"))
        .map(|r| r.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        verbs,
        ["GET", "PATCH", "POST"].into(),
        "leases: get, create, patch"
    );
}

// -------------------------------------------------------------------------------------------
// Leader election, request by request (the scripted apiserver)

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn lease_held_by(holder: &str, duration: i64) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "datastore-operator", "namespace": OPERATOR_NS},
        "spec": {"holderIdentity": holder, "acquireTime": now(), "renewTime": now(),
                 "leaseDurationSeconds": duration, "leaseTransitions": 1},
    })
}

fn free_lease() -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "datastore-operator", "namespace": OPERATOR_NS},
        "spec": {},
    })
}

/// The requests that create the missing Lease and take it as `replica-a`, whose lease then says
/// it lasts `duration` seconds from now.
fn take_the_lease(duration: i64) -> Vec<apiserver::Exchange> {
    vec![
        expect(&format!("GET {LEASE}")).not_found(),
        expect(&format!("POST {LEASES}"))
            .body(|b| assert_eq!(b["metadata"]["name"], "datastore-operator"))
            .echo(),
        expect(&format!("GET {LEASE}")).ok(free_lease()),
        expect(&format!("GET {LEASE}")).ok(free_lease()),
        expect(&format!("PATCH {LEASE}"))
            .query("fieldManager=datastore-operator-replica-a")
            .body(|b| assert_eq!(b["spec"]["holderIdentity"], "replica-a"))
            .echo(),
        expect(&format!("PATCH {LEASE}"))
            .body(|b| assert_eq!(b["spec"]["leaseTransitions"], 1))
            .echo(),
        expect(&format!("GET {LEASE}")).ok(lease_held_by("replica-a", duration)),
    ]
}

/// Runs `lead` as `replica-a`; the controllers record that they ran and, told to stop, take
/// 200 ms to finish their reconciles in flight, then set `stopped`. `shutdown_after`: cancels
/// the shutdown token that long after the controllers started, or 3 s after the start when they
/// have not started by then (a standby).
async fn lead(
    script: Vec<apiserver::Exchange>,
    timing: Timing,
    shutdown_after: Option<Duration>,
    stopped: Arc<AtomicBool>,
) -> (Ended, bool, String) {
    let (client, server) = apiserver::start(script);
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let ran = Arc::new(Mutex::new(false));
    let manager = leader::manager(client, OPERATOR_NS, "replica-a", timing)
        .await
        .unwrap();
    let ran_in = ran.clone();
    let started = Arc::new(tokio::sync::Notify::new());
    let started_in = started.clone();
    let controllers = |stop: CancellationToken| async move {
        *ran_in.lock().unwrap() = true;
        started_in.notify_one();
        stop.cancelled().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        stopped.store(true, Ordering::SeqCst);
    };
    let cancel = async {
        if let Some(after) = shutdown_after {
            // A slow machine may take a while to lead: count from when the controllers start.
            if tokio::time::timeout(Duration::from_secs(3), started.notified())
                .await
                .is_ok()
            {
                tokio::time::sleep(after).await;
            }
            shutdown.cancel();
        }
    };
    let leading = leader::lead(
        &manager,
        "replica-a",
        timing,
        &shutdown,
        &metrics,
        controllers,
    );
    let (ended, ()) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(leading, cancel)
    })
    .await
    .expect("lead ends");
    drop(manager);
    server.done().await;
    let ran = *ran.lock().unwrap();
    (ended, ran, metrics.encode())
}

#[tokio::test]
async fn a_free_lease_is_taken_the_controllers_run_and_shutdown_releases_it() {
    let stopped = Arc::new(AtomicBool::new(false));
    let stopped_before = stopped.clone();
    let mut script = take_the_lease(15);
    script.extend([
        expect(&format!("PATCH {LEASE}"))
            .body(move |b| {
                assert!(b["spec"]["holderIdentity"].is_null(), "{b}");
                assert!(b["spec"]["renewTime"].is_null(), "{b}");
                assert!(
                    stopped_before.load(Ordering::SeqCst),
                    "released only after the controllers stopped: the terms never overlap"
                );
            })
            .echo(),
        expect(&format!("GET {LEASE}")).ok(free_lease()),
    ]);
    let (ended, ran, metrics) = lead(
        script,
        Timing::default(),
        Some(Duration::from_millis(500)),
        stopped,
    )
    .await;
    assert_eq!(ended, Ended::Shutdown);
    assert!(ran);
    assert!(has_line(&metrics, "datastore_leader 0"), "{metrics}");
}

#[tokio::test]
async fn a_lease_held_by_another_replica_keeps_this_one_waiting_and_releases_nothing() {
    let script = vec![
        expect(&format!("GET {LEASE}")).ok(lease_held_by("replica-b", 15)),
        expect(&format!("GET {LEASE}")).ok(lease_held_by("replica-b", 15)),
    ];
    let (ended, ran, metrics) = lead(
        script,
        Timing::default(),
        Some(Duration::from_millis(500)),
        Arc::default(),
    )
    .await;
    assert_eq!(ended, Ended::Shutdown);
    assert!(!ran, "a standby runs no controller");
    assert!(has_line(&metrics, "datastore_leader 0"), "{metrics}");
}

#[tokio::test]
async fn a_leader_that_cannot_renew_stops_its_controllers_and_says_so() {
    let timing = Timing {
        duration_seconds: 2,
        grace_seconds: 1,
        stop_timeout: Duration::from_secs(5),
    };
    let mut script = take_the_lease(2);
    // About a second later: the renewal fails.
    script.push(
        expect(&format!("PATCH {LEASE}"))
            .body(|b| assert!(b["spec"]["renewTime"].is_string(), "{b}"))
            .reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500}),
            ),
    );
    let (ended, ran, metrics) = lead(script, timing, None, Arc::default()).await;
    let Ended::Lost(why) = ended else {
        panic!("{ended:?}")
    };
    assert!(
        why.starts_with("renewing the lease failed") && why.contains("etcdserver"),
        "{why}"
    );
    assert!(ran);
    assert!(has_line(&metrics, "datastore_leader 0"), "{metrics}");
}

#[tokio::test]
async fn a_leader_that_finds_another_holder_stops_its_controllers() {
    let timing = Timing {
        duration_seconds: 2,
        grace_seconds: 1,
        stop_timeout: Duration::from_secs(5),
    };
    let mut script = take_the_lease(2);
    script.extend([
        expect(&format!("PATCH {LEASE}")).echo(),
        expect(&format!("GET {LEASE}")).ok(lease_held_by("replica-b", 15)),
    ]);
    let (ended, ran, _) = lead(script, timing, None, Arc::default()).await;
    assert_eq!(
        ended,
        Ended::Lost("another replica holds the lease now".to_string())
    );
    assert!(ran);
}

// -------------------------------------------------------------------------------------------
// Metrics recorded by a reconcile (the scripted apiserver)

const NS: &str = "ml";
const UID: &str = "6a1f0e52-0000-4000-8000-000000000001";
const RUN: &str = "/apis/batch/v1/namespaces/ml/jobs/train-run";
const UPLOAD: &str = "/apis/batch/v1/namespaces/ml/jobs/train-upload";
const PODS: &str = "/api/v1/namespaces/ml/pods";

fn finished_job(name: &str) -> Value {
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "20", "ownerReferences": [{
            "apiVersion": "datastore.dev/v1alpha1", "kind": "Experiment", "name": "train", "uid": UID,
            "controller": true, "blockOwnerDeletion": true,
        }]},
        "spec": {"template": {"spec": {"containers": [{"name": "main", "image": "x"}]}}},
        "status": {"conditions": [{"type": "Complete", "status": "True", "reason": "Completed", "message": "done"}]},
    })
}

/// The pods of `job`: one, whose containers ended with these termination messages.
fn job_pods(job: &str, init: &[(&str, &str)], main: &[(&str, &str)]) -> apiserver::Exchange {
    let containers = |list: &[(&str, &str)]| -> Vec<Value> {
        list.iter()
            .map(|(name, message)| json!({"name": name, "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": message}}}))
            .collect()
    };
    expect(&format!("GET {PODS}"))
        .query(&format!("labelSelector=batch.kubernetes.io%2Fjob-name%3D{job}"))
        .ok(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "30"}, "items": [{
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{job}-abcde"), "namespace": NS, "creationTimestamp": "2026-11-24T12:00:05Z"},
            "status": {"phase": "Succeeded", "initContainerStatuses": containers(init), "containerStatuses": containers(main)},
        }]}))
}

/// The run and the upload ended in one go: the inputs the run saw are recorded by the status
/// write that records the upload (before the pods that report them are deleted), and both
/// byte counters move, once each although two status writes carry the inputs.
#[tokio::test]
async fn a_finished_experiment_counts_the_bytes_its_agents_moved() {
    use datastore_operator::api::{Experiment, ExperimentSpec, ExperimentStatus, Phase};
    use datastore_operator::controller::{Context, experiment};
    use datastore_operator::render::BuildContext;
    let spec: ExperimentSpec = serde_saphyr::from_str(
        r#"
image: python:3.12-slim
entryScript: training_script.py
scriptParams:
  - name: --data_folder
    dataReference: {datastore: blob-ds, path: data/files, mode: download, pathOnCompute: training_data}
  - name: --output_dir
    dataReference: {datastore: blob-ds, path: outputs/run1, mode: upload, pathOnCompute: outputs}
"#,
    )
    .unwrap();
    let mut exp = Experiment::new("train", spec);
    exp.metadata.namespace = Some(NS.into());
    exp.metadata.uid = Some(UID.into());
    exp.metadata.generation = Some(1);
    exp.status = Some(ExperimentStatus {
        phase: Some(Phase::Uploading),
        start_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_790_000_000).unwrap(),
        )),
        ..Default::default()
    });
    let echo_exp = serde_json::to_value(&exp).unwrap();
    let script = vec![
        expect(&format!("GET {RUN}")).ok(finished_job("train-run")),
        job_pods(
            "train-run",
            &[(
                "download-0",
                r#"{"files":3,"bytes":1234,"digest":"sha256:5b1c"}"#,
            )],
            &[("main", "")],
        ),
        expect("GET /apis/datastore.dev/v1alpha1/namespaces/ml/datastores/blob-ds").ok(json!({
            "apiVersion": "datastore.dev/v1alpha1", "kind": "Datastore",
            "metadata": {"name": "blob-ds", "namespace": NS, "uid": "uid-ds", "resourceVersion": "7", "generation": 1},
            "spec": {"azureBlob": {"accountName": "mlstorage", "containerName": "training"}},
        })),
        expect(&format!("GET {UPLOAD}")).ok(finished_job("train-upload")),
        job_pods(
            "train-upload",
            &[],
            &[("upload-0", r#"{"uploaded":2,"skipped":0,"bytes":10}"#)],
        ),
        // The decision first (it records the inputs), then the pods, then the claim.
        apiserver::apply("/apis/datastore.dev/v1alpha1/namespaces/ml/experiments/train/status")
            .body(|b| {
                assert_eq!(b["status"]["phase"], "Uploading", "{b}");
                assert_eq!(b["status"]["inputs"][0]["bytes"], 1234, "{b}");
            })
            .ok(echo_exp.clone()),
        apiserver::event(NS),
        expect("DELETE /api/v1/namespaces/ml/pods/train-run-abcde")
            .ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}})),
        expect("DELETE /api/v1/namespaces/ml/pods/train-upload-abcde")
            .ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}})),
        expect("DELETE /api/v1/namespaces/ml/persistentvolumeclaims/train-outputs")
            .ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}})),
        apiserver::apply("/apis/datastore.dev/v1alpha1/namespaces/ml/experiments/train/status")
            .body(|b| {
                assert_eq!(b["status"]["phase"], "Succeeded", "{b}");
                assert_eq!(b["status"]["inputs"][0]["bytes"], 1234, "{b}");
            })
            .ok(echo_exp),
        apiserver::event(NS),
    ];
    let (client, server) = apiserver::start(script);
    let ctx = Arc::new(Context::new(
        client,
        OPERATOR_NS.into(),
        BuildContext::default(),
    ));
    let metrics = ctx.metrics.clone();
    experiment::reconcile(Arc::new(exp), ctx).await.unwrap();
    server.done().await;
    let text = metrics.encode();
    assert!(
        has_line(&text, "datastore_downloaded_bytes_total 1234"),
        "{text}"
    );
    assert!(
        has_line(&text, "datastore_uploaded_bytes_total 10"),
        "{text}"
    );
}
