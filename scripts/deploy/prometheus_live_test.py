#!/usr/bin/env python3
"""A real Prometheus scrapes a real pubgate node, and the alert rules fire and resolve.

    prometheus_live_test.py --pubgate BIN --rules deploy/prometheus/alerts.yml --workdir DIR

Everything runs on 127.0.0.1 on free ports: redis-server, one pubgate node on the Redis broker, and
Debian's `prometheus` (scrape and rule evaluation every second). The test:
  1. finds pubgate's series through Prometheus's HTTP API (`pubgate_broker_up` is 1, and the series of
     docs/metrics.md are there);
  2. checks that no alert is pending or firing while everything is healthy (a plaintext node must not
     trip the certificate alerts, an idle one not the gap or slow-consumer ones);
  3. stops Redis: PubgateBrokerDown must fire (and /readyz turn 503);
  4. starts Redis again: the alert must resolve.
The rule file is alerts.yml with its expressions unchanged and every `for:` shortened to 3s, so the
test takes seconds rather than minutes (the `for:` durations themselves are covered by the promtool unit
tests in alerts.test.yml). Every process it starts is stopped by PID.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

procs = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, log, **kw):
    p = subprocess.Popen(args, stdout=open(log + ".out", "w"), stderr=open(log, "w"), stdin=subprocess.DEVNULL, **kw)
    procs.append(p)
    return p


def stop(p, sig=signal.SIGTERM, timeout=10):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def http_get(url, timeout=2):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return None, b""


def wait_for(what, cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.25)
    raise SystemExit(f"prometheus_live_test: timed out after {timeout}s waiting for {what}")


def prom_query(base, q):
    status, body = http_get(f"{base}/api/v1/query?query={urllib.request.quote(q)}")
    if status != 200:
        return []
    return json.loads(body)["data"]["result"]


def alerts(base):
    status, body = http_get(f"{base}/api/v1/alerts")
    if status != 200:
        return None
    return json.loads(body)["data"]["alerts"]


def start_redis(port, work):
    p = start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", work], os.path.join(work, "redis.log"))
    wait_for("redis", lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True)
             .stdout.strip() == b"PONG", 10)
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pubgate", required=True)
    ap.add_argument("--rules", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    work = os.path.abspath(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    t0 = time.monotonic()

    redis_port = free_port()
    redis = start_redis(redis_port, work)
    metrics_port, listen_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUBGATE__") and k != "RUST_LOG"}
    node = start([a.pubgate, "--broker", "redis", "--redis-url", f"redis://127.0.0.1:{redis_port}",
                  "--listen", f"127.0.0.1:{listen_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}"],
                 os.path.join(work, "pubgate.log"), env=env)
    wait_for("pubgate ready", lambda: http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200, 20)

    rules = open(a.rules).read()
    rules = re.sub(r"(?m)^(\s+for:) .*$", r"\1 3s", rules)
    open(os.path.join(work, "alerts.yml"), "w").write(rules)
    prom_port = free_port()
    open(os.path.join(work, "prometheus.yml"), "w").write(f"""
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: [alerts.yml]
scrape_configs:
  - job_name: pubgate
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
""")
    prom = start(["prometheus", f"--config.file={work}/prometheus.yml", f"--storage.tsdb.path={work}/tsdb",
                  f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                 os.path.join(work, "prometheus.log"))
    base = f"http://127.0.0.1:{prom_port}"
    wait_for("prometheus ready", lambda: http_get(f"{base}/-/ready")[0] == 200, 30)

    up = wait_for("pubgate_broker_up == 1 in Prometheus",
                  lambda: prom_query(base, 'pubgate_broker_up{job="pubgate"} == 1'), 30)
    names = {s["metric"]["__name__"] for s in prom_query(base, '{job="pubgate", __name__=~"pubgate_.+"}')}
    # Documented metrics without labels exist from the start (a labelled one may appear only with its
    # first label value); TLS metrics exist only with TLS on. Histograms appear as _bucket/_sum/_count.
    rows = re.findall(r"^\| `(pubgate_[a-z_]+)` \| [a-z]+ \| ([^|]*)\|",
                      open(os.path.join(os.path.dirname(__file__), "../../docs/metrics.md")).read(), re.M)
    required = {n for n, labels in rows if not labels.strip() and not n.startswith("pubgate_tls_")}
    if len(required) < 15:
        raise SystemExit(f"prometheus_live_test: could not read docs/metrics.md ({len(required)} metrics)")
    seen = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    missing = sorted(required - seen)
    if missing:
        raise SystemExit(f"prometheus_live_test: documented metrics Prometheus did not scrape: {missing}")
    print(f"  Prometheus {prom_port} scrapes pubgate: {len(names)} pubgate series names, "
          f"broker_up={up[0]['value'][1]}; all {len(required)} documented unlabelled metrics present")

    # Let every rule evaluate a few times over healthy data.
    time.sleep(5)
    active = [x for x in alerts(base) or [] if x["state"] in ("pending", "firing")]
    if active:
        raise SystemExit(f"prometheus_live_test: alerts active while healthy: {[x['labels']['alertname'] for x in active]}")
    print("  healthy: no alert pending or firing")

    t_stop = time.monotonic()
    stop(redis)
    fired = wait_for("PubgateBrokerDown firing", lambda: [
        x for x in alerts(base) or [] if x["labels"]["alertname"] == "PubgateBrokerDown" and x["state"] == "firing"], 60)
    if http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] != 503:
        raise SystemExit("prometheus_live_test: /readyz is not 503 with Redis down")
    others = sorted({x["labels"]["alertname"] for x in alerts(base) or [] if x["state"] == "firing"} - {"PubgateBrokerDown"})
    print(f"  Redis stopped: PubgateBrokerDown firing after {time.monotonic() - t_stop:.1f}s "
          f"(instance {fired[0]['labels'].get('instance')}); /readyz 503; other firing: {others or 'none'}")

    t_start = time.monotonic()
    redis = start_redis(redis_port, work)
    wait_for("PubgateBrokerDown resolved", lambda: alerts(base) is not None and not [
        x for x in alerts(base) if x["labels"]["alertname"] == "PubgateBrokerDown"], 60)
    wait_for("pubgate ready again", lambda: http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200, 30)
    print(f"  Redis started: PubgateBrokerDown resolved after {time.monotonic() - t_start:.1f}s; /readyz 200")
    still = [x["labels"]["alertname"] for x in alerts(base) or [] if x["state"] == "firing"]
    if still:
        raise SystemExit(f"prometheus_live_test: alerts still firing after recovery: {still}")
    print(f"prometheus_live_test: OK in {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    try:
        rc = main()
    finally:
        for p in reversed(procs):
            stop(p)
    sys.exit(rc)
