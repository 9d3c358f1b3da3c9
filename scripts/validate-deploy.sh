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

self_test_failures=0
expect_failure() {
  local label="$1" pattern="$2"; shift 2
  local log="$out/selftest-${label// /_}.log"
  if ( "$@" ) >"$log" 2>&1; then
    echo "  FAIL: '$label' was not caught (the validation passed)"; self_test_failures=$((self_test_failures + 1))
  elif ! grep -qE -- "$pattern" "$log"; then
    echo "  FAIL: '$label' failed, but without /$pattern/:"; sed 's/^/    /' "$log" | tail -20
    self_test_failures=$((self_test_failures + 1))
  else
    echo "  caught: $label  ($(grep -m1 -oE -- "$pattern" "$log" | head -1))"
  fi
}

chart_copy() {
  local dst="$1"
  rm -rf "$dst"
  mkdir -p "$(dirname "$dst")"
  cp -a helm/pubgate "$dst"
  rm -f "$dst"/ci/*.yaml
}

# Renders CHART (with optional values files) and validates the objects: for a broken template.
render_and_validate() {
  bash -c "$(declare -f render_chart validate_rendered); helm='$helm' py='$py' kube_version='$kube_version'; \
    render_chart \"\$@\" && validate_rendered \"\$2\"" _ "$@"
}

self_test() {
  local st="$out/selftest"
  mkdir -p "$st"
  step "self-test: deliberately broken inputs must fail the validation"

  printf 'config:\n  drain:\n    grace: "10s"\n' >"$st/values-drain-in-config.yaml"
  chart_copy "$st/chart-a"
  expect_failure "value the chart owns set in config (schema)" "false schema" \
    render_chart "$st/chart-a" "$st/r-a" "$st/values-drain-in-config.yaml"

  printf 'replicaCount: 0\n' >"$st/values-zero-replicas.yaml"
  expect_failure "replicaCount 0 (schema minimum)" "minimum: got 0, want 1" \
    render_chart "$st/chart-a" "$st/r-b" "$st/values-zero-replicas.yaml"

  printf 'drain:\n  preStopSeconds: 5\n  delaySeconds: 60\n  graceSeconds: 60\n  marginSeconds: 10\n' >"$st/values-delay.yaml"
  expect_failure "drain.delay not shorter than drain.grace (template check)" "must be shorter than drain.graceSeconds" \
    render_chart "$st/chart-a" "$st/r-c" "$st/values-delay.yaml"

  # shellcheck disable=SC2016 # a literal backquote, not an expansion
  sed '/^| `drain.marginSeconds`/d' helm/pubgate/README.md >"$st/README.md"
  mkdir -p "$st/chart-readme" && cp helm/pubgate/values.yaml "$st/chart-readme/" && cp "$st/README.md" "$st/chart-readme/"
  expect_failure "a value missing from the chart README" "does not list the value drain.marginSeconds" \
    "$py" scripts/deploy/check_chart_readme.py "$st/chart-readme"

  chart_copy "$st/chart-field"
  sed -i 's/^\(\s*\)containerPort: /\1containerPorts: /' "$st/chart-field/templates/deployment.yaml"
  expect_failure "unknown field in the Deployment template (strict schema)" "'containerPorts' was unexpected" \
    bash -c "$(declare -f render_chart validate_rendered); helm='$helm' py='$py' kube_version='$kube_version'; \
      render_chart '$st/chart-field' '$st/r-field' && validate_rendered '$st/r-field'"

  chart_copy "$st/chart-kind"
  printf 'apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n' >"$st/chart-kind/templates/widget.yaml"
  expect_failure "unknown kind in a template" "no schema: .*Widget" \
    bash -c "$(declare -f render_chart validate_rendered); helm='$helm' py='$py' kube_version='$kube_version'; \
      render_chart '$st/chart-kind' '$st/r-kind' && validate_rendered '$st/r-kind'"

  chart_copy "$st/chart-grace"
  sed -i 's/terminationGracePeriodSeconds: {{ include "pubgate.terminationGracePeriodSeconds" . }}/terminationGracePeriodSeconds: 30/' \
    "$st/chart-grace/templates/deployment.yaml"
  expect_failure "grace period no longer derived from the drain settings (invariant)" \
    "terminationGracePeriodSeconds 30 must exceed preStop 5s \+ drain.grace 60s" \
    bash -c "$(declare -f render_chart validate_rendered); helm='$helm' py='$py' kube_version='$kube_version'; \
      render_chart '$st/chart-grace' '$st/r-grace' && validate_rendered '$st/r-grace'"

  # Metrics, broker, credentials, disruption budget, security context, TLS mount, rollout triggers.
  chart_copy "$st/chart-metrics"
  printf '    - name: metrics\n      port: 8081\n      targetPort: metrics\n      protocol: TCP\n' \
    >>"$st/chart-metrics/templates/service.yaml"
  expect_failure "metrics port on the LoadBalancer Service (invariant)" "exposes the metrics port .* on a LoadBalancer Service" \
    render_and_validate "$st/chart-metrics" "$st/r-metrics" helm/pubgate/ci/cluster.yaml

  printf 'broker:\n  url: "redis://redis.example:6379"\n' >"$st/values-two-brokers.yaml"
  expect_failure "external broker URL with the bundled Redis still on (template check)" \
    "broker.url and redis.enabled are both set; choose one broker source" \
    render_chart "$st/chart-a" "$st/r-brokers" "$st/values-two-brokers.yaml"

  printf 'auth:\n  apiKeys: [k1]\n  existingSecret:\n    name: creds\n' >"$st/values-two-creds.yaml"
  expect_failure "inline API keys and an existing Secret at once (template check)" "are both set; use one" \
    render_chart "$st/chart-a" "$st/r-creds" "$st/values-two-creds.yaml"

  printf 'replicaCount: 2\npodDisruptionBudget:\n  maxUnavailable: "51%%"\n' >"$st/values-pdb.yaml"
  expect_failure "PodDisruptionBudget letting every pod go (template check)" "allows all 2 pods to be evicted at once" \
    render_chart "$st/chart-a" "$st/r-pdb" "$st/values-pdb.yaml"

  chart_copy "$st/chart-pdb"
  sed -i 's/maxUnavailable: {{ .Values.podDisruptionBudget.maxUnavailable }}/minAvailable: "100%"/' \
    "$st/chart-pdb/templates/pdb.yaml"
  expect_failure "PodDisruptionBudget allowing no eviction (invariant)" "allows no voluntary eviction" \
    render_and_validate "$st/chart-pdb" "$st/r-pdb2"

  printf 'securityContext:\n  seccompProfile:\n    type: Unconfined\n' >"$st/values-seccomp.yaml"
  expect_failure "seccompProfile Unconfined in values (schema)" "seccompProfile/type': value must be one of" \
    render_chart "$st/chart-a" "$st/r-seccomp" "$st/values-seccomp.yaml"

  chart_copy "$st/chart-seccomp"
  sed -i 's/^          securityContext:$/          securityContext:\n            seccompProfile: {type: Unconfined}/' \
    "$st/chart-seccomp/templates/deployment.yaml"
  expect_failure "seccompProfile Unconfined in the template (invariant)" "seccompProfile must be RuntimeDefault" \
    render_and_validate "$st/chart-seccomp" "$st/r-seccomp2"

  chart_copy "$st/chart-subpath"
  sed -i 's|^              mountPath: /etc/pubgate/tls$|              mountPath: /etc/pubgate/tls/tls.crt\n              subPath: tls.crt|' \
    "$st/chart-subpath/templates/deployment.yaml"
  printf 'tls:\n  enabled: true\n  secretName: pubgate-tls\n' >"$st/values-tls.yaml"
  expect_failure "TLS Secret mounted with subPath (invariant: no hot reload)" "uses subPath on a secret volume" \
    render_and_validate "$st/chart-subpath" "$st/r-subpath" "$st/values-tls.yaml"

  chart_copy "$st/chart-name"
  sed -i 's|{{ include "pubgate.suffixedName" (dict "ctx" . "suffix" "metrics") }}|{{ include "pubgate.fullname" . }}-metrics|' \
    "$st/chart-name/templates/service-metrics.yaml"
  # helm lint --strict warns about it too; the rendering is checked here without lint.
  mkdir -p "$st/r-name"
  "$helm" template pubgate "$st/chart-name" --kube-version "$kube_version" -f helm/pubgate/ci/cluster.yaml \
    >"$st/r-name/cluster.yaml"
  expect_failure "a suffixed Service name past 63 characters with a long fullnameOverride (names check)" \
    "is not a DNS label of at most 63" validate_rendered "$st/r-name"

  chart_copy "$st/chart-checksum"
  sed -i '/checksum\/secret:/d' "$st/chart-checksum/templates/deployment.yaml"
  expect_failure "no checksum of the chart's Secret on the pod template (rollout triggers)" \
    "inline API key change: the pod template does not change" \
    check_rollout_triggers "$st/chart-checksum" "$st/r-checksum"

  if [[ -n "$pubgate_bin" && -x "$pubgate_bin" ]]; then
    printf 'config:\n  history:\n    size: 10\n    ttl: "0s"\n' >"$st/values-zero-ttl.yaml"
    mkdir -p "$st/r-ttl"
    "$helm" template pubgate "$st/chart-a" --kube-version "$kube_version" -f "$st/values-zero-ttl.yaml" >"$st/r-ttl/zero-ttl.yaml"
    expect_failure "a config value pubgate refuses (history.ttl 0s)" "pubgate refused the config" \
      check_rendered_config "$st/r-ttl" "$out/pubgate-probe"
  fi

  sed -e 's|^FROM gcr.io/distroless/cc-debian12:nonroot AS runtime|FROM debian:latest AS runtime\nRUN apt-get update \&\& apt-get install -y curl|' \
    deploy/Dockerfile >"$st/Dockerfile"
  expect_failure "Dockerfile: unpinned base image and apt packages (hadolint)" "DL3007|DL3008" \
    check_dockerfile "$st/Dockerfile"

  sed -e 's/for member in gateway broker-bridge loadtest; do/for member in gateway broker-bridge; do/' \
    deploy/Dockerfile >"$st/Dockerfile.members"
  expect_failure "Dockerfile: a workspace member missing from the dependency stage" "workspace members missing" \
    check_dockerfile "$st/Dockerfile.members"

  sed -e 's|^  CMD \["/usr/local/bin/pubgate-probe", "\(.*\)"\]$|  CMD /usr/local/bin/pubgate-probe \1|' \
    deploy/Dockerfile >"$st/Dockerfile.healthcheck"
  expect_failure "Dockerfile: HEALTHCHECK in shell form (needs a shell the image lacks)" "HEALTHCHECK must be CMD in exec form" \
    check_dockerfile "$st/Dockerfile.healthcheck"

  sed -e 's|^ENTRYPOINT \["\(.*\)"\]$|ENTRYPOINT \1|' deploy/Dockerfile >"$st/Dockerfile.entrypoint"
  expect_failure "Dockerfile: ENTRYPOINT in shell form" "ENTRYPOINT in shell form" check_dockerfile "$st/Dockerfile.entrypoint"

  if [[ "${PUBGATE_DEPLOY_QUICK:-}" != "1" || "${CI:-}" == "true" ]]; then
    # Cheap after the main run: the dependency stage is restored from the replay's layer cache.
    grep -v '^COPY clients/js' deploy/Dockerfile >"$st/Dockerfile.nojs"
    expect_failure "Dockerfile: the build stage misses a file the sources include (replay)" \
      "couldn't read .*clients/js/pubgate" replay_dockerfile "$st/Dockerfile.nojs" .
    (cat .dockerignore; echo 'clients/') >"$st/dockerignore"
    expect_failure ".dockerignore leaves out a file the build stage copies (replay)" \
      "COPY clients/js/pubgate.js: not in the build context" \
      replay_dockerfile --dockerignore "$st/dockerignore" deploy/Dockerfile .
  fi

  cp -a deploy/compose "$st/compose"
  mkdir -p "$st/prometheus" "$st/grafana"
  cp deploy/prometheus/* "$st/prometheus/"
  cp deploy/grafana/pubgate.json "$st/grafana/"
  sed -i '0,/restart: unless-stopped/s//restart: sometimes/' "$st/compose/compose.yaml"
  expect_failure "compose: unknown restart policy" "restart 'sometimes'" check_compose "$st/compose/compose.yaml"

  cp -a deploy/compose "$st/compose3"
  sed -i 's/"127.0.0.1:9090:9090"/"9090:9090"/' "$st/compose3/compose.yaml"
  expect_failure "compose: Prometheus published on all interfaces" "port 9090 is published on all interfaces" \
    check_compose "$st/compose3/compose.yaml"

  cp -a deploy/compose "$st/compose2"
  sed -i 's/stop_grace_period: 30s/stop_grace_period: 10s/' "$st/compose2/compose.yaml"
  expect_failure "compose: stop_grace_period shorter than drain.grace" "must exceed drain.grace" \
    check_compose "$st/compose2/compose.yaml"

  sed -i 's/expr: pubgate_broker_up == 0/expr: pubgate_broker_up == 2/' "$st/prometheus/alerts.yml"
  expect_failure "alert rule changed without its unit test (promtool test rules)" "FAILED" \
    check_prometheus "$st/prometheus"

  cp deploy/prometheus/* "$st/prometheus/"
  sed -i 's/expr: pubgate_broker_up == 0/expr: pubgate_broker_up == = 0/' "$st/prometheus/alerts.yml"
  expect_failure "alert rule with a PromQL syntax error (promtool check rules)" "parse error|unexpected" \
    check_prometheus "$st/prometheus"

  sed -i 's/pubgate_slow_consumer_disconnects_total/pubgate_slow_consumer_kicks_total/' "$st/grafana/pubgate.json"
  expect_failure "dashboard query on a metric pubgate does not export" "unknown metric pubgate_slow_consumer_kicks_total" \
    check_dashboard "$st/grafana/pubgate.json" deploy/prometheus/alerts.yml

  cp deploy/grafana/pubgate.json "$st/grafana/"
  # shellcheck disable=SC2016 # a literal $node of the dashboard
  sed -i '0,/sum(pubgate_ready{instance=~\\"$node\\"})/s//sum(pubgate_ready{instance=~\\"$node\\"}/' "$st/grafana/pubgate.json"
  expect_failure "dashboard query with a PromQL syntax error" "unclosed left parenthesis|parse error" \
    check_dashboard "$st/grafana/pubgate.json" deploy/prometheus/alerts.yml

  if [[ -n "$pubgate_bin" && -x "$pubgate_bin" ]] && command -v haproxy >/dev/null && command -v redis-server >/dev/null \
      && [[ "${PUBGATE_DEPLOY_QUICK:-}" != "1" || "${CI:-}" == "true" ]]; then
    mkdir -p "$st/r-storm"
    "$helm" template pubgate helm/pubgate --kube-version "$kube_version" \
      --set drain.preStopSeconds=0,drain.delaySeconds=0,drain.graceSeconds=1,minReadySeconds=0 >"$st/r-storm/storm.yaml"
    expect_failure "rollout with a 1-second drain and no preStop (the rehearsal sees the reconnect storm)" "reconnect storm" \
      rehearse "$st/r-storm/storm.yaml" "$st/rehearsal-storm"
  fi

  if (( self_test_failures )); then
    echo "self-test: $self_test_failures broken inputs were NOT caught"
    return 1
  fi
  echo "self-test: every broken input was caught"
}

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
