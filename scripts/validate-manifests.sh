#!/usr/bin/env bash
# Validates every manifest in the repo offline (called by `make test`):
# - built-in kinds with kubernetes-validate --strict (unknown fields are errors), against
#   the oldest Kubernetes wsdrain supports with native sidecars (1.29) and the newest
#   schema the tool ships;
# - CRD kinds (PodMonitor, PrometheusRule, ScaledObject, cert-manager's Issuer and
#   Certificate, ...) strictly against the schemas in scripts/crd-schemas/, and PromQL in
#   alert rules, KEDA triggers and Grafana dashboards, by scripts/check-manifests.py;
# - Grafana dashboards (deploy/**/*.json) parse as JSON.
# Manifests: sidecar.yaml and every YAML file under deploy/ (examples, overlays and
# monitoring included), except kustomization.yaml and the patches a kustomization names
# (partial objects, not manifests).
set -euo pipefail
cd "$(dirname "$0")/.."

py=.venv/bin/python
kv=.venv/bin/kubernetes-validate
if [[ ! -x $kv ]] || ! $py -c 'import promql_parser, jsonschema, yaml' 2>/dev/null; then
    echo "validate-manifests: .venv lacks kubernetes-validate or promql-parser; run scripts/setup-deps.sh" >&2
    exit 2
fi

mapfile -t files < <($py scripts/check-manifests.py --list)
if [[ ${#files[@]} -eq 0 ]]; then
    echo "validate-manifests: no manifests found" >&2
    exit 2
fi
mapfile -t dashboards < <(find deploy -type f -name '*.json' | sort)

status=0
for version in 1.29.0 ""; do
    args=(--strict)
    [[ -n $version ]] && args+=(-k "$version")
    label=${version:-latest}
    if ! out=$("$kv" "${args[@]}" "${files[@]}" 2>&1); then
        status=1
    fi
    if grep -q '^ERROR' <<<"$out"; then
        status=1
    fi
    # CRD kinds have no schema here: check-manifests.py below validates them.
    grep -v -e '^INFO' -e "Couldn't find schema" <<<"$out" | sed "s/^/[$label] /" || true
    echo "[$label] $(grep -c '^INFO' <<<"$out" || true) built-in resources passed"
done

for d in "${dashboards[@]}"; do
    if ! python3 -m json.tool "$d" >/dev/null; then
        echo "validate-manifests: $d is not JSON" >&2
        status=1
    fi
done

$py scripts/check-manifests.py "${files[@]}" "${dashboards[@]}" || status=1

# The checker must catch what it claims to: every mistake in the bad fixtures is reported.
fixtures=tests/fixtures/manifests
if out=$($py scripts/check-manifests.py "$fixtures"/bad.yaml "$fixtures"/*.json 2>&1); then
    echo "validate-manifests: check-manifests.py passed the bad fixtures in $fixtures" >&2
    status=1
fi
while IFS= read -r expected; do
    if ! grep -qF -- "$expected" <<<"$out"; then
        echo "validate-manifests: check-manifests.py missed: $expected" >&2
        status=1
    fi
done <"$fixtures"/expected-errors.txt

if [[ $status -ne 0 ]]; then
    echo "validate-manifests: FAILED" >&2
fi
exit $status
