"""Helm v4 as tests/chart.rs uses it, through helm-python-sdk (Helm's Go SDK as a library, no
helm binary). `make test-deps` installs it into .tools/venv; run with that venv's python.

    helm.py render CHART [--values FILE] [--release NAME] [--namespace NS]
        What `helm install` would create, as JSON on stdout:
        {"manifests": [{"source": "<chart>/templates/x.yaml", "yaml": "..."}], "notes": "..."}
        in Helm's install order (kind, then source). Values are checked against
        values.schema.json first, as by an install.
    helm.py lint CHART [--values FILE]
        `helm lint --strict --kube-version 1.30.0`: prints the findings; exit 1 when any is a
        warning or an error.

Exit codes: 0 done, 1 refused (the message on stderr names why), 2 usage, 3 the SDK is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

try:
    import helm_python as helm
except ImportError as e:  # reported by the Rust test as is
    print(
        f"helm-python-sdk is not installed ({e}): run `make test-deps` "
        "(it installs it into .tools/venv)",
        file=sys.stderr,
    )
    sys.exit(3)

KUBE_VERSION = "v1.30.0"

# Helm's install order (pkg/release/util/kind_sorter.go), for the kinds a chart may hold.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]


def load_values(path: str | None) -> dict:
    if path is None:
        return {}
    with open(path, encoding="utf-8") as f:
        return helm.values_from_yaml(f.read()) or {}


def kind_of(doc: str) -> str:
    match = re.search(r"^kind:\s*(\S+)", doc, re.MULTILINE)
    return match.group(1) if match else ""


def split_documents(text: str) -> list[str]:
    """The non-empty YAML documents of one rendered template."""
    docs = re.split(r"^---\s*$", text, flags=re.MULTILINE)
    return [d.strip("\n") + "\n" for d in docs if re.search(r"^[^#\s]", d, re.MULTILINE)]


def render(args: argparse.Namespace) -> int:
    values = load_values(args.values)
    with helm.Chart.load(args.chart) as chart:
        # Like an install, rendering checks the values against values.schema.json first.
        rendered = chart.render(
            values, name=args.release, namespace=args.namespace, is_install=True
        )
    notes = ""
    manifests = []
    for source, text in rendered.items():
        if source.endswith("NOTES.txt"):
            notes = text
            continue
        if not source.endswith((".yaml", ".yml")):
            continue
        for doc in split_documents(text):
            manifests.append({"source": source, "yaml": doc})

    def order(m: dict) -> tuple:
        kind = kind_of(m["yaml"])
        rank = INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)
        return (rank, kind, m["source"])

    manifests.sort(key=order)
    json.dump({"manifests": manifests, "notes": notes}, sys.stdout)
    return 0


def lint(args: argparse.Namespace) -> int:
    report = helm.lint(
        args.chart,
        load_values(args.values),
        strict=True,
        namespace=args.namespace,
        kube_version=KUBE_VERSION,
    )
    # Severity 1 is information (e.g. "icon is recommended"); 2 warning, 3 error, 0 unknown.
    messages = report.get("messages") or []
    for m in messages:
        print(f"[{m.get('severity')}] {m.get('path')}: {m.get('error')}")
    findings = [m for m in messages if m.get("severity") != 1] + list(report.get("errors") or [])
    for e in report.get("errors") or []:
        print(e)
    if report.get("total_charts_linted") != 1:
        print(f"linted {report.get('total_charts_linted')} charts, expected 1")
        return 1
    return 1 if findings else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["render", "lint"])
    parser.add_argument("chart")
    parser.add_argument("--values")
    parser.add_argument("--release", default="datastore-operator")
    parser.add_argument("--namespace", default="datastore-operator")
    args = parser.parse_args()
    try:
        return render(args) if args.command == "render" else lint(args)
    except helm.HelmError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
