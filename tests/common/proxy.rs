//! A TCP proxy on 127.0.0.1 in front of Azurite, for what a test must see or shape of the
//! traffic: it counts the requests that read a blob (GETs that are not listings), those that
//! get a blob's properties (HEADs) and the bytes it passes on, and can slow the traffic down (a
//! delay per piece of an answer, or a rate shared by all connections, each way).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How the proxy slows the answers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pace {
    /// Waited before each piece of an answer is passed on.
    pub delay: Duration,
    /// At most this many bytes a second towards the clients, all connections together.
    pub bytes_per_second: Option<u64>,
    /// At most this many bytes a second towards Azurite (what uploads send).
    pub upload_bytes_per_second: Option<u64>,
}

pub struct Proxy {
    pub port: u16,
    /// Blob reads seen so far.
    pub reads: Arc<AtomicUsize>,
    /// Bytes passed on so far, both ways.
    pub moved: Arc<AtomicU64>,
    /// Get Blob Properties requests seen so far.
    pub heads: Arc<AtomicUsize>,
}

impl Proxy {
    /// The account's endpoint through the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{}", self.port, super::ACCOUNT)
    }

    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    pub fn heads(&self) -> usize {
        self.heads.load(Ordering::SeqCst)
    }

    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::SeqCst)
    }
}

/// The time the bytes sent so far at `rate` may all have gone out by: waits until then.
async fn pace_to(rate: Option<u64>, clock: &Mutex<tokio::time::Instant>, n: usize) {
    let Some(rate) = rate else { return };
    let due = {
        let mut clock = clock.lock().unwrap();
        let now = tokio::time::Instant::now();
        *clock = (*clock).max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
        *clock
    };
    tokio::time::sleep_until(due).await;
}

/// Starts a proxy in front of this binary's Azurite, on the current tokio runtime.
pub async fn start(pace: Pace) -> Proxy {
    start_to(super::azurite_port(), pace).await
}

/// Starts a proxy in front of the Azurite on `upstream_port`, on the current tokio runtime.
/// While nothing listens there, a connection is accepted and closed at once, as a load
/// balancer in front of a storage service that is down does.
pub async fn start_to(upstream_port: u16, pace: Pace) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let reads = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(AtomicUsize::new(0));
    let moved = Arc::new(AtomicU64::new(0));
    let (counted, counted_heads, counted_bytes) = (reads.clone(), heads.clone(), moved.clone());
    let upstream = format!("127.0.0.1:{upstream_port}");
    let paced = Arc::new(Mutex::new(tokio::time::Instant::now()));
    let paced_up = Arc::new(Mutex::new(tokio::time::Instant::now()));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (upstream, counted, counted_heads, paced, paced_up) = (
                upstream.clone(),
                counted.clone(),
                counted_heads.clone(),
                paced.clone(),
                paced_up.clone(),
            );
            let (moved_down, moved_up) = (counted_bytes.clone(), counted_bytes.clone());
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 16 * 1024];
                    while let Ok(n) = server_read.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        tokio::time::sleep(pace.delay).await;
                        pace_to(pace.bytes_per_second, &paced, n).await;
                        if client_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                        moved_down.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    let _ = client_write.shutdown().await;
                });
                let mut buffer = vec![0u8; 64 * 1024];
                while let Ok(n) = client_read.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    // Request lines start a packet on a kept-alive connection, near enough for
                    // a count: the requests that read have no body.
                    let text = String::from_utf8_lossy(&buffer[..n]);
                    counted.fetch_add(
                        text.lines()
                            .filter(|l| l.starts_with("GET ") && !l.contains("comp=list"))
                            .count(),
                        Ordering::SeqCst,
                    );
                    counted_heads.fetch_add(
                        text.lines().filter(|l| l.starts_with("HEAD ")).count(),
                        Ordering::SeqCst,
                    );
                    pace_to(pace.upload_bytes_per_second, &paced_up, n).await;
                    if server_write.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                    moved_up.fetch_add(n as u64, Ordering::SeqCst);
                }
                let _ = server_write.shutdown().await;
            });
        }
    });
    Proxy {
        port,
        reads,
        heads,
        moved,
    }
}
