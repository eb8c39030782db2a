//! Kubernetes objects as the apiserver returns them, for the scripted apiserver's answers.

use base64::Engine;
use serde_json::{Value, json};

/// A Secret as the apiserver returns it: values base64-encoded under `data`.
pub fn secret(ns: &str, name: &str, key: &str, value: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "9"},
        "data": {key: base64::engine::general_purpose::STANDARD.encode(value)},
    })
}
