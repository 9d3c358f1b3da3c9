#!/usr/bin/env python3
"""Checks the Grafana dashboard and the alert rules against the metrics pubgate really exports.

    check_metrics_use.py --repo DIR --dashboard FILE --rules FILE [--rules FILE ...] --promql-out FILE

* the dashboard is strict JSON (duplicate keys fail), has a uid/title, unique panel ids, panels inside
  the 24-column grid, and every panel a Prometheus query on the dashboard's datasource variable;
* every `pubgate_*` name in a dashboard query or an alert expression is a metric that
  gateway/src/metrics.rs registers and docs/metrics.md documents (histograms with their _bucket, _sum,
  _count series; process metrics of the Prometheus process collector);
* every dashboard query is written to --promql-out as a recording rule (Grafana's $__rate_interval and
  $node replaced), so `promtool check rules` parses each expression.
"""
import argparse
import json
import re
import sys

import yaml

PROCESS = {"process_cpu_seconds_total", "process_open_fds", "process_max_fds", "process_virtual_memory_bytes",
           "process_resident_memory_bytes", "process_start_time_seconds", "process_threads"}
errors = []


def no_dup_pairs(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def exported(repo):
    src = open(f"{repo}/gateway/src/metrics.rs").read()
    code = set(re.findall(r'(?:gauge|counter|counter_vec)\(\s*r,\s*"([a-z_]+)"', src))
    code |= set(re.findall(r'HistogramOpts::new\(\s*"([a-z_]+)"', src))
    code |= set(re.findall(r'counter_vec\(\s*r,\s*"([a-z_]+)"', src))
    docs = set(re.findall(r"^\| `pubgate_([a-z_]+)` \|", open(f"{repo}/docs/metrics.md").read(), re.M))
    if not code or not docs:
        sys.exit("check_metrics_use: found no metric names in metrics.rs or docs/metrics.md")
    for n in sorted(code - docs):
        errors.append(f"docs/metrics.md does not document pubgate_{n}")
    hist = set(re.findall(r'HistogramOpts::new\(\s*"([a-z_]+)"', src))
    names = {f"pubgate_{n}" for n in code & docs}
    for h in hist:
        names |= {f"pubgate_{h}_bucket", f"pubgate_{h}_sum", f"pubgate_{h}_count"}
    names |= {f"pubgate_{p}" for p in PROCESS}
    return names


def check_names(expr, names, where):
    for m in re.findall(r"\bpubgate_[a-z_]+", expr):
        if m not in names:
            errors.append(f"{where}: unknown metric {m} in {expr!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--dashboard", action="append", default=[])
    ap.add_argument("--rules", action="append", default=[])
    ap.add_argument("--promql-out")
    a = ap.parse_args()
    names = exported(a.repo)
    records = []
    for path in a.dashboard:
        try:
            d = json.load(open(path), object_pairs_hook=no_dup_pairs)
        except ValueError as e:
            errors.append(f"{path}: not valid JSON: {e}")
            continue
        for k in ("uid", "title", "panels", "schemaVersion"):
            if k not in d:
                errors.append(f"{path}: no {k}")
        variables = {v.get("name") for v in d.get("templating", {}).get("list", [])}
        ids = set()
        for p in d.get("panels", []):
            w = f"{path} panel {p.get('id')} {p.get('title')!r}"
            if p.get("id") in ids:
                errors.append(f"{w}: duplicate id")
            ids.add(p.get("id"))
            g = p.get("gridPos", {})
            if not (0 <= g.get("x", -1) and g.get("x", 0) + g.get("w", 99) <= 24 and g.get("h", 0) > 0):
                errors.append(f"{w}: gridPos {g} outside the 24-column grid")
            if p.get("type") == "row":
                continue
            ds = p.get("datasource", {})
            if ds.get("type") != "prometheus" or ds.get("uid", "").strip("${}") not in variables:
                errors.append(f"{w}: datasource {ds} is not the dashboard's Prometheus variable")
            if not p.get("targets"):
                errors.append(f"{w}: no queries")
            for t in p.get("targets", []):
                e = t.get("expr", "")
                if not e:
                    errors.append(f"{w}: empty expr")
                    continue
                check_names(e, names, w)
                for var in re.findall(r"\$(\w+)", e):
                    if var not in variables and not var.startswith("__"):
                        errors.append(f"{w}: unknown variable ${var}")
                expr = e.replace("$__rate_interval", "1m").replace('"$node"', '".*"')
                records.append({"record": f"grafana:panel_{p.get('id')}_{t.get('refId')}", "expr": expr})
    for path in a.rules:
        try:
            rules = yaml.safe_load(open(path))
        except yaml.YAMLError as e:
            errors.append(f"{path}: {e}")
            continue
        for g in rules.get("groups", []):
            for r in g.get("rules", []):
                check_names(r.get("expr", ""), names, f"{path} {r.get('alert') or r.get('record')}")
    if a.promql_out:
        with open(a.promql_out, "w") as f:
            yaml.safe_dump({"groups": [{"name": "grafana-queries", "rules": records}]}, f, sort_keys=False)
    for e in errors:
        print(f"ERROR {e}")
    print(f"check_metrics_use: {len(names)} exported series names, {len(records)} dashboard queries, "
          f"{len(a.rules)} rule files, {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
