#!/usr/bin/env python3
"""Writes the openAPIV3Schema of each served version of the given CRD files to
scripts/crd-schemas/GROUP_VERSION_KIND.json, descriptions dropped (they are most of the
size), so scripts/check-manifests.py can validate CRD kinds offline.

    python3 scripts/vendor-crd-schemas.py path/to/crd.yaml ...
"""
import json
import os
import sys

import yaml

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crd-schemas")


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


for path in sys.argv[1:]:
    with open(path) as f:
        crd = yaml.safe_load(f)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    for version in crd["spec"]["versions"]:
        if not version.get("served", True):
            continue
        out = os.path.join(OUT, f"{group}_{version['name']}_{kind}.json")
        with open(out, "w") as f:
            json.dump(strip(version["schema"]["openAPIV3Schema"]), f, sort_keys=True, indent=1)
            f.write("\n")
        print(out)
