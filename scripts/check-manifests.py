#!/usr/bin/env python3
"""The offline checks kubernetes-validate cannot do (called by validate-manifests.sh):

- CRD kinds (PodMonitor, PrometheusRule, ScaledObject, Certificate, ...) against the
  schemas vendored in scripts/crd-schemas/, strictly: an unknown field is an error, as
  with `kubernetes-validate --strict`. A CRD kind without a vendored schema is an error.
- PromQL: every alert/record expression, every KEDA prometheus trigger query and every
  Grafana panel query parses (promql-parser, the Prometheus grammar), and every
  `wsdrain_*` series it reads is one the code in src/ exposes (a renamed metric fails
  here instead of emptying a panel).
- Grafana dashboards (*.json) parse as JSON and have uid, title and panels.

    check-manifests.py FILE...     # YAML manifests and dashboard JSON
    check-manifests.py --list      # the repo's manifests: sidecar.yaml and deploy/**/*.y*ml
                                   # except kustomizations and the patches they name
"""
import glob
import json
import os
import re
import sys

import jsonschema
import promql_parser
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMAS = os.path.join(ROOT, "scripts", "crd-schemas")

# The series prometheus-client exposes for each kind of metric registered as `base`.
SERIES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
}
SERIES["unknown"] = tuple(sorted({s for v in SERIES.values() for s in v}))

UNITS = ("_seconds", "_bytes")  # register_with_unit appends the unit

# ObjectMeta as manifests use it; the CRD schemas only say `type: object`.
METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def is_core(api_version):
    """Kinds kubernetes-validate has schemas for: the built-in API groups."""
    group = api_version.rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def strict(node):
    """Unknown fields become errors, except where the CRD says fields are free-form."""
    if isinstance(node, list):
        return [strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_schema(api_version, kind):
    group, _, version = api_version.rpartition("/")
    path = os.path.join(SCHEMAS, f"{group}_{version}_{kind}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        schema = strict(json.load(f))
    schema.setdefault("properties", {})["metadata"] = METADATA
    schema.setdefault("required", [])
    for field in ("apiVersion", "kind", "metadata"):
        if field not in schema["required"]:
            schema["required"].append(field)
    return schema


def registered_metrics():
    """Every series name the prometheus-client registries in src/ can expose.

    A metric is registered as `registry.register("name", "help", x.clone())` under the
    prefixes of its file's registries (all prefixes if the file makes none); its kind comes
    from the declaration of `x` (`x: Family<L, Counter>`, `let x = Histogram::new(..)`),
    which decides the suffixes: a counter is only `<name>_total`.
    """
    files = {}
    for path in glob.glob(os.path.join(ROOT, "src", "**", "*.rs"), recursive=True):
        with open(path) as f:
            files[path] = f.read()
    code = "\n".join(files.values())
    everywhere = {p for t in files.values() for p in re.findall(PREFIX, t)} or {""}
    series = set()
    for text in files.values():
        prefixes = set(re.findall(PREFIX, text)) or everywhere
        for m in re.finditer(REGISTER, text, re.S):
            with_unit, name, arg = m.groups()
            idents = re.findall(r"[a-z_][a-z0-9_]*", re.sub(r"\.clone\(\)|Box::new", "", arg))
            kind = metric_kind(code, idents[-1]) if idents else "unknown"
            units = UNITS if with_unit else ("",)
            for p in prefixes:
                base = f"{p}_{name}" if p else name
                series.update(base + u + s for u in units for s in SERIES[kind])
    return series


PREFIX = r'with_prefix\(\s*"([a-z0-9_]+)"'
REGISTER = r'\.register(_with_unit)?\(\s*"([a-z0-9_]+)"\s*,\s*"(?:[^"\\]|\\.)*"\s*,\s*([^;]*?)\)\s*;'


def metric_kind(code, ident):
    """The kind of the first declaration of `ident` that names a metric type."""
    decls = re.finditer(rf"\b{ident}\s*:\s*([^\n=;]+)|\blet\s+(?:mut\s+)?{ident}\b[^=\n]*=\s*([^\n;]+)", code)
    for decl in decls:
        ty = decl.group(1) or decl.group(2)
        for word, kind in (("Histogram", "histogram"), ("Counter", "counter"), ("Info", "info"), ("Gauge", "gauge")):
            if word in ty:
                return kind
    return "unknown"


class Checker:
    def __init__(self):
        self.errors = []
        self.checked = 0
        self.queries = 0
        self.known = registered_metrics()

    def error(self, where, msg):
        self.errors.append(f"{where}: {msg}")

    def promql(self, where, expr):
        self.queries += 1
        try:
            ast = promql_parser.parse(expr)
        except ValueError as e:
            self.error(where, f"PromQL does not parse: {e}: {expr!r}")
            return
        names = []

        def visit(node):
            if isinstance(node, promql_parser.VectorSelector) and node.name:
                names.append(node.name)
            return True

        promql_parser.walk(ast, visit)
        for name in names:
            if name.startswith("wsdrain_") and name not in self.known:
                self.error(where, f"{name} is not a series the code in src/ exposes")

    def manifest(self, path, index, doc):
        where = f"{path} #{index}"
        api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        if not api_version or not kind:
            self.error(where, "no apiVersion/kind")
            return
        name = (doc.get("metadata") or {}).get("name", "?")
        where = f"{path} {kind}/{name}"
        if not is_core(api_version):
            schema = load_schema(api_version, kind)
            if schema is None:
                self.error(
                    where,
                    f"no schema for {api_version} {kind} in scripts/crd-schemas/ "
                    "(add it with scripts/vendor-crd-schemas.py CRD.yaml)",
                )
                return
            for e in sorted(
                jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path)
            ):
                field = ".".join(str(p) for p in e.path) or "(root)"
                self.error(where, f"{field}: {e.message}")
            self.checked += 1
        if kind == "PrometheusRule":
            for group in (doc.get("spec") or {}).get("groups") or []:
                for rule in group.get("rules") or []:
                    label = rule.get("alert") or rule.get("record") or "?"
                    self.promql(f"{where} {group.get('name')}/{label}", str(rule.get("expr", "")))
        if kind == "ScaledObject":
            for trigger in (doc.get("spec") or {}).get("triggers") or []:
                if trigger.get("type") == "prometheus":
                    query = (trigger.get("metadata") or {}).get("query", "")
                    self.promql(f"{where} trigger", query)

    def yaml_file(self, path):
        try:
            with open(path) as f:
                docs = list(yaml.safe_load_all(f))
        except yaml.YAMLError as e:
            self.error(path, f"not YAML: {e}")
            return
        for i, doc in enumerate(docs):
            if doc is not None:
                self.manifest(path, i, doc)

    def dashboard(self, path):
        try:
            with open(path) as f:
                dash = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            self.error(path, f"not JSON: {e}")
            return
        for field in ("uid", "title", "panels"):
            if not dash.get(field):
                self.error(path, f"dashboard has no {field}")
        self.checked += 1

        def panels(items):
            for p in items or []:
                yield p
                yield from panels(p.get("panels"))

        for panel in panels(dash.get("panels")):
            for target in panel.get("targets") or []:
                if "expr" in target:
                    where = f"{path} panel {panel.get('title')!r} {target.get('refId', '')}"
                    self.promql(where, grafana_to_promql(target["expr"]))
        for var in (dash.get("templating") or {}).get("list") or []:
            query = var.get("query")
            if isinstance(query, dict):
                query = query.get("query")
            m = re.match(r"label_values\((.*),\s*\w+\)$", query or "")
            if m:
                self.promql(f"{path} variable {var.get('name')}", grafana_to_promql(m.group(1)))


def grafana_to_promql(expr):
    """Grafana's variables replaced by values Prometheus would see."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?(\w+)(:\w+)?\}?", ".*", expr)


def list_manifests():
    """Manifest files, relative to the repo root: what the validate and lint scripts check."""
    patches = set()
    for k in glob.glob(os.path.join(ROOT, "deploy", "**", "kustomization.y*ml"), recursive=True):
        with open(k) as f:
            doc = yaml.safe_load(f) or {}
        refs = [p.get("path") for p in doc.get("patches") or [] if isinstance(p, dict)]
        for key in ("patchesStrategicMerge", "patchesJson6902"):
            refs += [p.get("path") if isinstance(p, dict) else p for p in doc.get(key) or []]
        for ref in refs:
            # Inline patches are YAML text, not file names.
            if isinstance(ref, str) and "\n" not in ref:
                patches.add(os.path.normpath(os.path.join(os.path.dirname(k), ref)))
    files = [os.path.join(ROOT, "sidecar.yaml")]
    for ext in ("yaml", "yml"):
        files += glob.glob(os.path.join(ROOT, "deploy", "**", f"*.{ext}"), recursive=True)
    keep = []
    for f in sorted(files):
        if os.path.basename(f).startswith("kustomization.") or os.path.normpath(f) in patches:
            continue
        if not is_manifest(f):
            rel = os.path.relpath(f, ROOT)
            print(f"note: {rel}: no document has apiVersion or kind (Helm values?): not validated", file=sys.stderr)
            continue
        keep.append(os.path.relpath(f, ROOT))
    return keep


def is_manifest(path):
    """False for YAML that is no Kubernetes object at all, such as a Helm values file."""
    try:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except yaml.YAMLError:
        return True  # let the validators report it
    return not docs or any(isinstance(d, dict) and ("apiVersion" in d or "kind" in d) for d in docs)


def main(paths):
    c = Checker()
    for path in paths:
        if path.endswith(".json"):
            c.dashboard(path)
        else:
            c.yaml_file(path)
    for e in c.errors:
        print(f"ERROR {e}")
    print(
        f"check-manifests: {c.checked} CRD-kind resources and dashboards checked, "
        f"{c.queries} PromQL queries parsed, {len(c.errors)} errors"
    )
    return 1 if c.errors else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--list"]:
        print("\n".join(list_manifests()))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
