use std::io::IsTerminal;

use clap::Parser;
use datastore_operator::cli::{self, Cli};

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_filter(), cli.json_logs());
    let runtime = tokio::runtime::Runtime::new().expect("the tokio runtime starts");
    let code = runtime.block_on(cli::run(cli));
    // Do not wait for blocking tasks of an interrupted run.
    runtime.shutdown_background();
    std::process::exit(code);
}

/// Logs on stderr: for a human, or JSON lines (agents, the controller in a pod; see
/// --log-format). The filter comes from --log-level / DATASTORE_LOG.
fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colours only for a terminal: a file or a pipe gets plain text.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.with_target(false).init();
    }
}
