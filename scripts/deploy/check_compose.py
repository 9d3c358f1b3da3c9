#!/usr/bin/env python3
"""Checks of the compose stack that docker-compose's own validation does not make.

    docker-compose -f compose.yaml config --format json | check_compose.py COMPOSE_DIR

* `restart` is a value Docker knows; published ports are in range and bound to loopback;
* every bind-mounted source exists in the repository;
* a pubgate service's stop_grace_period exceeds its drain.grace (else Docker kills it mid-drain), and
  its drain.delay is shorter than drain.grace;
* every pubgate node is scraped by the Prometheus config and balanced by HAProxy.
"""
import json
import os
import re
import sys

errors = []
RESTART = re.compile(r"^(no|always|unless-stopped|on-failure(:[0-9]+)?)$")


def seconds(d):
    total, found = 0.0, False
    for n, u in re.findall(r"([0-9.]+)(ms|s|m|h)", d or ""):
        found = True
        total += float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u]
    return total if found else None


def main():
    cdir = sys.argv[1]
    cfg = json.load(sys.stdin)
    nodes = []
    for name, s in cfg.get("services", {}).items():
        w = f"service {name}"
        r = s.get("restart", "no")
        if not RESTART.match(r):
            errors.append(f"{w}: restart {r!r} is not no|always|unless-stopped|on-failure[:N]")
        for p in s.get("ports", []):
            # A laptop stack: Grafana (anonymous viewer), Prometheus and the HAProxy stats page show
            # every metric, so nothing is published beyond the machine itself.
            if p.get("published") is not None and p.get("host_ip") not in ("127.0.0.1", "::1"):
                errors.append(f"{w}: port {p.get('published')} is published on all interfaces; bind it to 127.0.0.1")
            for k in ("published", "target"):
                v = p.get(k)
                if v is not None and not 1 <= int(v) <= 65535:
                    errors.append(f"{w}: port {k} {v} out of range")
        for v in s.get("volumes", []):
            if v.get("type") == "bind" and not os.path.exists(v["source"]):
                errors.append(f"{w}: bind source {v['source']} does not exist")
        if s.get("image", "").startswith("pubgate"):
            nodes.append(s.get("hostname", name))
            env = s.get("environment", {})
            grace = seconds(env.get("PUBGATE__DRAIN__GRACE", "30s"))
            delay = seconds(env.get("PUBGATE__DRAIN__DELAY", "0s"))
            # docker-compose config renders durations like "30s" or "1m30s".
            stop = seconds(s.get("stop_grace_period", "10s"))
            if stop is None or grace is None or stop <= grace:
                errors.append(f"{w}: stop_grace_period {s.get('stop_grace_period')} must exceed drain.grace {grace}s")
            if delay is None or grace is None or delay >= grace:
                errors.append(f"{w}: drain.delay {delay}s must be shorter than drain.grace {grace}s")
    if not nodes:
        errors.append("no pubgate service")
    prom = open(os.path.join(cdir, "..", "prometheus", "prometheus.yml")).read()
    lb = open(os.path.join(cdir, "haproxy.cfg")).read()
    for n in nodes:
        if f'"{n}:8081"' not in prom:
            errors.append(f"{n} is not scraped by deploy/prometheus/prometheus.yml")
        if not re.search(rf"^\s*server \S+ {re.escape(n)}:8080 .*check port 8081", lb, re.M):
            errors.append(f"{n} is not a health-checked HAProxy server")
    for e in errors:
        print(f"ERROR {e}")
    print(f"check_compose: {len(cfg.get('services', {}))} services, {len(nodes)} pubgate nodes, {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
