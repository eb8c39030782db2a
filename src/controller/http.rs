//! What the controller's HTTP server (`--http-addr`, [`crate::serve`]) answers: `GET /readyz`
//! is 200 once the apiserver answered and the CRDs are there, else 503 with the reason;
//! `GET /metrics` its metrics.

use std::sync::{Arc, Mutex};

use super::metrics::Metrics;

/// Where start-up is; `/readyz` answers from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Nothing asked yet.
    Starting,
    /// Waiting for something outside the process (CRDs, RBAC, the apiserver): why, in one line.
    Waiting(String),
    /// The apiserver answered and the CRDs are there (a standby replica is ready too).
    Ready,
    /// SIGTERM or SIGINT: finishing the reconciles in flight. Final.
    ShuttingDown,
}

/// The process's readiness, shared by the start-up loop and the server.
#[derive(Debug)]
pub struct Health {
    readiness: Mutex<Readiness>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            readiness: Mutex::new(Readiness::Starting),
        }
    }
}

impl Health {
    pub fn get(&self) -> Readiness {
        self.readiness.lock().expect("not poisoned").clone()
    }

    /// Moves to `next`; returns whether that changed anything, so that a caller retrying the same
    /// failure logs it once. Once shutting down, readiness never comes back.
    pub fn set(&self, next: Readiness) -> bool {
        let mut current = self.readiness.lock().expect("not poisoned");
        if *current == next || *current == Readiness::ShuttingDown {
            return false;
        }
        *current = next;
        true
    }

    /// `Ok` when ready; else why not, in one line.
    pub fn ready(&self) -> Result<(), String> {
        match self.get() {
            Readiness::Ready => Ok(()),
            Readiness::Starting => {
                Err("starting: the Kubernetes API has not been asked yet".into())
            }
            Readiness::Waiting(why) => Err(why),
            Readiness::ShuttingDown => {
                Err("shutting down: finishing the reconciles in flight".into())
            }
        }
    }
}

/// The controller's answers: its readiness and its metrics.
pub struct Endpoints {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
}

impl crate::serve::Endpoints for Endpoints {
    fn ready(&self) -> Result<(), String> {
        self.health.ready()
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::serve::{CONTENT_TYPE, serve};

    fn endpoints(health: Arc<Health>) -> Arc<Endpoints> {
        Arc::new(Endpoints {
            health,
            metrics: Arc::new(Metrics::new()),
        })
    }

    #[test]
    fn readiness_reports_each_change_once_and_shutting_down_is_final() {
        let health = Health::default();
        assert!(health.ready().unwrap_err().starts_with("starting"));
        let missing = Readiness::Waiting("the CRDs are not installed".into());
        assert!(health.set(missing.clone()), "a new reason is a change");
        assert!(!health.set(missing.clone()), "the same reason again is not");
        assert_eq!(health.ready(), Err("the CRDs are not installed".into()));
        assert!(health.set(Readiness::Waiting("forbidden".into())));
        assert!(health.set(Readiness::Ready));
        assert_eq!(health.ready(), Ok(()));
        assert!(health.set(Readiness::ShuttingDown));
        assert!(
            !health.set(Readiness::Ready),
            "no way back from shutting down"
        );
        assert!(health.ready().unwrap_err().starts_with("shutting down"));
    }

    /// Requests over a real socket: routes, methods, and the bounded header read.
    #[tokio::test]
    async fn routes_answer_and_the_rest_is_not_found() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(Health::default());
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, endpoints(health.clone()), stop.clone()));
        let ask = |request: &'static str| async move {
            let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
            socket.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            tokio::time::timeout(Duration::from_secs(5), socket.read_to_string(&mut answer))
                .await
                .expect("the server answers and closes")
                .unwrap();
            answer
        };
        let get = |path: &str| {
            let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            ask(Box::leak(request.into_boxed_str()))
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200 OK"));
        health.set(Readiness::Waiting("the CRDs are missing".into()));
        let readyz = get("/readyz").await;
        assert!(readyz.starts_with("HTTP/1.1 503"), "{readyz}");
        assert!(
            readyz.ends_with("not ready: the CRDs are missing\n"),
            "{readyz}"
        );
        health.set(Readiness::Ready);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200 OK"));
        let metrics = get("/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
        assert!(metrics.contains(CONTENT_TYPE), "{metrics}");
        assert!(metrics.contains("datastore_leader 0"), "{metrics}");
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        assert!(get("/healthz/x").await.starts_with("HTTP/1.1 404"));
        let post = ask(
            "POST /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        // Headers bigger than the buffer are refused, not buffered.
        let huge: &'static str = Box::leak(
            format!(
                "GET /healthz HTTP/1.1\r\nx: {}\r\nconnection: close\r\n\r\n",
                "a".repeat(64 * 1024)
            )
            .into_boxed_str(),
        );
        let refused = ask(huge).await;
        assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops when told")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_the_header_timeout() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, endpoints(Arc::default()), stop.clone()));
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut answer = Vec::new();
        // With time paused, this returns only if the server closes the connection on its own.
        tokio::time::timeout(Duration::from_secs(30), socket.read_to_end(&mut answer))
            .await
            .expect("closed within the header timeout")
            .unwrap();
        stop.cancel();
    }
}
