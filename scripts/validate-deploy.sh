#!/usr/bin/env bash
# Validates everything under deploy/ and helm/ offline: no container engine, no cluster, no network
# beyond the package registries scripts/deploy-tools.sh installs from (once; cached afterwards).
#
#   scripts/validate-deploy.sh              validate the repository
#   scripts/validate-deploy.sh --self-test  then break things on purpose (bad values, a bad template, a
#                                           bad Dockerfile, compose file, alert rule and dashboard) and
#                                           check that each one makes the validation fail
#
# What runs:
#   helm lint --strict (default values and each helm/pubgate/ci/*.yaml), helm template for each;
#   every rendered object against the strict Kubernetes schemas (kubernetes-validate; unknown fields and
#   kinds fail), names and label values as the API server checks them, plus the chart's invariants
#   (scripts/deploy/k8s_validate.py: probes, drain timing, security context with RuntimeDefault seccomp,
#   no subPath on Secret mounts, metrics port on no external Service or Ingress, disruption budget);
#   what rolls the pods: a config/credential/rolloutToken change must change the pod template;
#   each rendered pubgate.toml loaded by the real pubgate binary, which must start, answer the
#   container's HEALTHCHECK probe, and exit on SIGTERM;
#   hadolint on deploy/Dockerfile, a check that its dependency stage covers every workspace member and
#   that its runtime stage needs no shell (scripts/deploy/check_dockerfile.py), and (not with
#   PUBGATE_DEPLOY_QUICK=1) a replay of its build stages without Docker: exactly the COPYed files, the
#   RUN commands, cargo check offline (scripts/deploy/dockerfile_replay.py);
#   docker-compose config on deploy/compose, the compose-spec JSON schema, checks of our own
#   (scripts/deploy/check_compose.py), and `haproxy -c` on its HAProxy config;
#   promtool check config / check rules / test rules on deploy/prometheus, and the same unit tests on
#   the PrometheusRule the chart renders;
#   the Grafana dashboard parsed and its queries checked (metric names, PromQL via promtool);
#   yamllint on the plain YAML files;
#   live (needs the pubgate binary, redis-server, haproxy, prometheus): the rollout rehearsal
#   (scripts/deploy/rollout_rehearsal.py: a rolling update of local pubgate processes behind HAProxy with
#   the settings read from the rendered chart, resuming clients and a publisher; 0 lost, 0 duplicated,
#   no reconnect storm) and a real Prometheus scraping a real node, whose alerts fire and resolve when
#   Redis stops and starts (scripts/deploy/prometheus_live_test.py).
#
# Environment: PUBGATE_BIN (default target/debug/pubgate, else target/release/pubgate; with CI=true a
# missing binary is an error, else that step is skipped), PUBGATE_KUBE_VERSION (default 1.32.0),
# PUBGATE_DEPLOY_TOOLS (see scripts/deploy-tools.sh), PUBGATE_DEPLOY_QUICK=1 skips the live steps
# (about two minutes) outside CI.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
kube_version="${PUBGATE_KUBE_VERSION:-1.32.0}"
self_test=0
case "${1:-}" in
  "") ;;
  --self-test) self_test=1 ;;
  *) echo "usage: $0 [--self-test]" >&2; exit 2 ;;
esac

tools="$(scripts/deploy-tools.sh)"
helm="$tools/bin/helm"
py="$tools/venv/bin/python"
out="$repo/target/validate-deploy"
rm -rf "$out"
mkdir -p "$out"

started_pids=""
cleanup() {
  local pid
  for pid in $started_pids; do
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "$out/replay-cache"   # the replayed build's target directory (hundreds of MB)
}
trap cleanup EXIT

step() { echo "== $*"; }

pubgate_bin="${PUBGATE_BIN:-}"
if [[ -z "$pubgate_bin" ]]; then
  for b in target/debug/pubgate target/release/pubgate; do
    if [[ -x "$b" ]]; then pubgate_bin="$repo/$b"; break; fi
  done
fi

# ---------------------------------------------------------------------------------------------------
# Helm chart

# Lints and renders CHART with its default values, each CHART/ci/*.yaml and any extra values files;
# every rendering goes to $2 (a directory), one file each.
render_chart() {
  local chart="$1" dir="$2"; shift 2
  local sets=(--kube-version "$kube_version")
  local files=("" "$chart"/ci/*.yaml "$@") f name rc=0
  mkdir -p "$dir"
  for f in "${files[@]}"; do
    [[ -z "$f" || -f "$f" ]] || continue
    local vals=()
    if [[ -n "$f" ]]; then vals=(-f "$f"); name="$(basename "$f" .yaml)"; else name="default"; fi
    # helm lint reports a template's `fail` as INFO and still passes: helm template below catches those.
    if ! "$helm" lint --strict --quiet "${sets[@]}" "${vals[@]}" "$chart" >"$dir/lint-$name.log" 2>&1; then
      echo "helm lint --strict failed for values '$name':"; cat "$dir/lint-$name.log"; rc=1; continue
    fi
    if ! "$helm" template pubgate "$chart" --namespace pubgate "${sets[@]}" \
        --api-versions monitoring.coreos.com/v1 "${vals[@]}" \
        >"$dir/$name.yaml" 2>"$dir/template-$name.log"; then
      echo "helm template failed for values '$name':"; cat "$dir/template-$name.log"; rc=1
      rm -f "$dir/$name.yaml"; continue
    fi
    echo "  rendered $name: $(grep -c '^kind:' "$dir/$name.yaml") objects"
  done
  return $rc
}

validate_rendered() {
  local dir="$1"
  local files=("$dir"/*.yaml)
  [[ -e "${files[0]}" ]] || { echo "nothing rendered in $dir"; return 1; }
  "$py" scripts/deploy/k8s_validate.py --kube-version "$kube_version" "${files[@]}"
}

# Starts the real pubgate on each rendered pubgate.toml (broker switched to memory, TLS files and the
# JWT key file left out: no Redis or Secret here), then probes it with the image's HEALTHCHECK program
# and stops it with SIGTERM: the config must load and the drain must end in time.
check_rendered_config() {
  local dir="$1" probe="$2" f rc=0
  if [[ -z "$pubgate_bin" || ! -x "$pubgate_bin" ]]; then
    if [[ "${CI:-}" == "true" ]]; then echo "no pubgate binary (build it, or set PUBGATE_BIN)"; return 1; fi
    echo "  SKIPPED: no pubgate binary (set PUBGATE_BIN or build target/debug/pubgate)"; return 0
  fi
  local files=("$dir"/*.yaml)
  [[ -e "${files[0]}" ]] || { echo "nothing rendered in $dir"; return 1; }
  for f in "${files[@]}"; do
    local name toml
    name="$(basename "$f" .yaml)"
    toml="$dir/$name.pubgate.toml"
    "$py" - "$f" "$toml" <<'PY' || { rc=1; continue; }
import re, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cms = [d for d in docs if d["kind"] == "ConfigMap" and "pubgate.toml" in d.get("data", {})]
if len(cms) != 1:
    sys.exit(f"{sys.argv[1]}: expected one ConfigMap with pubgate.toml, found {len(cms)}")
text = cms[0]["data"]["pubgate.toml"]
out, section = [], None
for line in text.splitlines():
    m = re.match(r"^\[+([a-z_.]+)\]+$", line.strip())
    if m:
        section = m.group(1)
    key = line.split("=", 1)[0].strip() if "=" in line else None
    if section == "broker" and key == "kind":
        line = 'kind = "memory"'
    elif (section, key) in {("broker", "url"), ("tls", "cert"), ("tls", "key"), ("auth", "jwt_public_key")}:
        continue
    out.append(line)
open(sys.argv[2], "w").write("\n".join(out) + "\n")
PY
    local log="$dir/$name.pubgate.log" pid grace
    : >"$log.out"   # exists before the background job opens it: the loop below reads it at once
    env -u RUST_LOG "$pubgate_bin" --config "$toml" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
      >"$log.out" 2>"$log" &
    pid=$!
    started_pids+="$pid "
    local i metrics=""
    for (( i = 0; i < 100; i++ )); do
      metrics="$(sed -n 's/^pubgate metrics listening on //p' "$log.out")"
      [[ -n "$metrics" ]] && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if [[ -z "$metrics" ]]; then
      wait "$pid" 2>/dev/null && code=0 || code=$?
      echo "pubgate refused the config rendered from values '$name' (exit $code):"; cat "$log"; rc=1; continue
    fi
    if ! "$probe" "http://$metrics/healthz" || ! "$probe" "http://$metrics/readyz"; then
      echo "the HEALTHCHECK probe failed against pubgate ($name)"; rc=1
    fi
    if "$probe" "http://$metrics/no-such-path" 2>/dev/null; then
      echo "the HEALTHCHECK probe passed on a 404 ($name)"; rc=1
    fi
    grace="$(sed -n 's/^grace = "\([0-9]*\)s"$/\1/p' "$toml")"
    kill -TERM "$pid"
    for (( i = 0; i < (${grace:-30} + 5) * 10; i++ )); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "pubgate ($name) did not exit within drain.grace after SIGTERM"; rc=1
    elif ! wait "$pid"; then
      echo "pubgate ($name) exited with an error after SIGTERM:"; cat "$log"; rc=1
    else
      echo "  pubgate loaded $name's config, answered the probe, drained and exited on SIGTERM"
    fi
  done
  return $rc
}

# The chart's PrometheusRule must behave like deploy/prometheus/alerts.yml: same unit tests.
check_chart_rules() {
  local chart="$1" tests="$2" dir="$3"
  mkdir -p "$dir"
  "$helm" template pubgate "$chart" --kube-version "$kube_version" --api-versions monitoring.coreos.com/v1 \
    --set fullnameOverride=pubgate --set metrics.prometheusRule.enabled=true \
    --show-only templates/prometheusrule.yaml >"$dir/prometheusrule.yaml" || return 1
  "$py" - "$dir/prometheusrule.yaml" "$dir/alerts.yml" "$tests" "$dir/alerts.test.yml" <<'PY' || return 1
import sys, yaml
rule = yaml.safe_load(open(sys.argv[1]))
yaml.safe_dump({"groups": rule["spec"]["groups"]}, open(sys.argv[2], "w"), sort_keys=False)
tests = yaml.safe_load(open(sys.argv[3]))
tests["rule_files"] = ["alerts.yml"]
yaml.safe_dump(tests, open(sys.argv[4], "w"), sort_keys=False)
PY
  promtool check rules "$dir/alerts.yml" || return 1
  (cd "$dir" && promtool test rules alerts.test.yml) || return 1
  "$py" - "$dir/alerts.yml" deploy/prometheus/alerts.yml <<'PY'
import sys, yaml
names = [sorted(r["alert"] for g in yaml.safe_load(open(p))["groups"] for r in g["rules"]) for p in sys.argv[1:]]
if names[0] != names[1]:
    sys.exit(f"the chart's alerts {names[0]} differ from deploy/prometheus/alerts.yml {names[1]}")
print(f"  the chart's PrometheusRule has the same {len(names[0])} alerts and passes the same unit tests")
PY
}

# pubgate reads its config, environment and key files only at start (TLS certificates are the one
# thing it reloads), so every change to what the chart renders for it must change the pod template
# (and roll the pods), and a change that does not concern the pods must not. Each case renders the
# Deployment twice, with BASE then BASE plus CHANGE, and compares the pod templates.
check_rollout_triggers() {
  local chart="$1" dir="$2"
  mkdir -p "$dir"
  local cases=(
    "rolls|config change|--set config.history.size=999"
    "rolls|inline API key change|--set auth.apiKeys={a}|--set auth.apiKeys={b}"
    "rolls|inline JWT secret change|--set auth.jwtSecret=one|--set auth.jwtSecret=two"
    "rolls|broker URL change|--set redis.enabled=false,broker.url=redis://a:6379|--set redis.enabled=false,broker.url=redis://b:6379"
    "rolls|rolloutToken after rotating an existingSecret|--set auth.existingSecret.name=creds|--set auth.existingSecret.name=creds,rolloutToken=2"
    "keeps|replica count change|--set replicaCount=4"
    "keeps|Service annotation change|--set service.annotations.a=b"
  )
  local c rc=0 i=0
  for c in "${cases[@]}"; do
    local want label base change
    IFS='|' read -r want label base change <<<"$c"
    [[ -n "$change" ]] || { change="$base"; base=""; }
    i=$((i + 1))
    # shellcheck disable=SC2086 # word splitting of the --set arguments is intended
    "$helm" template pubgate "$chart" --kube-version "$kube_version" $base \
      --show-only templates/deployment.yaml >"$dir/$i.a.yaml" 2>&1 || { cat "$dir/$i.a.yaml"; rc=1; continue; }
    # shellcheck disable=SC2086
    "$helm" template pubgate "$chart" --kube-version "$kube_version" $change \
      --show-only templates/deployment.yaml >"$dir/$i.b.yaml" 2>&1 || { cat "$dir/$i.b.yaml"; rc=1; continue; }
    "$py" - "$dir/$i.a.yaml" "$dir/$i.b.yaml" "$want" "$label" <<'PY' || rc=1
import sys, yaml
a, b = (yaml.safe_load(open(f))["spec"]["template"] for f in sys.argv[1:3])
want, label = sys.argv[3], sys.argv[4]
if want == "rolls" and a == b:
    sys.exit(f"{label}: the pod template does not change, so running pods would keep the old setting")
if want == "keeps" and a != b:
    sys.exit(f"{label}: the pod template changes, which would restart every pod for nothing")
print(f"  {label}: the pod template {'changes (pods roll)' if want == 'rolls' else 'stays (no restart)'}")
PY
  done
  return $rc
}

# ---------------------------------------------------------------------------------------------------
# Container image

check_dockerfile() {
  local file="$1"
  local rc=0
  "$tools/bin/hadolint" --failure-threshold warning "$file" || rc=1
  "$py" scripts/deploy/check_dockerfile.py "$file" Cargo.toml || rc=1
  return $rc
}

# The image is never built here (no container engine): replay its build stages instead, with exactly
# the files their COPY instructions take from the context (.dockerignore applied) and their RUN
# commands, `cargo build` run as `cargo check`, offline (scripts/deploy/dockerfile_replay.py).
replay_dockerfile() {
  env -u CARGO_TARGET_DIR "$py" scripts/deploy/dockerfile_replay.py --cache "$out/replay-cache" "$@"
}

build_probe() {
  local dst="$1"
  rustc --edition 2021 -C opt-level=2 -C strip=symbols -o "$dst" deploy/probe/pubgate-probe.rs
}

# ---------------------------------------------------------------------------------------------------
# Compose stack, Prometheus, Grafana

check_compose() {
  local file="$1" dir
  dir="$(dirname "$file")"
  "$tools/bin/docker-compose" -f "$file" config --quiet || return 1
  "$tools/venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$file" || return 1
  "$tools/bin/docker-compose" -f "$file" config --format json >"$out/compose.json" || return 1
  "$py" scripts/deploy/check_compose.py "$dir" <"$out/compose.json" || return 1
  haproxy -c -q -f "$dir/haproxy.cfg" 2>&1 | grep -v 'could not resolve address' || true
  haproxy -c -q -f "$dir/haproxy.cfg" >/dev/null 2>&1 || { echo "haproxy -c failed on $dir/haproxy.cfg"; return 1; }
}

check_prometheus() {
  local dir="$1"
  promtool check config "$dir/prometheus.yml" || return 1
  promtool check rules "$dir/alerts.yml" || return 1
  (cd "$dir" && promtool test rules alerts.test.yml) || return 1
}

check_dashboard() {
  local file="$1" rules="$2"
  "$py" scripts/deploy/check_metrics_use.py --repo . --dashboard "$file" --rules "$rules" \
    --promql-out "$out/dashboard-queries.yml" || return 1
  promtool check rules "$out/dashboard-queries.yml" >/dev/null || { promtool check rules "$out/dashboard-queries.yml"; return 1; }
  echo "  promtool parsed every dashboard query"
}

yaml_lint() {
  "$tools/venv/bin/yamllint" -s -c scripts/deploy/yamllint.yaml \
    helm/pubgate/Chart.yaml helm/pubgate/values.yaml helm/pubgate/ci \
    deploy/compose deploy/prometheus
}

validate_all() {
  local rc=0
  step "helm lint --strict + helm template (kubernetes $kube_version, $("$helm" version --short))"
  render_chart helm/pubgate "$out/rendered" || rc=1
  step "what rolls the pods (pubgate reads credentials and config only at start)"
  check_rollout_triggers helm/pubgate "$out/rollout-triggers" || rc=1
  step "helm/pubgate/README.md lists every value"
  "$py" scripts/deploy/check_chart_readme.py helm/pubgate || rc=1
  step "rendered objects against the strict Kubernetes schemas and the chart's invariants"
  validate_rendered "$out/rendered" || rc=1
  step "the chart's PrometheusRule against deploy/prometheus/alerts.test.yml"
  check_chart_rules helm/pubgate deploy/prometheus/alerts.test.yml "$out/chart-rules" || rc=1
  step "hadolint $("$tools/bin/hadolint" --version | grep -o '[0-9.]*$') deploy/Dockerfile"
  check_dockerfile deploy/Dockerfile || rc=1
  step "the HEALTHCHECK probe builds; pubgate loads every rendered config"
  build_probe "$out/pubgate-probe" || rc=1
  check_rendered_config "$out/rendered" "$out/pubgate-probe" || rc=1
  step "compose stack ($("$tools/bin/docker-compose" version --short))"
  check_compose deploy/compose/compose.yaml || rc=1
  step "promtool ($(promtool --version 2>&1 | head -1 | awk '{print $3}')) on deploy/prometheus"
  check_prometheus deploy/prometheus || rc=1
  step "Grafana dashboard"
  check_dashboard deploy/grafana/pubgate.json deploy/prometheus/alerts.yml || rc=1
  "$py" deploy/grafana/gen_dashboard.py --check || rc=1
  step "yamllint"
  yaml_lint || rc=1
  if [[ "${PUBGATE_DEPLOY_QUICK:-}" == "1" && "${CI:-}" != "true" ]]; then
    step "image build replay and live steps SKIPPED (PUBGATE_DEPLOY_QUICK=1)"
    return $rc
  fi
  step "the image's build stages replayed without Docker (COPY from the context, RUN with cargo check)"
  replay_dockerfile deploy/Dockerfile . 2>&1 | grep -v '^ *\(Checking\|Compiling\) ' || rc=1
  if have_live; then
    step "rollout rehearsal with the default values' settings"
    rehearse "$out/rendered/default.yaml" "$out/rehearsal" || rc=1
    step "a real Prometheus ($(prometheus --version 2>&1 | head -1 | awk '{print $3}')) scraping a real pubgate; alerts fire and resolve"
    "$py" scripts/deploy/prometheus_live_test.py --pubgate "$pubgate_bin" --rules deploy/prometheus/alerts.yml \
      --workdir "$out/prometheus-live" || rc=1
  else
    rc=1
  fi
  return $rc
}

have_live() {
  local t missing=()
  [[ -n "$pubgate_bin" && -x "$pubgate_bin" ]] || missing+=(pubgate)
  for t in redis-server redis-cli haproxy prometheus; do
    command -v "$t" >/dev/null || missing+=("$t")
  done
  if (( ${#missing[@]} )); then
    if [[ "${CI:-}" == "true" ]]; then echo "live steps need: ${missing[*]}"; return 1; fi
    step "live steps SKIPPED: missing ${missing[*]} (scripts/test-deps.sh installs redis and haproxy)"
    return 0
  fi
}

rehearse() {
  local rendered="$1" work="$2"; shift 2
  "$py" scripts/deploy/rollout_rehearsal.py --rendered "$rendered" --pubgate "$pubgate_bin" --workdir "$work" "$@" \
    | tee "$work.log" | grep -v '^  \[' || return 1
}

# ---------------------------------------------------------------------------------------------------
# Self-test: each case breaks one thing and expects the validation to fail with a given message.
# shellcheck source=scripts/deploy/self-test.sh
source scripts/deploy/self-test.sh

rc=0
validate_all || rc=1
if (( rc )); then
  echo "validate-deploy: FAILED"
  exit 1
fi
if (( self_test )); then
  self_test || exit 1
fi
echo "validate-deploy: OK"
