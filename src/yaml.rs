//! YAML in and out, through one maintained parser (serde-saphyr, which kube uses too). Every
//! YAML file a user hands us (the datastores file, an Experiment file) is read here, bounded in
//! size before parsing and in nesting while parsing: a few hundred KB of nested brackets took
//! the deprecated serde_yaml minutes of CPU.

use std::io::Read;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest YAML file read. A datastores file or an Experiment is a few KB; Kubernetes
/// itself stores no object above 1.5 MiB.
pub const MAX_BYTES: usize = 1024 * 1024;

/// The deepest nesting of lists and maps read. An Experiment nests about ten levels.
pub const MAX_DEPTH: usize = 64;

/// Why a YAML text was not read.
#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    #[error("{0}")]
    Read(std::io::Error),
    /// Over one of our bounds: what the text does ("nests ..."), the bound, and how to fix it;
    /// the caller puts the file's name in front.
    #[error("{0}")]
    Limit(String),
    /// Not YAML, or not the shape asked for: the parser's message, with line and column.
    #[error("{0}")]
    Invalid(String),
}

fn too_large() -> YamlError {
    YamlError::Limit(format!(
        "is larger than {} KiB, the most a datastores or Experiment file may hold; check that it is the right file, and keep only the objects the CLI needs in it",
        MAX_BYTES / 1024
    ))
}

/// Reads `path` as text, refusing (before reading it all) a file over [`MAX_BYTES`].
pub fn read_file(path: &Path) -> Result<String, YamlError> {
    let file = std::fs::File::open(path).map_err(YamlError::Read)?;
    let mut text = String::new();
    file.take(MAX_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(YamlError::Read)?;
    if text.len() > MAX_BYTES {
        return Err(too_large());
    }
    Ok(text)
}

fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    budget.flow_nesting_limit = MAX_DEPTH;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    // A snippet of the source would quote a datastores file's Secrets in the error message.
    options.with_snippet = false;
    options
}

fn error(e: serde_saphyr::Error) -> YamlError {
    use serde_saphyr::budget::BudgetBreach;
    use serde_saphyr::granit_parser::ErrorKind;
    use serde_saphyr::{Error, ExternalMessageSource};
    let too_deep = match &e {
        Error::Budget {
            breach: BudgetBreach::Depth { .. },
            ..
        } => true,
        // The scanner, running ahead of the depth count, stops `[[[...` and `{a: {a: ...` itself.
        Error::ExternalMessage { source, .. } => matches!(
            source.as_ref(),
            ExternalMessageSource::Parser(scan) if matches!(scan.kind(), ErrorKind::RecursionLimitExceeded)
        ),
        _ => false,
    };
    if too_deep {
        return YamlError::Limit(format!(
            "nests lists and maps more than {MAX_DEPTH} levels deep, the most read (no Experiment or datastores file comes near it); fix the file"
        ));
    }
    match &e {
        Error::Budget { breach, .. } => YamlError::Limit(format!(
            "exceeds a limit of the YAML reader ({breach:?}); no Experiment or datastores file comes near it, so fix the file"
        )),
        _ => YamlError::Invalid(e.to_string()),
    }
}

/// One YAML document as `T`.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    if text.len() > MAX_BYTES {
        return Err(too_large());
    }
    serde_saphyr::from_str_with_options(text, options()).map_err(error)
}

/// Every document of a YAML stream (`---`-separated) as `T`.
pub fn documents<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, YamlError> {
    if text.len() > MAX_BYTES {
        return Err(too_large());
    }
    serde_saphyr::from_str_multiple_with_options(text, options()).map_err(error)
}

/// `value` as a YAML document. A long line stays one line (not folded with `>`), so generated
/// files diff and grep by line.
pub fn to_string<T: Serialize>(value: &T) -> String {
    let mut options = serde_saphyr::SerializerOptions::default();
    options.folded_wrap_chars = usize::MAX;
    serde_saphyr::to_string_with_options(value, options).expect("our types serialize to YAML")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_quickly() {
        for text in [
            "[".repeat(200_000) + &"]".repeat(200_000),
            "{a: ".repeat(80_000) + "1" + &"}".repeat(80_000),
            (0..200)
                .map(|i| format!("{}- \n", "  ".repeat(i)))
                .collect(),
        ] {
            let started = std::time::Instant::now();
            let err = from_str::<serde_json::Value>(&text).unwrap_err();
            assert!(matches!(err, YamlError::Limit(_)), "{err}");
            assert!(err.to_string().contains("64 levels"), "{err}");
            assert!(started.elapsed().as_secs() < 2, "{:?}", started.elapsed());
        }
        // Nesting up to the bound is read.
        let ok = "[".repeat(MAX_DEPTH - 1) + &"]".repeat(MAX_DEPTH - 1);
        from_str::<serde_json::Value>(&ok).unwrap();
    }

    #[test]
    fn size_is_bounded_before_parsing() {
        let big = format!("a: '{}'\n", "x".repeat(MAX_BYTES));
        let err = from_str::<serde_json::Value>(&big).unwrap_err();
        assert!(err.to_string().contains("larger than 1024 KiB"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.yaml");
        std::fs::write(&path, &big).unwrap();
        assert!(matches!(read_file(&path), Err(YamlError::Limit(_))));
    }

    #[test]
    fn documents_keep_their_order_and_errors_name_the_line() {
        let docs: Vec<serde_json::Value> = documents("a: 1\n---\nb: 2\n").unwrap();
        assert_eq!(
            docs,
            [serde_json::json!({"a": 1}), serde_json::json!({"b": 2})]
        );
        let err = from_str::<serde_json::Value>("a: 1\nb: [\n").unwrap_err();
        assert!(matches!(err, YamlError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("line"), "{err}");
    }
}
