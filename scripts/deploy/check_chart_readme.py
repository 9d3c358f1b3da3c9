#!/usr/bin/env python3
"""Every value of helm/pubgate/values.yaml is listed in helm/pubgate/README.md (as `path.to.value`), and
the README lists no value that does not exist.

    check_chart_readme.py CHART_DIR
"""
import re
import sys

import yaml

# Maps whose content is free-form (the README gives the whole map, not each key).
OPAQUE = {"annotations", "requests", "limits", "labels"}


def leaves(d, prefix=""):
    for k, v in d.items():
        path = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v and k not in OPAQUE and path != "config.limits":
            yield from leaves(v, path)
        else:
            yield path


def main():
    chart = sys.argv[1]
    values = yaml.safe_load(open(f"{chart}/values.yaml"))
    readme = open(f"{chart}/README.md").read()
    if "\n## Values\n" not in readme:
        print(f"ERROR {chart}/README.md has no '## Values' section")
        return 1
    readme = readme.split("\n## Values\n", 1)[1]
    listed = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", readme, re.M))
    paths = set(leaves(values))
    missing = sorted(paths - listed)
    unknown = sorted(listed - paths)
    for m in missing:
        print(f"ERROR {chart}/README.md does not list the value {m}")
    for u in unknown:
        print(f"ERROR {chart}/README.md lists {u}, which values.yaml does not have")
    print(f"check_chart_readme: {len(paths)} values, {len(missing) + len(unknown)} errors")
    return 1 if missing or unknown else 0


if __name__ == "__main__":
    sys.exit(main())
