#!/usr/bin/env python3
"""Splits the cross-node hop into its parts from a loopback packet capture.

    scripts/hop-breakdown.py CAPTURE.pcap --redis-port P --node PORT:PID --node PORT:PID [--json OUT]

Why a capture: it times every step with one clock, on the real processes, without instrumenting
them. Each message of `pubgate-loadtest` carries `{"t":<send ns>` at the start of its data, and
that text travels unchanged through every hop, so every packet that carries it can be placed:

  post      the HTTP POST reaching node A (the publishing node)
  eval      node A's EVALSHA to Redis (the publish script's request)
  push      Redis's pub/sub push of the message to each node's subscriber connection
  first     the first WebSocket frame of the message a node writes
  last      the last one (each node writes one per subscriber of the topic)

The parts, per message and node (A: the node that took the POST, B: the other):
  http      post → eval on A: HTTP parsing, checks, building the script call
  redis     eval → push to B: Redis reading the call, running the script, writing the push
  route     push to B → B's first frame: B reading the push, routing, handing it to the registry,
            the first write
  fanout    B's first frame → B's last frame: the writes to the rest of B's subscribers
  hop       post → B's last frame

Redis's pushes go to connections whose local port is known only to the node; `ss` tells which
(`--node PORT:PID` with `--ss FILE`, the output of `ss -tnpH` taken during the capture).

With `--sched FILE --clock-offset NS --redis-pid PID`, each of the first three parts is split in two
by the scheduler's own record of the same seconds (`perf record -e sched:sched_waking -e
sched:sched_switch -a -k mono`, printed by `perf script --ns -F comm,pid,tid,cpu,time,event,trace`;
NS is CLOCK_REALTIME minus CLOCK_MONOTONIC, which puts the capture on perf's clock):

  <part>_wakeup   the packet reaching the process → one of its threads running (the kernel waking
                  it, and the wait for a CPU: on a virtual machine, waking an idle vCPU)
  <part>_work     that thread running → the next packet (the process's own work: reading, parsing,
                  the script, the routing; system calls included)

A step whose process already had a thread on a CPU when its packet came counts as all work. Per
step, `sched` counts the steps that woke a thread (`woken`), how many of those wake-ups went to a
CPU that was idle (`woken_onto_idle_cpu`: on a virtual machine, an idle vCPU is halted and takes
longest to wake), and the steps that found a thread running (`already_running`).
Only the standard library is used: the capture is read as classic pcap (tcpdump -w) on `lo`
(Linux cooked or Ethernet-style loopback headers, IPv4).
"""

import argparse
import bisect
import json
import re
import statistics
import struct
import sys

T_RE = re.compile(rb'\{"t":(\d{12,20}),')


def packets(path):
    """Yields (ts_ns, src_port, dst_port, payload) for each IPv4 TCP packet with a payload."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            return
        magic = struct.unpack("<I", head[:4])[0]
        if magic in (0xA1B2C3D4, 0xA1B23C4D):
            endian = "<"
        else:
            endian = ">"
            magic = struct.unpack(">I", head[:4])[0]
        nano = magic == 0xA1B23C4D
        linktype = struct.unpack(endian + "I", head[20:24])[0]
        # 1: Ethernet (lo on Linux), 113: Linux cooked, 276: Linux cooked v2
        link_len = {1: 14, 113: 16, 276: 20, 0: 4}.get(linktype)
        if link_len is None:
            sys.exit(f"hop-breakdown: unsupported link type {linktype}")
        while True:
            rec = f.read(16)
            if len(rec) < 16:
                return
            sec, frac, incl, _orig = struct.unpack(endian + "IIII", rec)
            data = f.read(incl)
            ts = sec * 1_000_000_000 + (frac if nano else frac * 1000)
            ip = data[link_len:]
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
                continue
            ihl = (ip[0] & 0x0F) * 4
            tcp = ip[ihl:]
            if len(tcp) < 20:
                continue
            sport, dport = struct.unpack(">HH", tcp[:4])
            off = (tcp[12] >> 4) * 4
            payload = tcp[off:]
            if payload:
                yield ts, sport, dport, payload


def redis_conn_owners(ss_path, node_pids, redis_port):
    """Maps the local port of each node's connection to Redis to that node's PID."""
    owners = {}
    if not ss_path:
        return owners
    for line in open(ss_path, encoding="utf-8", errors="replace"):
        m = re.search(r"127\.0\.0\.1:(\d+)\s+127\.0\.0\.1:(\d+).*pid=(\d+)", line)
        if not m:
            continue
        local, peer, pid = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if peer == redis_port and pid in node_pids:
            owners[local] = pid
    return owners


SCHED_RE = re.compile(r"^\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(\w+):\s+(.*)$")


class Sched:
    """The scheduler's events from `perf script`: who was woken when, and who ran where."""

    def __init__(self, path):
        self.pid_of = {}
        self.wakings = []  # (ns, woken tid, target cpu)
        self.switches = []  # (ns, cpu, prev tid, next tid)
        for line in open(path, encoding="utf-8", errors="replace"):
            m = SCHED_RE.match(line)
            if not m:
                continue
            _comm, pid, tid, cpu, t, event, rest = m.groups()
            self.pid_of[int(tid)] = int(pid)
            ns = round(float(t) * 1e9)
            if event == "sched_waking":
                woken = re.search(r" pid=(\d+)", rest)
                target = re.search(r"target_cpu=(\d+)", rest)
                if woken and target:
                    self.wakings.append((ns, int(woken.group(1)), int(target.group(1))))
            elif event == "sched_switch":
                prev = re.search(r"prev_pid=(\d+)", rest)
                nxt = re.search(r"next_pid=(\d+)", rest)
                if prev and nxt:
                    self.switches.append((ns, int(cpu), int(prev.group(1)), int(nxt.group(1))))
        self.wakings.sort()
        self.switches.sort()
        self.waking_t = [w[0] for w in self.wakings]
        self.switch_t = [s[0] for s in self.switches]
        # What each CPU ran from each switch on: (ns, next tid) per CPU.
        self.on_cpu = {}
        for ns, cpu, _prev, nxt in self.switches:
            self.on_cpu.setdefault(cpu, ([], []))
            self.on_cpu[cpu][0].append(ns)
            self.on_cpu[cpu][1].append(nxt)

    def covers(self, ns):
        return bool(self.switch_t) and self.switch_t[0] < ns < self.switch_t[-1]

    def running(self, cpu, ns):
        """The thread on `cpu` at `ns` (0: idle), or None if unknown."""
        times, tids = self.on_cpu.get(cpu, ([], []))
        i = bisect.bisect_right(times, ns) - 1
        return tids[i] if i >= 0 else None

    def process_running(self, pid, ns):
        return any(self.pid_of.get(self.running(cpu, ns)) == pid for cpu in self.on_cpu)

    def step(self, pid, start, end):
        """Splits start → end (a packet to `pid`, then the packet it sent) at the moment one of
        pid's threads ran: (wake-up ns, work ns, woken onto an idle CPU), or (0, all, None) when
        one was running already; None when the record does not tell."""
        if self.process_running(pid, start):
            return 0, end - start, None
        i = bisect.bisect_left(self.waking_t, start - 2_000)
        while i < len(self.wakings) and self.wakings[i][0] < end:
            t, tid, target = self.wakings[i]
            i += 1
            if self.pid_of.get(tid) != pid:
                continue
            j = bisect.bisect_left(self.switch_t, t)
            while j < len(self.switches) and self.switches[j][3] != tid:
                j += 1
            if j == len(self.switches) or self.switches[j][0] > end:
                return None
            ran = self.switches[j][0]
            return ran - start, end - ran, self.running(target, t) == 0
        return None


def summary(values):
    """Median, 90th and 99th percentile of a list of µs values."""
    if not values:
        return None
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]
    return {
        "count": len(v),
        "p50_us": round(statistics.median(v), 1),
        "p90_us": round(pick(0.90), 1),
        "p99_us": round(pick(0.99), 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pcap")
    ap.add_argument("--redis-port", type=int, required=True)
    ap.add_argument("--node", action="append", required=True, help="PORT:PID of a node")
    ap.add_argument("--ss", help="`ss -tnpH` output taken during the capture")
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("--sched", help="`perf script` of sched_waking/sched_switch over the capture")
    ap.add_argument("--clock-offset", type=int, default=0, help="CLOCK_REALTIME - CLOCK_MONOTONIC, ns")
    ap.add_argument("--redis-pid", type=int, help="Redis's PID (for --sched)")
    a = ap.parse_args()
    if a.sched and a.redis_pid is None:
        ap.error("--sched needs --redis-pid")
    nodes = {}
    for n in a.node:
        port, pid = n.split(":")
        nodes[int(port)] = int(pid)
    owners = redis_conn_owners(a.ss, set(nodes.values()), a.redis_port)

    # msg -> {"post": (ts, node_pid), "eval": ts, "push": {pid: ts}, "first": {pid: ts}, "last": {pid: ts}}
    msgs = {}
    for ts, sport, dport, payload in packets(a.pcap):
        ids = T_RE.findall(payload)
        if not ids:
            continue
        for mid in ids:
            m = msgs.setdefault(mid, {"push": {}, "first": {}, "last": {}})
            if dport in nodes:
                # Only the publish carries the text towards a node: subscribers' frames are masked.
                m.setdefault("post", (ts, nodes[dport]))
            elif dport == a.redis_port:
                m.setdefault("eval", ts)
            elif sport == a.redis_port:
                pid = owners.get(dport, -dport)
                m["push"].setdefault(pid, ts)
            elif sport in nodes:
                pid = nodes[sport]
                m["first"].setdefault(pid, ts)
                m["last"][pid] = ts

    parts = {k: [] for k in ("http", "redis", "route", "fanout", "hop", "redis_a", "route_a", "fanout_a")}
    sched = Sched(a.sched) if a.sched else None
    if sched:
        for k in ("http", "redis", "route"):
            parts[k + "_wakeup"] = []
            parts[k + "_work"] = []
    counts = {k: {"woken": 0, "woken_onto_idle_cpu": 0, "already_running": 0} for k in ("http", "redis", "route")}
    complete = 0
    for m in msgs.values():
        if "post" not in m or "eval" not in m:
            continue
        t_post, a_pid = m["post"]
        others = [p for p in nodes.values() if p != a_pid]
        if len(others) != 1:
            continue
        b_pid = others[0]
        if b_pid not in m["push"] or b_pid not in m["first"] or a_pid not in m["push"] or a_pid not in m["first"]:
            continue
        complete += 1
        us = lambda d: d / 1000.0
        parts["http"].append(us(m["eval"] - t_post))
        parts["redis"].append(us(m["push"][b_pid] - m["eval"]))
        parts["route"].append(us(m["first"][b_pid] - m["push"][b_pid]))
        parts["fanout"].append(us(m["last"][b_pid] - m["first"][b_pid]))
        parts["hop"].append(us(m["last"][b_pid] - t_post))
        parts["redis_a"].append(us(m["push"][a_pid] - m["eval"]))
        parts["route_a"].append(us(m["first"][a_pid] - m["push"][a_pid]))
        parts["fanout_a"].append(us(m["last"][a_pid] - m["first"][a_pid]))
        if sched and sched.covers(t_post - a.clock_offset) and sched.covers(m["first"][b_pid] - a.clock_offset):
            steps = (("http", a_pid, t_post, m["eval"]), ("redis", a.redis_pid, m["eval"], m["push"][b_pid]),
                     ("route", b_pid, m["push"][b_pid], m["first"][b_pid]))
            for name, pid, start, end in steps:
                split = sched.step(pid, start - a.clock_offset, end - a.clock_offset)
                if split is None:
                    continue
                wake, work, idle = split
                parts[name + "_wakeup"].append(us(wake))
                parts[name + "_work"].append(us(work))
                if idle is None:
                    counts[name]["already_running"] += 1
                else:
                    counts[name]["woken"] += 1
                    counts[name]["woken_onto_idle_cpu"] += int(idle)
    out = {
        "messages_seen": len(msgs),
        "messages_complete": complete,
        "redis_connections_mapped": len(owners),
        "parts": {k: summary(v) for k, v in parts.items()},
    }
    if sched:
        out["sched"] = counts
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if complete == 0:
        sys.exit("hop-breakdown: no message was seen on every step (was the capture on lo, with full packets?)")


if __name__ == "__main__":
    main()
