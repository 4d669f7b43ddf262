#!/usr/bin/env bash
# Validates every manifest in the repo offline with kubernetes-validate --strict
# (unknown fields are errors), against the oldest Kubernetes wsdrain supports with native
# sidecars (1.29) and the newest schema the tool ships. Called by `make test`.
# kubernetes-validate has no schemas for CRDs (cert-manager's Issuer/Certificate) nor for
# kustomization.yaml: those are reported as "not schema-checked", not silently passed.
set -euo pipefail
cd "$(dirname "$0")/.."

kv=.venv/bin/kubernetes-validate
if [[ ! -x $kv ]]; then
    echo "validate-manifests: $kv missing; run scripts/setup-deps.sh" >&2
    exit 2
fi

files=(sidecar.yaml)
for f in deploy/*.yaml; do
    [[ $(basename "$f") == kustomization.yaml ]] || files+=("$f")
done

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
    grep -v -e '^INFO' -e "Couldn't find schema" <<<"$out" | sed "s/^/[$label] /" || true
    grep "Couldn't find schema" <<<"$out" |
        sed -E "s/^WARN ([^ ]+) Couldn't find schema for kind ([^ ]+) with api version ([^ ]+).*/[$label] note: \1: \2 (\3) is a CRD kind without a schema here; not schema-checked/" || true
    echo "[$label] $(grep -c '^INFO' <<<"$out" || true) resources passed"
done

if [[ $status -ne 0 ]]; then
    echo "validate-manifests: FAILED" >&2
fi
exit $status
