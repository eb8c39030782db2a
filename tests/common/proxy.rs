//! A TCP proxy on 127.0.0.1 in front of Azurite, for what a test must see or shape of the
//! traffic: it counts the requests that read a blob (GETs that are not listings) and those that
//! get a blob's properties (HEADs), and can slow the answers down (a delay per piece, or a rate shared by all connections).

use std::sync::atomic::{AtomicUsize, Ordering};
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
}

pub struct Proxy {
    pub port: u16,
    /// Blob reads seen so far.
    pub reads: Arc<AtomicUsize>,
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
}

/// Starts a proxy in front of this binary's Azurite, on the current tokio runtime.
pub async fn start(pace: Pace) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let reads = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(AtomicUsize::new(0));
    let (counted, counted_heads) = (reads.clone(), heads.clone());
    let upstream = format!("127.0.0.1:{}", super::azurite_port());
    // The time the bytes sent so far may all have gone out by, at the rate.
    let paced = Arc::new(Mutex::new(tokio::time::Instant::now()));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (upstream, counted, counted_heads, paced) = (
                upstream.clone(),
                counted.clone(),
                counted_heads.clone(),
                paced.clone(),
            );
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
                        if let Some(rate) = pace.bytes_per_second {
                            let due = {
                                let mut paced = paced.lock().unwrap();
                                let now = tokio::time::Instant::now();
                                *paced = (*paced).max(now)
                                    + Duration::from_secs_f64(n as f64 / rate as f64);
                                *paced
                            };
                            tokio::time::sleep_until(due).await;
                        }
                        if client_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
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
                    if server_write.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = server_write.shutdown().await;
            });
        }
    });
    Proxy { port, reads, heads }
}
