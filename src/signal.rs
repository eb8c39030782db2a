//! The signals that stop a command, a run or the controller.

/// Waits for Ctrl-C (SIGINT) or SIGTERM (what Kubernetes sends a pod); returns the signal number.
pub async fn interrupted() -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => 2,
        _ = term.recv() => 15,
    }
}
