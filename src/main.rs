use clap::Parser;
use datastore_operator::cli::{self, Cli};

fn main() {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let runtime = tokio::runtime::Runtime::new().expect("the tokio runtime starts");
    let code = runtime.block_on(cli::run(cli));
    // Do not wait for blocking tasks of an interrupted run.
    runtime.shutdown_background();
    std::process::exit(code);
}

/// Human logs on stderr. The filter comes from --log-level / DATASTORE_LOG.
fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
