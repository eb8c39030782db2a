//! How a transfer's closing summary is printed: for a person, or as one JSON line (the agent's
//! output, read back by the controller).

use clap::ValueEnum;
use serde_json::json;

use super::{Failed, Summary};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Prints the closing summary (and error) of a transfer; returns the exit code.
pub fn report(output: Output, result: super::Result<Summary>) -> i32 {
    let (summary, error, reported) = match result {
        Ok(summary) => (summary, None, false),
        Err(Failed {
            summary,
            error,
            reported,
        }) => (summary, Some(error), reported),
    };
    match output {
        Output::Text => {
            match &error {
                // Each failed file has its line above: do not print the same error again.
                Some(_) if reported && summary.failed == 1 => {}
                Some(_) if reported => {
                    eprintln!(
                        "error: {} files failed (each is reported above)",
                        summary.failed
                    )
                }
                Some(e) => eprintln!("error: {e}"),
                None => {}
            }
            println!("{summary}");
        }
        Output::Json => {
            let mut value = serde_json::to_value(&summary).expect("a summary serializes");
            if let Some(e) = &error {
                value["error"] = json!({ "reason": e.reason(), "message": e.to_string() });
            }
            println!("{value}");
        }
    }
    error.map_or(0, |e| e.exit_code())
}
