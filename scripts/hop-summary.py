#!/usr/bin/env python3
"""Medians and spread of the `hop` rounds of scripts/bench.sh.

    scripts/hop-summary.py RESULTS_DIR

Reads hop-<round>.json (pubgate-loadtest fanout), hop-<round>.commandstats (Redis INFO
commandstats after the round) and hop-<round>.breakdown.json (scripts/hop-breakdown.py), and prints
one JSON object: for each figure the median over the rounds with its minimum and maximum, so that
two systems (or two versions) can be compared by whether their spreads overlap.
"""

import glob
import json
import os
import re
import statistics
import sys


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "rounds": len(values)}


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    rounds = sorted(glob.glob(os.path.join(out, "hop-[0-9]*.json")))
    rounds = [r for r in rounds if re.search(r"hop-\d+\.json$", r)]
    if not rounds:
        sys.exit(f"hop-summary: no hop-<round>.json in {out}")
    figs = {}

    def add(name, value):
        figs.setdefault(name, []).append(value)

    for path in rounds:
        base = path[: -len(".json")]
        phase = json.load(open(path))["result"]["phase"]
        add("p50_ms", phase["latency"]["p50_us"] / 1000)
        add("p99_ms", phase["latency"]["p99_us"] / 1000)
        add("deliveries_per_s", phase["deliveries_per_s"])
        add("loss_pct", phase["loss_pct"])
        add("server_us_per_delivery", phase.get("server_us_per_delivery"))
        add("server_and_redis_us_per_delivery", phase.get("server_and_broker_us_per_delivery"))
        # Other work on the machine during the window, % of all cores: what the spread is read against.
        add("other_load_pct", phase.get("cpu", {}).get("other_pct"))
        try:
            stats = open(base + ".commandstats").read()
            m = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+),usec_per_call=([\d.]+)", stats)
            if m:
                add("evalsha_usec_per_call", float(m.group(3)))
        except OSError:
            pass
        try:
            parts = json.load(open(base + ".breakdown.json"))["parts"]
            for k, v in parts.items():
                if v:
                    add(f"{k}_p50_us", v["p50_us"])
                    add(f"{k}_p99_us", v["p99_us"])
        except OSError:
            pass
    print(json.dumps({k: spread(v) for k, v in figs.items()}, indent=2))


if __name__ == "__main__":
    main()
