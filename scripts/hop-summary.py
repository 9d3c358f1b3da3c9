#!/usr/bin/env python3
"""Medians and spread of the `hop` rounds of scripts/bench.sh.

    scripts/hop-summary.py RESULTS_DIR
    scripts/hop-summary.py RESULTS_DIR --compare [--markdown]

With --compare it reads the `hopvs` rounds instead (hopvs-<system>-<variant>-<round>.json, systems
`pubgate` and `nchan`) and prints, per variant, each system's figures and for the ones where lower
is better (p50, p99, CPU per delivery) which system is lower and whether the two spreads overlap:
`pubgate lower, apart` means pubgate's worst round beat nchan's best. It also gives, per figure,
the difference pubgate - nchan of each round pair (round i of both ran back to back) as median
[min-max] (`paired_difference`): entirely below 0 means pubgate was lower in every pair. --markdown prints the same as
the table docs/benchmarks.md shows (median [min–max] per figure).

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


def phase_figures(path, add):
    """Adds the tool's figures of one round (a fanout JSON) through add(name, value)."""
    phase = json.load(open(path))["result"]["phase"]
    add("p50_ms", phase["latency"]["p50_us"] / 1000)
    add("p99_ms", phase["latency"]["p99_us"] / 1000)
    add("deliveries_per_s", phase["deliveries_per_s"])
    add("loss_pct", phase["loss_pct"])
    counters = phase.get("counters", {})
    add("duplicates", counters.get("duplicates"))
    add("out_of_order", (counters.get("late") or 0) + (counters.get("gaps") or 0))
    add("wire_bytes_per_delivery", phase.get("wire_bytes_per_delivery"))
    add("server_us_per_delivery", phase.get("server_us_per_delivery"))
    add("server_and_redis_us_per_delivery", phase.get("server_and_broker_us_per_delivery"))
    # Other work on the machine during the window, % of all cores: what the spread is read against.
    add("other_load_pct", phase.get("cpu", {}).get("other_pct"))


LOWER_IS_BETTER = ["p50_ms", "p99_ms", "server_us_per_delivery", "server_and_redis_us_per_delivery"]


def compare(out):
    """The hopvs rounds: {variant: {system: figures, "verdict": {figure: text}}}."""
    figs = {}
    for path in sorted(glob.glob(os.path.join(out, "hopvs-*-*-[0-9]*.json"))):
        m = re.search(r"hopvs-(pubgate|nchan)-(.+)-(\d+)\.json$", path)
        if not m:
            continue
        system, variant = m.group(1), m.group(2)
        mine = figs.setdefault(variant, {}).setdefault(system, {})
        phase_figures(path, lambda k, v: mine.setdefault(k, []).append(v))
    if not figs:
        sys.exit(f"hop-summary: no hopvs-<system>-<variant>-<round>.json in {out}")
    result = {}
    for variant, systems in sorted(figs.items()):
        row = {name: {k: spread(v) for k, v in f.items()} for name, f in systems.items()}
        verdict, paired = {}, {}
        pg, nc = row.get("pubgate", {}), row.get("nchan", {})
        for k in LOWER_IS_BETTER:
            a, b = pg.get(k), nc.get(k)
            if not a or not b:
                continue
            lower = "pubgate" if a["median"] < b["median"] else "nchan"
            apart = a["max"] < b["min"] or b["max"] < a["min"]
            text = f"{lower} lower, {'apart' if apart else 'spreads overlap'}"
            # Round i of both systems ran back to back (same disturbance): compare them in pairs.
            ra, rb = systems["pubgate"].get(k, []), systems["nchan"].get(k, [])
            if len(ra) == len(rb) and None not in ra and None not in rb:
                wins = sum(1 for x, y in zip(ra, rb) if x < y)
                text += f"; pubgate lower in {wins} of {len(ra)} rounds"
                # The same difference per round pair: a slower machine moves both systems of a
                # pair alike, so this spread is the one the interleaving was made for.
                d = spread([x - y for x, y in zip(ra, rb)])
                paired[k] = d
                text += f"; pubgate - nchan per round {d['median']:g} [{d['min']:g} to {d['max']:g}]"
            verdict[k] = text
        row["verdict"] = verdict
        row["paired_difference"] = paired
        result[variant] = row
    return result


MARKDOWN_COLUMNS = [
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("server_us_per_delivery", "servers µs/delivery"),
    ("server_and_redis_us_per_delivery", "servers + Redis µs/delivery"),
    ("wire_bytes_per_delivery", "B/delivery"),
    ("loss_pct", "loss %"),
    ("other_load_pct", "other load %"),
]


def cell(f):
    if not f:
        return "–"
    if f["min"] == f["max"]:
        return f"{f['median']:g}"
    return f"{f['median']:g} [{f['min']:g}–{f['max']:g}]"


def markdown(result):
    head = ["variant", "system", "rounds"] + [t for _, t in MARKDOWN_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for variant, row in result.items():
        for system in ("pubgate", "nchan"):
            figs = row.get(system)
            if not figs:
                continue
            rounds = figs["p50_ms"]["rounds"] if figs.get("p50_ms") else 0
            cells = [variant, system, str(rounds)] + [cell(figs.get(k)) for k, _ in MARKDOWN_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    if len(sys.argv) in (3, 4) and sys.argv[2] == "--compare":
        result = compare(sys.argv[1])
        if sys.argv[3:] == ["--markdown"]:
            print(markdown(result))
        else:
            print(json.dumps(result, indent=2))
        return
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
