# shellcheck shell=bash
# shellcheck disable=SC2154 # $out, $helm, $py, $kube_version, $pubgate_bin: set by validate-deploy.sh
# The self-test of scripts/validate-deploy.sh, sourced by it (it uses its functions and variables:
# render_chart, validate_rendered, check_*, replay_dockerfile, rehearse, $helm, $py, $out, ...).
# Each case breaks one thing on purpose and expects the validation to fail with a given message.

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

  printf 'config:\n  namespaces:\n    - name: prices\n      pattern: "prices.>"\n      slow_consumer: latest\n' \
    >"$st/values-ns-policy.yaml"
  expect_failure "unknown namespace slow_consumer (schema)" "value must be one of|is not one of|enum" \
    render_chart "$st/chart-a" "$st/r-ns-policy" "$st/values-ns-policy.yaml"

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
    printf 'config:\n  namespaces:\n    - name: prices\n      pattern: "prices.>"\n      conflate_key: symbol\n' \
      >"$st/values-ns-key.yaml"
    mkdir -p "$st/r-ns"
    "$helm" template pubgate "$st/chart-a" --kube-version "$kube_version" -f "$st/values-ns-key.yaml" >"$st/r-ns/ns-key.yaml"
    expect_failure "a namespace pubgate refuses (conflate_key without conflate)" \
      "namespaces\[0\]\.conflate_key" check_rendered_config "$st/r-ns" "$out/pubgate-probe"
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

