//! A TCP proxy on 127.0.0.1 in front of Azurite that acts a network cut: it counts the bytes
//! it forwards each way and, once a direction has carried its budget, forwards no more (the
//! connections hang, as when a link drops) until the cut is mended, which drops them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct CutProxy {
    pub port: u16,
    /// Bytes forwarded client → server and server → client.
    pub up: Arc<AtomicU64>,
    pub down: Arc<AtomicU64>,
    up_budget: Arc<AtomicU64>,
    down_budget: Arc<AtomicU64>,
    /// Bumped by `mend`: connections of an earlier epoch are dropped, not resumed.
    epoch: Arc<AtomicU64>,
}

impl CutProxy {
    pub async fn start(upstream: u16) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let counter = || Arc::new(AtomicU64::new(0));
        let unlimited = || Arc::new(AtomicU64::new(u64::MAX));
        let proxy = CutProxy {
            port,
            up: counter(),
            down: counter(),
            up_budget: unlimited(),
            down_budget: unlimited(),
            epoch: counter(),
        };
        let (up, down, up_budget, down_budget, epoch) = (
            proxy.up.clone(),
            proxy.down.clone(),
            proxy.up_budget.clone(),
            proxy.down_budget.clone(),
            proxy.epoch.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let born = epoch.load(Ordering::SeqCst);
                let (up, up_budget, down, down_budget) = (
                    up.clone(),
                    up_budget.clone(),
                    down.clone(),
                    down_budget.clone(),
                );
                let (e1, e2) = (epoch.clone(), epoch.clone());
                tokio::spawn(async move {
                    pipe(client_read, server_write, &up, &up_budget, &e1, born).await
                });
                tokio::spawn(async move {
                    pipe(server_read, client_write, &down, &down_budget, &e2, born).await
                });
            }
        });
        proxy
    }

    /// Forwards no more than `bytes` client → server (counted from the start).
    pub fn cut_up_after(&self, bytes: u64) {
        self.up_budget.store(bytes, Ordering::SeqCst);
    }

    /// Forwards no more than `bytes` server → client (counted from the start).
    pub fn cut_down_after(&self, bytes: u64) {
        self.down_budget.store(bytes, Ordering::SeqCst);
    }

    /// Lifts the cut; the connections it hung are dropped (their bytes in flight are lost).
    pub fn mend(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.up_budget.store(u64::MAX, Ordering::SeqCst);
        self.down_budget.store(u64::MAX, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, never past the budget; at the budget it waits until the cut is
/// mended, then drops the connection.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: &AtomicU64,
    budget: &AtomicU64,
    epoch: &AtomicU64,
    born: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        let mut sent = 0;
        while sent < n {
            let room = budget
                .load(Ordering::SeqCst)
                .saturating_sub(count.load(Ordering::SeqCst));
            if epoch.load(Ordering::SeqCst) != born {
                return;
            }
            if room == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            let chunk = (n - sent).min(room as usize);
            if to.write_all(&buf[sent..sent + chunk]).await.is_err() {
                return;
            }
            count.fetch_add(chunk as u64, Ordering::SeqCst);
            sent += chunk;
        }
    }
}
