#!/usr/bin/env python3
"""Writes pubgate.json, the Grafana dashboard (run it after editing; CI checks the two agree).

Every expression uses metrics of docs/metrics.md; scripts/validate-deploy.sh checks the names and has
promtool parse every expression.
"""
import json
import os
import sys

DS = {"type": "prometheus", "uid": "${datasource}"}
N = 'instance=~"$node"'
R = "$__rate_interval"
panels = []
state = {"id": 0, "x": 0, "y": 0, "h": 0}


def _next_id():
    state["id"] += 1
    return state["id"]


def row(title):
    if state["x"]:
        state["y"] += state["h"]
    state["x"] = 0
    panels.append({"type": "row", "id": _next_id(), "title": title, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": state["y"]}, "panels": []})
    state["y"] += 1
    state["h"] = 0


def panel(title, targets, unit="short", kind="timeseries", w=8, h=8, desc="", extra=None):
    if state["x"] + w > 24:
        state["x"] = 0
        state["y"] += state["h"]
    p = {"type": kind, "id": _next_id(), "title": title, "description": desc, "datasource": DS,
         "gridPos": {"h": h, "w": w, "x": state["x"], "y": state["y"]},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "options": ({"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                      "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries" else {}),
         "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": legend, "range": True}
                     for i, (e, legend) in enumerate(targets)]}
    if extra:
        p.update(extra)
    panels.append(p)
    state["x"] += w
    state["h"] = max(state["h"], h)


def quantiles(metric):
    return [(f"histogram_quantile({q}, sum by (instance, le) (rate({metric}{{{N}}}[{R}])))",
             f"p{float(q) * 100:g} {{{{instance}}}}") for q in ("0.5", "0.99", "0.999")]


row("Overview")
panel("Nodes ready", [(f"sum(pubgate_ready{{{N}}})", "ready")], kind="stat", w=4, h=4,
      desc="Nodes taking traffic (pubgate_ready).")
panel("Broker path up", [(f"sum(pubgate_broker_up{{{N}}})", "up")], kind="stat", w=4, h=4,
      desc="Nodes whose Redis path and canary work (pubgate_broker_up).")
panel("Connections", [(f"sum(pubgate_connections{{{N}}})", "connections")], kind="stat", w=4, h=4)
panel("Subscriptions", [(f"sum(pubgate_subscriptions{{{N}}})", "subscriptions")], kind="stat", w=4, h=4)
panel("Messages in /s", [(f"sum(rate(pubgate_messages_published_total{{{N}}}[{R}]))", "in")],
      unit="ops", kind="stat", w=4, h=4)
panel("Deliveries /s", [(f"sum(rate(pubgate_messages_delivered_total{{{N}}}[{R}]))", "out")],
      unit="ops", kind="stat", w=4, h=4)

row("Connections and subscriptions (per node)")
panel("WebSocket connections", [(f"pubgate_connections{{{N}}}", "{{instance}}")],
      desc="Open connections per node; compare with server.max_connections.")
panel("Connects, refusals and handshake failures /s", [
    (f"rate(pubgate_connections_total{{{N}}}[{R}])", "accepted {{instance}}"),
    (f"rate(pubgate_connections_refused_total{{{N}}}[{R}])", "refused {{instance}}"),
    (f"sum by (instance, reason) (rate(pubgate_handshake_failures_total{{{N}}}[{R}]))", "{{reason}} {{instance}}"),
], unit="ops", desc="A reconnect storm shows here first.")
panel("Subscriptions and topics", [
    (f"pubgate_subscriptions{{{N}}}", "subscriptions {{instance}}"),
    (f"pubgate_topics{{{N}}}", "topics {{instance}}"),
    (f"pubgate_broker_topics{{{N}}}", "broker topics {{instance}}"),
])

row("Messages (per node)")
panel("Messages in /s", [
    (f"sum by (instance, transport) (rate(pubgate_messages_published_total{{{N}}}[{R}]))", "{{transport}} {{instance}}"),
], unit="ops", desc="Messages accepted for publishing through each node.")
panel("Deliveries /s", [
    (f"rate(pubgate_messages_delivered_total{{{N}}}[{R}])", "{{instance}}"),
    (f"rate(pubgate_messages_replayed_total{{{N}}}[{R}])", "replayed {{instance}}"),
], unit="ops", desc="Message frames queued to local subscribers, and replays from history.")
panel("Drops and slow-consumer disconnects /s", [
    (f"sum by (instance, reason) (rate(pubgate_messages_dropped_total{{{N}}}[{R}]))", "dropped {{reason}} {{instance}}"),
    (f"rate(pubgate_slow_consumer_disconnects_total{{{N}}}[{R}])", "slow-consumer disconnects {{instance}}"),
    (f"sum by (instance, reason) (rate(pubgate_broker_messages_dropped_total{{{N}}}[{R}]))", "broker dropped {{reason}} {{instance}}"),
], unit="ops")

row("Latency (per node)")
panel("Fan-out time p50 / p99 / p99.9", quantiles("pubgate_fanout_seconds_bucket"), unit="s", w=12,
      desc="Time to queue one message to every local subscriber.")
panel("Broker round trip p50 / p99 / p99.9", quantiles("pubgate_broker_roundtrip_seconds_bucket"), unit="s", w=12,
      desc="The canary each node sends itself through Redis, publish to delivery.")

row("Broker (per node)")
panel("Broker up / ready", [
    (f"pubgate_broker_up{{{N}}}", "broker up {{instance}}"),
    (f"pubgate_ready{{{N}}}", "ready {{instance}}"),
], kind="state-timeline", desc="1: the Redis path works / the node takes traffic.", extra={
    "options": {"showValue": "auto", "mergeValues": True},
    "fieldConfig": {"defaults": {"unit": "short", "min": 0, "max": 1, "color": {"mode": "thresholds"},
                                 "thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None},
                                                                              {"color": "green", "value": 1}]}},
                    "overrides": []}})
panel("Gaps and resumes /s", [
    (f"rate(pubgate_broker_gaps_total{{{N}}}[{R}])", "topics with gaps {{instance}}"),
    (f"rate(pubgate_gaps_signalled_total{{{N}}}[{R}])", "gap frames {{instance}}"),
    (f"sum by (instance, result) (rate(pubgate_resumes_total{{{N}}}[{R}]))", "resumes {{result}} {{instance}}"),
], unit="ops", desc="Messages lost for good (a Redis restart, trimmed history, backlog overflow), and resumes.")
panel("Broker reconnects, backlog, rejects", [
    (f"increase(pubgate_broker_reconnects_total{{{N}}}[{R}])", "reconnects {{instance}}"),
    (f"pubgate_broker_backlog{{{N}}}", "backlog {{instance}}"),
    (f"rate(pubgate_broker_backlog_overflows_total{{{N}}}[{R}])", "backlog overflows/s {{instance}}"),
    (f"sum by (instance, reason) (rate(pubgate_broker_rejected_total{{{N}}}[{R}]))", "rejected {{reason}} {{instance}}"),
])

row("Process and TLS (per node)")
panel("Resident memory", [(f"pubgate_process_resident_memory_bytes{{{N}}}", "{{instance}}")], unit="bytes")
panel("CPU", [(f"rate(pubgate_process_cpu_seconds_total{{{N}}}[{R}])", "{{instance}}")], unit="percentunit")
panel("Certificate expiry / reload errors", [
    (f"pubgate_tls_cert_expiry_timestamp_seconds{{{N}}} - time()", "expires in {{instance}}"),
    (f'increase(pubgate_tls_reloads_total{{{N}, result="error"}}[1h])', "reload errors/h {{instance}}"),
], unit="s", desc="TLS on only.")

dashboard = {
    "title": "pubgate", "uid": "pubgate-overview", "tags": ["pubgate"], "timezone": "", "schemaVersion": 39,
    "version": 1, "editable": True, "graphTooltip": 1, "refresh": "10s",
    "time": {"from": "now-30m", "to": "now"}, "annotations": {"list": []}, "links": [],
    "description": "pubgate nodes: connections, subscriptions, messages, drops, latency, broker state and gaps, "
                   "per node. Metrics: docs/metrics.md.",
    "templating": {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "options": []},
        {"name": "node", "label": "node", "type": "query", "datasource": DS,
         "query": {"query": "label_values(pubgate_connections, instance)", "refId": "node"},
         "definition": "label_values(pubgate_connections, instance)", "includeAll": True, "multi": True,
         "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "refresh": 2, "sort": 1, "hide": 0,
         "options": []},
    ]},
    "panels": panels,
}

text = json.dumps(dashboard, indent=2) + "\n"
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pubgate.json")
if sys.argv[1:] == ["--check"]:
    sys.exit(0 if open(out).read() == text else "deploy/grafana/pubgate.json is stale: run deploy/grafana/gen_dashboard.py")
open(out, "w").write(text)
