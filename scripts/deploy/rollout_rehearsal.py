#!/usr/bin/env python3
"""Rollout rehearsal: a Kubernetes rolling update of pubgate, played on loopback with the chart's settings.

    rollout_rehearsal.py --rendered RENDERED.yaml --pubgate BIN --workdir DIR [--clients 60] [--rate 50]

Reads from the rendered chart (helm template output) everything that decides how a rollout goes:
replicas, strategy.rollingUpdate.maxSurge/maxUnavailable, minReadySeconds, the preStop sleep,
terminationGracePeriodSeconds, the readiness probe (period, timeout, thresholds) and the pubgate config
of the ConfigMap (drain.grace, drain.delay, history, ...). Then, on 127.0.0.1 with free ports:

* redis-server, `replicas` pubgate nodes started with the rendered config (only the Redis URL and the
  listen addresses changed), and HAProxy in front standing in for the Service/ingress: it balances over
  endpoints that are Ready, health-checking /readyz with the readiness probe's timing;
* resuming WebSocket clients (each on two of four topics; on any close they reconnect through HAProxy
  with the jittered backoff of docs/recovery.md and resubscribe with `since`), and a publisher at a
  steady rate over HTTP through HAProxy (a failed publish is retried);
* a rolling update driven like the Deployment controller does it: a new pod is created while
  (pods not terminating) < replicas + maxSurge; an old pod is deleted while the available pods
  (Ready for minReadySeconds; old pods count as available) minus one stay >= replicas - maxUnavailable.
  Deleting a pod = at once out of the endpoints (HAProxy server to maintenance, existing connections
  kept, as kube-proxy does), the preStop sleep, SIGTERM, and SIGKILL at terminationGracePeriodSeconds
  if the process is still there.

Asserts: every client got every message of its topics published after it subscribed, exactly once and
in order (0 lost, 0 duplicated), every resume was recovered, no pod needed SIGKILL, and the reconnect
rate stayed bounded (no storm). Prints the figures, including the peak reconnects per second.
"""
import argparse
import asyncio
import collections
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib

import websockets
import yaml

procs = []
T0 = time.monotonic()


def now():
    return time.monotonic() - T0


def log(msg):
    print(f"  [{now():6.1f}s] {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, logfile, **kw):
    p = subprocess.Popen(args, stdout=open(logfile + ".out", "w"), stderr=open(logfile, "w"),
                         stdin=subprocess.DEVNULL, **kw)
    procs.append(p)
    return p


def http_status(port, path, timeout):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("GET", path)
        s = c.getresponse().status
        c.close()
        return s
    except OSError:
        return None


def int_or_percent(v, of, round_up):
    if isinstance(v, str) and v.endswith("%"):
        x = of * int(v[:-1]) / 100
        return math.ceil(x) if round_up else math.floor(x)
    return int(v)


def seconds(d):
    m = re.fullmatch(r"([0-9]+)(ms|s|m|h)", d)
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def read_settings(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment"
               and any(c["name"] == "pubgate" for c in d["spec"]["template"]["spec"]["containers"]))
    pod = dep["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "pubgate")
    cm_name = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "config")
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name)
    toml_text = cm["data"]["pubgate.toml"]
    cfg = tomllib.loads(toml_text)
    replicas = dep["spec"].get("replicas", 1)
    ru = dep["spec"]["strategy"]["rollingUpdate"]
    rp = c["readinessProbe"]
    return {
        "replicas": replicas,
        "maxSurge": int_or_percent(ru["maxSurge"], replicas, True),
        "maxUnavailable": int_or_percent(ru["maxUnavailable"], replicas, False),
        "minReadySeconds": dep["spec"].get("minReadySeconds", 0),
        "preStopSeconds": c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0),
        "terminationGracePeriodSeconds": pod.get("terminationGracePeriodSeconds", 30),
        "readiness": {"path": rp["httpGet"]["path"], "periodSeconds": rp.get("periodSeconds", 10),
                      "timeoutSeconds": rp.get("timeoutSeconds", 1), "failureThreshold": rp.get("failureThreshold", 3),
                      "successThreshold": rp.get("successThreshold", 1)},
        "drain.grace": seconds(cfg.get("drain", {}).get("grace", "30s")),
        "drain.delay": seconds(cfg.get("drain", {}).get("delay", "0s")),
        "history.size": cfg.get("history", {}).get("size", 0),
        "toml": toml_text,
    }


class Pod:
    def __init__(self, name, port, metrics, toml_path, pubgate, redis_url, work, env):
        self.name, self.port, self.metrics = name, port, metrics
        self.proc = start([pubgate, "--config", toml_path, "--redis-url", redis_url,
                           "--listen", f"127.0.0.1:{self.port}", "--metrics-listen", f"127.0.0.1:{self.metrics}"],
                          os.path.join(work, f"{name}.log"), env=env)
        self.ready = False
        self.ready_since = None
        self.successes = 0
        self.next_probe = 0.0
        self.deleted_at = None
        self.sigterm_at = None
        self.exited_at = None
        self.killed = False


class Haproxy:
    def __init__(self, work, settings, slots):
        self.sock = os.path.join(work, "haproxy.sock")
        self.port = free_port()
        rp = settings["readiness"]
        servers = "\n".join(
            f"    server {name} 127.0.0.1:{port} check port {metrics} inter {rp['periodSeconds']}s "
            f"fall {rp['failureThreshold']} rise {rp['successThreshold']} disabled"
            for name, port, metrics in slots)
        cfg = f"""global
    maxconn 4000
    stats socket {self.sock} mode 600 level admin

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    timeout check {rp['timeoutSeconds']}s
    option http-server-close
    retries 3
    option redispatch 1

frontend pubgate
    bind 127.0.0.1:{self.port}
    default_backend nodes

backend nodes
    balance leastconn
    option httpchk GET {rp['path']}
    http-check expect status 200
{servers}
"""
        path = os.path.join(work, "haproxy.cfg")
        open(path, "w").write(cfg)
        self.proc = start(["haproxy", "-db", "-f", path], os.path.join(work, "haproxy.log"))

    def cmd(self, line):
        for _ in range(50):
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.sock)
                    s.sendall((line + "\n").encode())
                    out = b""
                    while chunk := s.recv(4096):
                        out += chunk
                    return out.decode()
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"rollout_rehearsal: HAProxy runtime API unreachable ({line})")


class Stats:
    def __init__(self):
        self.reconnects = []          # times of successful reconnects (not first connects)
        self.closes = collections.Counter()
        self.resumes = collections.Counter()
        self.unexpected = 0           # a message whose offset was not the next one
        self.failed_connects = 0


class Client:
    def __init__(self, i, topics, url, stats):
        self.i, self.topics, self.url, self.stats = i, topics, url, stats
        self.state = {}                # topic -> [epoch, offset]
        self.first = {}                # topic -> offset of the first subscribe's ack
        self.received = collections.defaultdict(list)
        self.stop = False
        self.next_id = 0
        self.connects = 0

    def _id(self):
        self.next_id += 1
        return self.next_id

    async def run(self):
        attempt = 0
        while not self.stop:
            try:
                async with websockets.connect(self.url, open_timeout=5, close_timeout=2, ping_interval=None,
                                              max_size=2**22) as ws:
                    attempt = 0
                    self.connects += 1
                    if self.connects > 1:
                        self.stats.reconnects.append(now())
                    for t in self.topics:
                        msg = {"op": "subscribe", "topic": t, "id": self._id()}
                        if t in self.state:
                            msg["since"] = {"epoch": self.state[t][0], "offset": self.state[t][1]}
                        await ws.send(json.dumps(msg))
                    async for raw in ws:
                        await self.on_frame(ws, json.loads(raw))
                        if self.stop:
                            return
                    self.stats.closes[ws.close_code] += 1
            except websockets.ConnectionClosed as e:
                self.stats.closes[e.rcvd.code if e.rcvd else "no close frame"] += 1
            except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake, websockets.InvalidStatus) as e:
                self.stats.failed_connects += 1
                self.stats.closes[type(e).__name__] += 1
                await asyncio.sleep(random.uniform(0.5, 1.5) * min(0.1 * 2 ** attempt, 10))
                attempt += 1
                continue
            if self.stop:
                return
            await asyncio.sleep(random.uniform(0.05, 0.15))   # backoff(0) of docs/recovery.md

    async def resubscribe(self, ws, t):
        await ws.send(json.dumps({"op": "unsubscribe", "topic": t, "id": self._id()}))
        await ws.send(json.dumps({"op": "subscribe", "topic": t, "id": self._id(),
                                  "since": {"epoch": self.state[t][0], "offset": self.state[t][1]}}))

    async def on_frame(self, ws, f):
        op = f.get("op")
        t = f.get("topic")
        if op == "ack" and t in self.topics and "epoch" in f and "offset" in f:
            if t not in self.state:
                self.state[t] = [f["epoch"], f["offset"]]
                self.first[t] = (f["epoch"], f["offset"])
            elif "recovered" in f:
                self.stats.resumes["recovered" if f["recovered"] else "not_recovered"] += 1
                if not f["recovered"]:
                    self.state[t] = [f["epoch"], f["offset"]]
        elif op == "message" and t in self.state and "offset" in f:
            st = self.state[t]
            self.received[t].append(f["offset"])
            if "epoch" in f:
                # The first message of an epoch names it (docs/protocol.md): a client acknowledged at
                # the empty epoch "0" learns the epoch to resume with.
                if st[1] == 0 and self.first[t][1] == 0:
                    self.first[t] = (f["epoch"], 0)
                st[0] = f["epoch"]
            if f["offset"] == st[1] + 1:
                st[1] = f["offset"]
            elif f["offset"] > st[1] + 1:
                self.stats.unexpected += 1
                await self.resubscribe(ws, t)
        elif op == "gap" and t in self.state:
            self.stats.unexpected += 1
            await self.resubscribe(ws, t)
        elif op == "error":
            self.stats.closes[f"error {f.get('code')}"] += 1


class Publisher(threading.Thread):
    def __init__(self, port, topics, rate):
        super().__init__(daemon=True)
        self.port, self.topics, self.rate = port, topics, rate
        self.acked = collections.defaultdict(list)   # topic -> offsets
        self.epochs = collections.defaultdict(set)
        self.failed = 0
        self.stop_flag = threading.Event()

    def run(self):
        conn = None
        n = 0
        next_at = time.monotonic()
        while not self.stop_flag.is_set():
            t = self.topics[n % len(self.topics)]
            body = json.dumps({"n": n, "t": round(now(), 3)})
            while not self.stop_flag.is_set():
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                    conn.request("POST", f"/v1/publish/{t}", body, {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    data = r.read()
                    if r.status == 200:
                        a = json.loads(data)
                        self.acked[t].append(a["offset"])
                        self.epochs[t].add(a["epoch"])
                        break
                    self.failed += 1
                except (OSError, http.client.HTTPException):
                    self.failed += 1
                    conn = None
                time.sleep(0.05)
            n += 1
            next_at += 1 / self.rate
            time.sleep(max(0.0, next_at - time.monotonic()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rendered", required=True)
    ap.add_argument("--pubgate", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--clients", type=int, default=60)
    ap.add_argument("--rate", type=int, default=50, help="publishes per second")
    ap.add_argument("--max-reconnects-per-second", type=int, default=0,
                    help="the storm threshold; default max(5, a quarter of one pod's clients)")
    a = ap.parse_args()
    work = os.path.abspath(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    s = read_settings(a.rendered)
    R, S, U = s["replicas"], s["maxSurge"], s["maxUnavailable"]
    print("rollout_rehearsal: settings read from the rendered chart: "
          + ", ".join(f"{k}={v}" for k, v in s.items() if k != "toml"))
    if R < 2:
        raise SystemExit("rollout_rehearsal: needs at least 2 replicas")
    if s["history.size"] <= 0:
        raise SystemExit("rollout_rehearsal: the chart's config keeps no history: resuming clients would lose messages")

    redis_port = free_port()
    start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", work], os.path.join(work, "redis.log"))
    for _ in range(100):
        if subprocess.run(["redis-cli", "-p", str(redis_port), "ping"], capture_output=True).stdout.strip() == b"PONG":
            break
        time.sleep(0.1)
    redis_url = f"redis://127.0.0.1:{redis_port}"
    toml_path = os.path.join(work, "pubgate.toml")
    open(toml_path, "w").write(s["toml"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUBGATE__") and k != "RUST_LOG"}
    env["PUBGATE__LOG__FORMAT"] = "plain"

    # Every pod the rollout will have: R old, then R new (slots declared up front, in maintenance).
    names = [f"old{i}" for i in range(R)] + [f"new{i}" for i in range(R)]
    ports = {n: (free_port(), free_port()) for n in names}
    lb = Haproxy(work, s, [(n, ports[n][0], ports[n][1]) for n in names])

    def make_pod(name):
        return Pod(name, *ports[name], toml_path, a.pubgate, redis_url, work, env)

    rp = s["readiness"]

    def probe(pod, t):
        """The kubelet's readiness probe; an endpoint is added when the pod turns Ready."""
        if t < pod.next_probe or pod.deleted_at is not None:
            return
        pod.next_probe = t + rp["periodSeconds"]
        ok = http_status(pod.metrics, rp["path"], rp["timeoutSeconds"]) == 200
        pod.successes = pod.successes + 1 if ok else 0
        if not pod.ready and pod.successes >= rp["successThreshold"]:
            pod.ready, pod.ready_since = True, t
            lb.cmd(f"set server nodes/{pod.name} state ready")
            log(f"{pod.name} Ready; added to the endpoints")

    old = [make_pod(f"old{i}") for i in range(R)]
    deadline = now() + 30
    while not all(p.ready for p in old):
        if now() > deadline:
            raise SystemExit("rollout_rehearsal: the first pods did not turn ready")
        for p in old:
            probe(p, now())
        time.sleep(0.1)
    time.sleep(rp["periodSeconds"] * rp["successThreshold"] + 0.5)   # HAProxy's own checks agree

    topics = [f"rehearsal.t{i}" for i in range(4)]
    stats = Stats()
    url = f"ws://127.0.0.1:{lb.port}/ws"
    clients = [Client(i, [topics[i % 4], topics[(i + 1) % 4]], url, stats) for i in range(a.clients)]

    async def rollout():
        tasks = [asyncio.create_task(c.run()) for c in clients]
        for _ in range(200):
            if all(len(c.state) == 2 for c in clients):
                break
            await asyncio.sleep(0.05)
        else:
            raise SystemExit("rollout_rehearsal: clients did not all subscribe")
        log(f"{len(clients)} clients subscribed through HAProxy")
        pub = Publisher(lb.port, topics, a.rate)
        pub.start()
        await asyncio.sleep(3)

        log(f"rolling update: replicas={R} maxSurge={S} maxUnavailable={U} minReadySeconds={s['minReadySeconds']} "
            f"preStop={s['preStopSeconds']}s grace={s['terminationGracePeriodSeconds']}s "
            f"drain.delay={s['drain.delay']}s drain.grace={s['drain.grace']}s")
        new, remaining_old, terminating = [], list(old), []
        max_terminating = 0
        t_roll = now()
        while remaining_old or terminating or not all(
                p.ready and now() - p.ready_since >= s["minReadySeconds"] for p in new):
            t = now()
            if t - t_roll > 900:
                raise SystemExit("rollout_rehearsal: the rollout did not finish in 15 minutes")
            for p in new:
                probe(p, t)
            available = len(remaining_old) + sum(
                1 for p in new if p.ready and t - p.ready_since >= s["minReadySeconds"])
            if len(new) < R and len(remaining_old) + len(new) < R + S:
                p = make_pod(f"new{len(new)}")
                new.append(p)
                log(f"{p.name} created")
            if remaining_old and available - 1 >= R - U:
                p = remaining_old.pop(0)
                p.deleted_at = t
                lb.cmd(f"set server nodes/{p.name} state maint")
                terminating.append(p)
                log(f"{p.name} deleted: out of the endpoints, preStop {s['preStopSeconds']}s")
            for p in list(terminating):
                if p.sigterm_at is None and t - p.deleted_at >= s["preStopSeconds"]:
                    p.proc.send_signal(signal.SIGTERM)
                    p.sigterm_at = t
                    log(f"{p.name} SIGTERM")
                if p.proc.poll() is not None:
                    p.exited_at = t
                    terminating.remove(p)
                    log(f"{p.name} exited {p.proc.returncode} after {t - p.deleted_at:.1f}s")
                elif t - p.deleted_at >= s["terminationGracePeriodSeconds"]:
                    p.proc.kill()
                    p.killed = True
            max_terminating = max(max_terminating, len(terminating))
            await asyncio.sleep(0.1)
        log(f"rollout complete in {now() - t_roll:.1f}s")
        await asyncio.sleep(3)
        pub.stop_flag.set()
        pub.join()
        final = {t: max(o) for t, o in pub.acked.items() if o}
        # Let the last messages arrive.
        for _ in range(300):
            if all(c.state[t][1] >= final.get(t, 0) for c in clients for t in c.topics):
                break
            await asyncio.sleep(0.05)
        for c in clients:
            c.stop = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return pub, final, old, max_terminating, t_roll

    pub, final, old_pods, max_terminating, t_roll = asyncio.run(rollout())

    lost = dup = delivered = 0
    for c in clients:
        for t in c.topics:
            got = c.received[t]
            expected = set(range(c.first[t][1] + 1, final.get(t, 0) + 1))
            delivered += len(got)
            dup += len(got) - len(set(got))
            lost += len(expected - set(got))
    published = sum(len(o) for o in pub.acked.values())
    epochs_changed = any(len(e) > 1 for e in pub.epochs.values())
    per_second = collections.Counter(int(x) for x in stats.reconnects)
    peak = max(per_second.values(), default=0)
    per_pod = a.clients / R
    drain_window = 0.8 * (s["drain.grace"] - s["drain.delay"])
    expected_rate = max(1, max_terminating) * per_pod / drain_window
    # A storm is a pod's clients reconnecting together; a paced drain spreads them over the grace.
    bound = a.max_reconnects_per_second or max(5, math.ceil(per_pod / 4))
    killed = [p.name for p in old_pods if p.killed]
    print(f"rollout_rehearsal: clients={a.clients} messages_published={published} deliveries={delivered} "
          f"lost={lost} duplicated={dup} reconnects={len(stats.reconnects)} peak_reconnects_per_second={peak} "
          f"(bound {bound}; expected ~{expected_rate:.2f}/s with up to {max_terminating} pods draining at once) "
          f"resumes={dict(stats.resumes)} unexpected_gaps={stats.unexpected} failed_connects={stats.failed_connects} "
          f"publish_retries={pub.failed} closes={dict(stats.closes)} sigkilled={killed or 'none'}")
    problems = []
    if published == 0 or delivered == 0:
        problems.append("nothing was published or delivered")
    if lost or dup:
        problems.append(f"{lost} lost, {dup} duplicated")
    if stats.resumes.get("not_recovered"):
        problems.append(f"{stats.resumes['not_recovered']} resumes not recovered")
    if killed:
        problems.append(f"pods SIGKILLed at terminationGracePeriodSeconds: {killed}")
    if epochs_changed:
        problems.append("a topic changed epoch")
    if peak > bound:
        problems.append(f"reconnect storm: {peak} reconnects in one second (bound {bound})")
    if set(stats.closes) - {1001}:
        problems.append(f"connections ended other than by the drain's 1001: {dict(stats.closes)}")
    if not stats.reconnects:
        problems.append("no client reconnected: the rollout did not move anyone")
    if problems:
        raise SystemExit("rollout_rehearsal: FAILED: " + "; ".join(problems))
    print("rollout_rehearsal: OK")
    return 0


if __name__ == "__main__":
    rc = 1
    try:
        rc = main()
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.kill()
                p.wait()
    sys.exit(rc)
