//! Leader election: the replica holding Lease `datastore-operator` in the operator namespace runs
//! the controllers; the others wait (ready, serving metrics) to take over.
//!
//! Through `kube-lease-manager`, which asks `leases` for get, create (once, when the Lease does not
//! exist) and patch (server-side apply to take it, strategic merge to renew and release it).
//!
//! A leader that cannot renew its lease, or finds another holder, stops its controllers and the
//! process exits non-zero: Kubernetes restarts it as a standby. Going back to standby within the
//! process would be possible, but exiting guarantees that nothing from the lost term survives (a
//! queued retry, a reconcile in flight, a stale watch cache), and it is what client-go's
//! controllers do. On SIGTERM the leader stops its controllers first, then releases the lease, so
//! the other replica takes over without waiting for it to expire and never overlaps with it.

use std::future::Future;
use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

/// The Lease's name (in the operator namespace).
pub const LEASE_NAME: &str = "datastore-operator";

/// How long a lease lives without renewal, and how long before that the leader renews it.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub duration_seconds: u64,
    pub grace_seconds: u64,
    /// How long stopping the controllers may take once the lease is lost.
    pub stop_timeout: Duration,
}

impl Default for Timing {
    /// A replica that died is replaced within 15 s; the leader renews every 8 s and steps down
    /// when a renewal fails, while 7 s of its lease are left (the lease client's requests time
    /// out well within that).
    fn default() -> Self {
        Timing {
            duration_seconds: 15,
            grace_seconds: 7,
            stop_timeout: Duration::from_secs(20),
        }
    }
}

/// This replica's name in the Lease: `$POD_NAME`, else `<hostname>-<pid>` (unique on a machine,
/// so two local processes are never both "the holder").
pub fn identity() -> String {
    if let Ok(name) = std::env::var("POD_NAME")
        && !name.trim().is_empty()
    {
        return name.trim().to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "datastore-controller".to_string());
    format!("{host}-{}", std::process::id())
}

/// Gets the Lease, creating it when it does not exist.
pub async fn manager(
    client: Client,
    namespace: &str,
    identity: &str,
    timing: Timing,
) -> Result<LeaseManager, kube_lease_manager::LeaseManagerError> {
    LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(timing.duration_seconds)
        .with_grace(timing.grace_seconds)
        // The builder derives the field manager from the identity only in LeaseParams::new.
        .with_field_manager(format!("datastore-operator-{identity}"))
        .build()
        .await
}

/// How a term as leader (or the wait for one) ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Shut down as asked; the lease was released if held.
    Shutdown,
    /// The lease was lost (or could not be renewed); the controllers were stopped.
    Lost(String),
}

/// Waits to hold the lease, then runs `controllers` (they stop when the token they are given is
/// cancelled) until `shutdown` or the loss of the lease.
pub async fn lead<F, Fut>(
    manager: &LeaseManager,
    identity: &str,
    timing: Timing,
    shutdown: &CancellationToken,
    metrics: &Metrics,
    controllers: F,
) -> Ended
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    // Standby: `changed` returns when the lease changes hands (it sleeps until the holder's
    // lease would expire in between); errors are retried with a capped backoff.
    let mut backoff = super::Backoff::default();
    let mut last_error = None;
    loop {
        let changed = tokio::select! {
            _ = shutdown.cancelled() => return Ended::Shutdown,
            changed = manager.changed() => changed,
        };
        match changed {
            Ok(true) => break,
            Ok(false) => backoff.reset(),
            Err(e) => {
                let message = e.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::warn!(error = %message, "cannot take part in leader election; retrying");
                    last_error = Some(message);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ended::Shutdown,
                    _ = tokio::time::sleep(backoff.wait()) => {}
                }
            }
        }
    }

    tracing::info!(%identity, lease = LEASE_NAME, "became the leader: starting the controllers");
    metrics.set_leader(true);
    let stop = CancellationToken::new();
    let running = controllers(stop.clone());
    tokio::pin!(running);
    let mut stopping = false;
    // `None`: the controllers stopped; `Some(why)`: the lease is lost, they still run.
    let lost = loop {
        tokio::select! {
            _ = &mut running => {
                if stopping {
                    break None;
                }
                // They stop only when told; never go on as a leader that reconciles nothing.
                metrics.set_leader(false);
                return Ended::Lost("the controllers stopped by themselves".to_string());
            }
            _ = shutdown.cancelled(), if !stopping => {
                // Keep renewing while the reconciles in flight finish: the other replica must
                // not start before they are done.
                stopping = true;
                stop.cancel();
            }
            changed = manager.changed() => match changed {
                Ok(true) => {}
                Ok(false) => break Some("another replica holds the lease now".to_string()),
                Err(e) => break Some(format!("renewing the lease failed ({e})")),
            },
        }
    };
    metrics.set_leader(false);
    let Some(why) = lost else {
        // Released only once the controllers stopped, so that two terms never overlap.
        match tokio::time::timeout(Duration::from_secs(5), manager.release()).await {
            Ok(Ok(())) => tracing::info!("released the leader lease"),
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                "cannot release the leader lease; the other replica takes over when it expires"
            ),
            Err(_) => tracing::warn!(
                "releasing the leader lease timed out; the other replica takes over when it expires"
            ),
        }
        return Ended::Shutdown;
    };
    stop.cancel();
    if tokio::time::timeout(timing.stop_timeout, running)
        .await
        .is_err()
    {
        tracing::warn!("the controllers did not stop in time");
    }
    if stopping {
        // Shutting down anyway: losing the lease on the way out is no failure.
        Ended::Shutdown
    } else {
        Ended::Lost(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_the_pod_name_else_host_and_pid() {
        // One test touches POD_NAME, so no other test races with it.
        unsafe { std::env::set_var("POD_NAME", "datastore-operator-7d9f-abcde") };
        assert_eq!(identity(), "datastore-operator-7d9f-abcde");
        unsafe { std::env::remove_var("POD_NAME") };
        let fallback = identity();
        assert!(
            fallback.ends_with(&format!("-{}", std::process::id())),
            "{fallback}"
        );
        assert!(fallback.len() > format!("-{}", std::process::id()).len());
    }
}
