//! A scripted Kubernetes apiserver (`tower_test::mock::pair`): every request the client makes is
//! checked against the script, in order (method, path, query, body), and nothing more may be
//! asked once the script is done.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

/// Inspects a request's JSON body (panics on what is wrong).
type BodyCheck = Box<dyn FnOnce(&Value) + Send>;

/// One expected request and the apiserver's answer.
pub struct Exchange {
    method: Method,
    path: String,
    query: Vec<String>,
    check: Option<BodyCheck>,
    reply: Reply,
    /// For a server-side apply: the object exists already, so the apply does not create it.
    exists: bool,
}

enum Reply {
    Json(StatusCode, Value),
    /// 200 with the request's own body: what apply and create return, near enough.
    Echo,
    /// A watch: these events, one JSON object per line, then the end of the stream.
    Events(Vec<Value>),
    /// Plain text, as the log subresource answers.
    Text(String),
}

/// `expect("GET /api/v1/namespaces/ml/pods")`: a request with this method and path (the query
/// is checked with [`Exchange::query`]). Answers 200 `{}` unless told otherwise.
pub fn expect(request: &str) -> Exchange {
    let (method, path) = request.split_once(' ').expect("METHOD /path");
    Exchange {
        method: method.parse().expect("an HTTP method"),
        path: path.to_string(),
        query: Vec::new(),
        check: None,
        reply: Reply::Json(StatusCode::OK, json!({})),
        exists: false,
    }
}

/// A server-side apply (PATCH) of `path` as the operator, forcing conflicts, answered with the
/// applied object. The object does not exist yet, so the apply creates it and RBAC must grant
/// `create` too, as a real apiserver requires; [`Exchange::exists`] says otherwise.
pub fn apply(path: &str) -> Exchange {
    expect(&format!("PATCH {path}"))
        .query("fieldManager=datastore-operator")
        .query("force=true")
        .echo()
}

/// An event (events.k8s.io/v1) created in `namespace`.
pub fn event(namespace: &str) -> Exchange {
    expect(&format!(
        "POST /apis/events.k8s.io/v1/namespaces/{namespace}/events"
    ))
    .echo()
}

impl Exchange {
    /// The query must contain this (already percent-encoded) text.
    pub fn query(mut self, part: &str) -> Exchange {
        self.query.push(part.to_string());
        self
    }
    /// Checks the request's JSON body.
    pub fn body(mut self, check: impl FnOnce(&Value) + Send + 'static) -> Exchange {
        self.check = Some(Box::new(check));
        self
    }
    pub fn ok(mut self, body: Value) -> Exchange {
        self.reply = Reply::Json(StatusCode::OK, body);
        self
    }
    pub fn reply(mut self, status: StatusCode, body: Value) -> Exchange {
        self.reply = Reply::Json(status, body);
        self
    }
    /// Answers a watch with `(type, object)` events, e.g. `("MODIFIED", experiment)`.
    pub fn events(mut self, events: Vec<(&str, Value)>) -> Exchange {
        self.reply = Reply::Events(
            events
                .into_iter()
                .map(|(kind, object)| json!({"type": kind, "object": object}))
                .collect(),
        );
        self
    }
    /// Answers 200 with plain text (a pod's log).
    pub fn text(mut self, text: &str) -> Exchange {
        self.reply = Reply::Text(text.to_string());
        self
    }
    /// The applied object exists already: the apply only patches it.
    pub fn exists(mut self) -> Exchange {
        self.exists = true;
        self
    }
    pub fn echo(mut self) -> Exchange {
        self.reply = Reply::Echo;
        self
    }
    /// A 404 as a real apiserver sends it (a `Status`), so `get_opt` returns `None`.
    pub fn not_found(mut self) -> Exchange {
        let name = self.path.rsplit('/').next().unwrap_or_default().to_string();
        self.reply = Reply::Json(
            StatusCode::NOT_FOUND,
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("\"{name}\" not found"), "reason": "NotFound",
                "details": {"name": name}, "code": 404,
            }),
        );
        self
    }
}

/// A client talking to the script; the handle finishes once every request matched and the
/// client is gone. Await [`Server::done`] after the code under test.
pub fn start(script: Vec<Exchange>) -> (kube::Client, Server) {
    serve_script(script, None)
}

/// [`start`] for the operator running in `operator_namespace`: every request must also be one
/// the controller's RBAC rules (`src/controller/rbac.rs`, the chart's) grant.
pub fn start_as_controller(
    script: Vec<Exchange>,
    operator_namespace: &'static str,
) -> (kube::Client, Server) {
    serve_script(script, Some(operator_namespace))
}

fn serve_script(script: Vec<Exchange>, rbac: Option<&'static str>) -> (kube::Client, Server) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(serve(handle, script, rbac));
    (kube::Client::new(service, "default"), Server(task))
}

pub struct Server(tokio::task::JoinHandle<()>);

impl Server {
    /// Waits until the client is dropped and fails if a request was missing or unexpected.
    pub async fn done(self) {
        tokio::time::timeout(Duration::from_secs(10), self.0)
            .await
            .expect("the mocked apiserver finishes once the client is dropped")
            .expect("every request matched the script");
    }
}

async fn serve(
    mut handle: Handle<Request<Body>, Response<Body>>,
    script: Vec<Exchange>,
    rbac: Option<&'static str>,
) {
    for (i, want) in script.into_iter().enumerate() {
        let n = i + 1;
        let (request, send) = handle.next_request().await.unwrap_or_else(|| {
            panic!(
                "request {n} was never made: expected {} {}",
                want.method, want.path
            )
        });
        let (method, path, query) = (
            request.method().clone(),
            request.uri().path().to_string(),
            request.uri().query().unwrap_or_default().to_string(),
        );
        assert_eq!(
            format!("{method} {path}"),
            format!("{} {}", want.method, want.path),
            "request {n} differs from the script"
        );
        let is_apply = request
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes() == b"application/apply-patch+yaml");
        if let Some(namespace) = rbac {
            use datastore_operator::controller::rbac;
            // An apply that creates is authorized as `patch`, then as `create`.
            let checked = if is_apply && !want.exists {
                rbac::check_apply_create(&path, &query, namespace)
            } else {
                rbac::check(method.as_str(), &path, &query, namespace)
            };
            if let Err(why) = checked {
                panic!("request {n}: {why}");
            }
        }
        for part in &want.query {
            assert!(
                query.contains(part.as_str()),
                "request {n} ({method} {path}): query {query:?} lacks {part:?}"
            );
        }
        if want.method == Method::PATCH && want.query.iter().any(|q| q.starts_with("fieldManager"))
        {
            let content_type = request
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string());
            assert_eq!(
                content_type.as_deref(),
                Some("application/apply-patch+yaml"),
                "request {n} is a server-side apply"
            );
        }
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("request {n} body is JSON: {e}"))
        };
        if let Some(check) = want.check {
            check(&body);
        }
        let (status, reply) = match want.reply {
            Reply::Json(status, value) => (status, serde_json::to_vec(&value).unwrap()),
            Reply::Echo => (StatusCode::OK, serde_json::to_vec(&body).unwrap()),
            Reply::Text(text) => (StatusCode::OK, text.into_bytes()),
            Reply::Events(events) => (
                StatusCode::OK,
                events
                    .iter()
                    .flat_map(|e| {
                        let mut line = serde_json::to_vec(e).unwrap();
                        line.push(b'\n');
                        line
                    })
                    .collect(),
            ),
        };
        send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(reply))
                .unwrap(),
        );
    }
    if let Some((extra, _)) = handle.next_request().await {
        panic!(
            "unexpected request after the script: {} {}",
            extra.method(),
            extra.uri()
        );
    }
}
