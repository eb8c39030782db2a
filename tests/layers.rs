//! The house's layers: each top-level module of `src/` imports only modules below it, so there is
//! no cycle among them and the pure layers never reach up into the ones that do IO. The list
//! below is the one picture of the layers (see ../shared/DESIGN.md, "One way through the house").

use std::collections::BTreeMap;
use std::path::Path;

/// Top-level modules from the bottom up; a module may import those on lower lines only.
/// Modules on one line are siblings and import none of each other.
const LAYERS: &[&[&str]] = &[
    &[
        "atomic", "duration", "exit", "quantity", "reason", "serve", "signal", "yaml",
    ],
    &["paths"],
    &["error"],
    &["api"],
    &["store"],
    &["transfer"],
    &["cache"],
    &["plan"],
    &["render"],
    &["agent", "local", "controller", "csi"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level modules a source text names as `crate::<module>` (the crate uses no grouped
/// `crate::{...}` imports nor `super::super`, which this test also refuses).
fn imports(text: &str) -> Vec<String> {
    assert!(
        !text.contains("crate::{") && !text.contains("super::super"),
        "write `use crate::module::...` so that this test sees the import"
    );
    text.match_indices("crate::")
        .map(|(at, _)| {
            text[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each top-level module and the modules it imports, with a file that does.
fn graph() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut files = Vec::new();
    sources(&src, &mut files);
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let edges = graph.entry(top.clone()).or_default();
        for module in imports(&text) {
            if module != top {
                edges
                    .entry(module)
                    .or_insert_with(|| relative.display().to_string());
            }
        }
    }
    graph
}

#[test]
fn every_top_level_module_imports_only_the_layers_below_it() {
    let graph = graph();
    let mut wrong = Vec::new();
    for (module, edges) in &graph {
        let Some(layer) = layer_of(module) else {
            wrong.push(format!("{module} is in no layer: add it to LAYERS"));
            continue;
        };
        for (import, file) in edges {
            match layer_of(import) {
                Some(below) if below < layer => {}
                _ => wrong.push(format!("{module} imports {import} (src/{file})")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that point up or sideways:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_sees_grouped_and_nested_paths() {
    assert_eq!(
        imports("use crate::store::x;\nfn f() { crate::cli::report(crate::plan::X) }"),
        ["store", "cli", "plan"]
    );
}
