#!/usr/bin/env python3
"""Strict offline validation of rendered Kubernetes manifests (helm template output).

    k8s_validate.py --kube-version 1.32.0 RENDERED.yaml [...]

For every document:
  * built-in kinds: kubernetes-validate's bundled *strict* schemas (an unknown field fails), every error
    reported (not only the first); a kind with no schema is an error;
  * prometheus-operator kinds (ServiceMonitor, PrometheusRule): a small strict schema of the fields the
    chart uses (no registry ships the operator's CRDs);
  * duplicate mapping keys and duplicate objects (kind/namespace/name) are errors;
  * checks the schemas cannot express: port ranges, enum strings;
  * the chart's own invariants for pubgate: probes, drain timing agreeing across the Deployment and
    the config, rollout settings, restricted security context with RuntimeDefault seccomp, selectors
    that match, Secret/ConfigMap volumes mounted without subPath (TLS hot reload), the metrics port on
    no Service or Ingress that leaves the cluster, a PodDisruptionBudget that allows one eviction and
    never all pods at any scale.
Exit status 1 when anything failed.
"""
import argparse
import re
import sys
import tomllib

import jsonschema
import kubernetes_validate
from kubernetes_validate import utils as kvu
import yaml
from referencing import Registry, Resource

errors = []


def err(where, msg):
    errors.append(f"{where}: {msg}")


class StrictLoader(yaml.SafeLoader):
    """A YAML loader that rejects duplicate keys (PyYAML keeps the last one silently)."""


def _mapping(loader, node, deep=False):
    keys = set()
    for k, _ in node.value:
        key = loader.construct_object(k, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", k.start_mark)
        keys.add(key)
    return loader.construct_mapping(node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

STR = {"type": "string"}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
META = {"type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {"name": STR, "namespace": STR, "labels": STRMAP, "annotations": STRMAP}}
DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": STR, "kind": STR, "metadata": META,
            "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
                     "properties": {
                         "jobLabel": STR,
                         "selector": {"type": "object", "additionalProperties": False,
                                      "properties": {"matchLabels": STRMAP}},
                         "endpoints": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "additionalProperties": False, "required": ["port"],
                             "properties": {
                                 "port": STR, "path": STR, "interval": DURATION, "scrapeTimeout": DURATION,
                                 "relabelings": {"type": "array", "items": {
                                     "type": "object", "additionalProperties": False,
                                     "properties": {"sourceLabels": {"type": "array", "items": STR},
                                                    "targetLabel": STR, "regex": STR, "replacement": STR,
                                                    "action": STR, "separator": STR}}}}}}}}}},
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": STR, "kind": STR, "metadata": META,
            "spec": {"type": "object", "additionalProperties": False, "required": ["groups"],
                     "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                         "properties": {
                             "name": STR, "interval": DURATION,
                             "rules": {"type": "array", "minItems": 1, "items": {
                                 "type": "object", "additionalProperties": False, "required": ["expr"],
                                 "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                 "properties": {"alert": STR, "record": STR, "expr": STR, "for": DURATION,
                                                "labels": STRMAP, "annotations": STRMAP}}}}}}}}}},
}
# Kinds deliberately not validated. Keep empty unless a kind truly has no schema anywhere.
SKIP_KINDS = set()

ENUMS = {
    "imagePullPolicy": {"Always", "IfNotPresent", "Never"},
    "protocol": {"TCP", "UDP", "SCTP"},
    "whenUnsatisfiable": {"DoNotSchedule", "ScheduleAnyway"},
    "pathType": {"Exact", "Prefix", "ImplementationSpecific"},
    "restartPolicy": {"Always", "OnFailure", "Never"},
}
PORT_KEYS = {"port", "containerPort", "targetPort", "nodePort", "hostPort"}


def strict_schema_errors(doc, version):
    """Every error of the strict built-in schema (kubernetes_validate.validate stops at the first)."""
    v = version[1:] if version.startswith("v") else version
    versions = [x for x in kvu.all_versions() if kvu.major_minor(x) <= kvu.major_minor(v)]
    if not versions:
        raise kvu.VersionNotSupportedError(v)
    sv = versions[-1]
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
    d = f"v{sv}-local-strict"
    try:
        schema = kvu.schema_contents(f"kubernetes-json-schema/{d}/{doc['kind'].lower()}-{api}.json", v)
    except FileNotFoundError:
        raise kvu.SchemaNotFoundError(version=v, kind=doc["kind"], api_version=doc["apiVersion"])
    defs = kvu.schema_contents(f"kubernetes-json-schema/{d}/_definitions.json", v)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.validators.Draft202012Validator(schema, registry=registry)
    return sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))


def walk(node, path, where):
    if isinstance(node, dict):
        for k, val in node.items():
            p = f"{path}.{k}"
            if k in PORT_KEYS and isinstance(val, int) and not 1 <= val <= 65535:
                err(where, f"{p}: port {val} out of range 1-65535")
            if k in ENUMS and isinstance(val, str) and val not in ENUMS[k]:
                err(where, f"{p}: {val!r} is not one of {sorted(ENUMS[k])}")
            walk(val, p, where)
    elif isinstance(node, list):
        for i, val in enumerate(node):
            walk(val, f"{path}[{i}]", where)


DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def check_names(d, where):
    """What the API server checks and the JSON schemas do not: object names (a Service's is a DNS label
    of at most 63 characters, which a long release name plus a suffix can exceed) and label values."""
    name = d.get("metadata", {}).get("name", "")
    if d["kind"] == "Service":
        if len(name) > 63 or not DNS_LABEL.match(name):
            err(where, f"Service name {name!r} ({len(name)} characters) is not a DNS label of at most 63")
    elif len(name) > 253 or not DNS_SUBDOMAIN.match(name):
        err(where, f"name {name!r} is not a DNS subdomain of at most 253 characters")
    for k, v in (d.get("metadata", {}).get("labels") or {}).items():
        if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
            err(where, f"label {k}={v!r} is not a valid label value (at most 63 characters)")


def parse_duration(s):
    m = re.fullmatch(r"([0-9]+)(ms|s|m|h)", s)
    if not m:
        return None
    n, u = int(m.group(1)), m.group(2)
    return {"ms": n / 1000, "s": n, "m": n * 60, "h": n * 3600}[u]


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_mounts(w, pod, c):
    """Secret and ConfigMap volumes are mounted whole: a subPath mount is a copy made at start that the
    kubelet never updates, which would silently defeat certificate hot reload."""
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        v = vols.get(m["name"], {})
        source = next((k for k in ("secret", "configMap", "projected") if k in v), None)
        if source and (m.get("subPath") or m.get("subPathExpr")):
            err(w, f"volumeMount {m['name']} uses subPath on a {source} volume: it never receives updates "
                   "(a renewed certificate would not reach pubgate); mount the directory")


def check_services(where, docs, pod_selector, ports):
    """The metrics port (/metrics, probes) is never reachable from outside the cluster: no Service that
    leaves the cluster (LoadBalancer, NodePort, externalIPs) and no Ingress may lead to it."""
    metrics = {"metrics", ports.get("metrics")}
    exposed_ports = {}  # service name -> {port name/number that leads to the metrics container port}
    for d in docs:
        if d["kind"] != "Service" or d["spec"].get("selector") != pod_selector:
            continue
        sw = f"{where} Service/{d['metadata']['name']}"
        external = d["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort") or d["spec"].get("externalIPs")
        to_metrics = set()
        for p in d["spec"]["ports"]:
            tp = p.get("targetPort", p.get("port"))
            if isinstance(tp, str) and tp not in ports:
                err(sw, f"targetPort {tp} is no container port")
            if tp in metrics:
                to_metrics |= {p.get("name"), p.get("port")}
                if external:
                    err(sw, f"exposes the metrics port ({p.get('name')}: {p.get('port')}) on a "
                            f"{d['spec'].get('type', 'ClusterIP')} Service; metrics belong on a ClusterIP Service")
        exposed_ports[d["metadata"]["name"]] = to_metrics
    for d in docs:
        if d["kind"] != "Ingress":
            continue
        for rule in d["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                svc = path.get("backend", {}).get("service", {})
                port = svc.get("port", {})
                if {port.get("name"), port.get("number")} & exposed_ports.get(svc.get("name"), set()) - {None}:
                    err(f"{where} Ingress/{d['metadata']['name']}", f"routes {path.get('path')} to the metrics port")


def pod_count_range(docs, dep):
    """The smallest and largest number of pods: the HPA's range when one scales the Deployment."""
    for d in docs:
        ref = d.get("spec", {}).get("scaleTargetRef", {}) if d["kind"] == "HorizontalPodAutoscaler" else {}
        if ref.get("kind") == "Deployment" and ref.get("name") == dep["metadata"]["name"]:
            return d["spec"].get("minReplicas", 1), d["spec"]["maxReplicas"]
    n = dep["spec"].get("replicas", 1)
    return n, n


def scaled(value, replicas):
    """An int-or-percent of `replicas`, rounded up (what the disruption controller does)."""
    if isinstance(value, str) and value.endswith("%"):
        return -(-int(value[:-1]) * replicas // 100)
    return int(value)


def check_pdb_budget(w, spec, replicas):
    """At every scale the budget allows one voluntary eviction (else node drains hang) and never allows
    the last pod to go (else a drain can take the service down)."""
    lo, hi = replicas
    if lo < 2:
        err(w, f"a PodDisruptionBudget on {lo} pod(s) either blocks every node drain or lets the only pod go")
        return
    for n in range(lo, hi + 1):
        if "maxUnavailable" in spec:
            allowed = min(scaled(spec["maxUnavailable"], n), n)
        elif "minAvailable" in spec:
            allowed = n - min(scaled(spec["minAvailable"], n), n)
        else:
            err(w, "neither maxUnavailable nor minAvailable is set")
            return
        if allowed < 1:
            err(w, f"with {n} pods the budget allows no voluntary eviction: node drains would hang")
            return
        if allowed >= n:
            err(w, f"with {n} pods the budget allows all {n} to be evicted at once (0 available)")
            return


def pubgate_invariants(docs, where):
    deps = [d for d in docs if d["kind"] == "Deployment"
            and any(c["name"] == "pubgate" for c in d["spec"]["template"]["spec"]["containers"])]
    if len(deps) != 1:
        err(where, f"expected one pubgate Deployment, found {len(deps)}")
        return
    dep = deps[0]
    w = f"{where} Deployment/{dep['metadata']['name']}"
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    if not selects(spec["selector"]["matchLabels"], labels):
        err(w, "selector does not match the pod labels")
    c = next(c for c in pod["containers"] if c["name"] == "pubgate")
    ru = spec.get("strategy", {}).get("rollingUpdate", {})
    if spec.get("strategy", {}).get("type") != "RollingUpdate" or ru.get("maxUnavailable") not in (0, "0%"):
        err(w, "rollouts must use RollingUpdate with maxUnavailable 0 (a pod drains only once its replacement is ready)")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        got = c.get(probe, {}).get("httpGet", {}).get("path")
        if got != path:
            err(w, f"{probe} must GET {path}, got {got!r}")
    sc = c.get("securityContext", {})
    psc = pod.get("securityContext", {})
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        err(w, "runAsNonRoot must be true")
    if sc.get("readOnlyRootFilesystem") is not True:
        err(w, "readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        err(w, "allowPrivilegeEscalation must be false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        err(w, "capabilities must drop ALL")
    if not c.get("resources", {}).get("requests"):
        err(w, "resources.requests must be set")
    # The container's seccompProfile overrides the pod's; the effective one must confine syscalls.
    seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        err(w, f"seccompProfile must be RuntimeDefault (or Localhost), got {seccomp!r}")
    check_mounts(w, pod, c)
    # Drain timing: the config's drain.grace/delay, the preStop sleep and the grace period agree.
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    cfg_vol = next((v for v in pod.get("volumes", []) if v["name"] == "config"), None)
    cm = cms.get(cfg_vol["configMap"]["name"]) if cfg_vol else None
    if not cm or "pubgate.toml" not in cm.get("data", {}):
        err(w, "no ConfigMap with pubgate.toml mounted as volume `config`")
        return
    try:
        toml = tomllib.loads(cm["data"]["pubgate.toml"])
    except tomllib.TOMLDecodeError as e:
        err(w, f"pubgate.toml is not valid TOML: {e}")
        return
    drain = toml.get("drain", {})
    grace = parse_duration(drain.get("grace", "30s"))
    delay = parse_duration(drain.get("delay", "0s"))
    if grace is None or delay is None:
        err(w, f"drain.grace/delay unreadable: {drain}")
        return
    if delay >= grace:
        err(w, f"drain.delay {delay}s must be shorter than drain.grace {grace}s")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    if tgps <= pre + grace:
        err(w, f"terminationGracePeriodSeconds {tgps} must exceed preStop {pre}s + drain.grace {grace}s")
    env = {e["name"]: e for e in c.get("env", [])}
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
    for var, port in (("PUBGATE__SERVER__LISTEN", "ws"), ("PUBGATE__SERVER__METRICS_LISTEN", "metrics")):
        val = env.get(var, {}).get("value", "")
        if port not in ports or not val.endswith(f":{ports[port]}"):
            err(w, f"{var}={val!r} does not match container port {port}")
    tls_cfg = toml.get("tls", {})
    if tls_cfg.get("cert"):
        mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts", [])}
        for key in ("cert", "key"):
            path = tls_cfg.get(key, "")
            mp = path.rsplit("/", 1)[0]
            if mp not in mounts:
                err(w, f"tls.{key} {path!r} is not in a mounted directory (the Secret must be mounted as a "
                       "directory for certificate hot reload)")
    check_services(where, docs, spec["selector"]["matchLabels"], ports)
    replicas = pod_count_range(docs, dep)
    for d in docs:
        k = d["kind"]
        if k == "PodDisruptionBudget":
            pw = f"{where} PodDisruptionBudget/{d['metadata']['name']}"
            if not selects(d["spec"]["selector"]["matchLabels"], labels):
                err(pw, "selector does not match the pods")
            check_pdb_budget(pw, d["spec"], replicas)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kube-version", default="1.32.0")
    ap.add_argument("--no-pubgate-checks", action="store_true")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    total = 0
    for f in a.files:
        try:
            docs = [d for d in yaml.load_all(open(f), Loader=StrictLoader) if d]
        except yaml.YAMLError as e:
            err(f, f"YAML: {e}")
            continue
        seen = set()
        for d in docs:
            if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
                err(f, "a document without apiVersion/kind")
                continue
            total += 1
            name = d.get("metadata", {}).get("name", "?")
            where = f"{f} {d['kind']}/{name}"
            key = (d["apiVersion"].split("/")[0] if "/" in d["apiVersion"] else "", d["kind"],
                   d.get("metadata", {}).get("namespace", ""), name)
            if key in seen:
                err(where, "duplicate object")
            seen.add(key)
            walk(d, "", where)
            check_names(d, where)
            crd = CRD_SCHEMAS.get((d["apiVersion"], d["kind"]))
            if crd is not None:
                for e in jsonschema.Draft202012Validator(crd).iter_errors(d):
                    err(where, f"{'.'.join(map(str, e.absolute_path))}: {e.message}")
                continue
            if d["kind"] in SKIP_KINDS:
                continue
            try:
                for e in strict_schema_errors(d, a.kube_version):
                    err(where, f"{'.'.join(map(str, e.absolute_path))}: {e.message}")
            except kvu.SchemaNotFoundError as e:
                err(where, f"no schema: {e.message} (unknown kinds fail; list deliberate skips in SKIP_KINDS)")
        if not a.no_pubgate_checks:
            try:
                pubgate_invariants([d for d in docs if isinstance(d, dict) and "kind" in d], f)
            except (KeyError, TypeError, StopIteration, AttributeError) as e:
                err(f, f"pubgate invariants: the objects do not have the expected shape ({type(e).__name__}: {e})")
    for e in errors:
        print(f"ERROR {e}")
    print(f"k8s_validate: {total} objects in {len(a.files)} files, kubernetes {a.kube_version} "
          f"(kubernetes-validate {kubernetes_validate.__version__}), {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
