//! The operator image's layout as the Dockerfile defines it: the final stage's `COPY` of the
//! binary, its `USER` and its `ENTRYPOINT`. The one place tests read it from, so that what the
//! builders render is checked against what the image holds, not against the same constant.

use std::path::Path;

/// The final stage of the Dockerfile (after its last `FROM`), one instruction per line.
fn final_stage() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    let text = std::fs::read_to_string(&path).expect("the Dockerfile is readable");
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    let last_from = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("the Dockerfile has a FROM");
    lines[last_from..].to_vec()
}

fn instruction(name: &str) -> String {
    final_stage()
        .into_iter()
        .filter_map(|l| l.strip_prefix(&format!("{name} ")).map(String::from))
        .next_back()
        .unwrap_or_else(|| panic!("the Dockerfile's final stage has no {name}"))
}

/// Where the final stage copies the `datastore` binary to.
pub fn binary_path() -> String {
    let copy = final_stage()
        .into_iter()
        .find(|l| l.starts_with("COPY ") && l.contains("datastore"))
        .expect("the final stage copies the datastore binary");
    copy.split_whitespace()
        .last()
        .expect("COPY has a destination")
        .to_string()
}

/// The `ENTRYPOINT`, in its exec form.
pub fn entrypoint() -> Vec<String> {
    serde_json::from_str(&instruction("ENTRYPOINT"))
        .expect("ENTRYPOINT is in exec form, a JSON array")
}

/// The `USER` as `uid:gid`.
pub fn user() -> String {
    instruction("USER")
}
