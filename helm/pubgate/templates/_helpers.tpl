{{/* Names and labels. */}}
{{- define "pubgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pubgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* fullname plus a suffix ("redis", "metrics"), still at most 63 characters: a Service name is a
DNS label, which the API server refuses longer (no offline schema checks it; k8s_validate.py does). */}}
{{- define "pubgate.suffixedName" -}}
{{- $suffix := printf "-%s" .suffix -}}
{{- printf "%s%s" (include "pubgate.fullname" .ctx | trunc (int (sub 63 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}

{{- define "pubgate.redisName" -}}
{{- include "pubgate.suffixedName" (dict "ctx" . "suffix" "redis") -}}
{{- end -}}

{{- define "pubgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pubgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pubgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pubgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pubgate
{{- end -}}

{{/* The bundled Redis: its own name label, so no pubgate selector (Service, PDB, ServiceMonitor,
NetworkPolicy) ever matches it. */}}
{{- define "pubgate.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "pubgate.name" . }}-redis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pubgate.redisLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pubgate.redisSelectorLabels" . }}
app.kubernetes.io/component: redis
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pubgate
{{- end -}}

{{- define "pubgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pubgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pubgate.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the credentials given inline in values (API keys, JWT secret, JWT public key). */}}
{{- define "pubgate.secretName" -}}
{{- include "pubgate.suffixedName" (dict "ctx" . "suffix" "auth") -}}
{{- end -}}

{{- define "pubgate.hasInlineSecret" -}}
{{- if or .Values.auth.apiKeys .Values.auth.jwtSecret .Values.auth.jwtPublicKey -}}true{{- end -}}
{{- end -}}

{{/*
Checks that the values make a deployable release; `helm template`/`install` fail with the message.
Called from the Deployment so every render runs it.
*/}}
{{- define "pubgate.validate" -}}
{{- $d := .Values.drain -}}
{{- if ge (int $d.delaySeconds) (int $d.graceSeconds) -}}
{{- fail (printf "drain.delaySeconds (%d) must be shorter than drain.graceSeconds (%d): pubgate refuses drain.delay >= drain.grace" (int $d.delaySeconds) (int $d.graceSeconds)) -}}
{{- end -}}
{{- /* Exactly one broker source, so nothing is rendered that is not used (an idle bundled Redis next to
an external one) and no source silently wins over another. */ -}}
{{- $sources := list -}}
{{- if .Values.broker.url -}}{{- $sources = append $sources "broker.url" -}}{{- end -}}
{{- if .Values.broker.existingSecret.name -}}{{- $sources = append $sources "broker.existingSecret.name" -}}{{- end -}}
{{- if .Values.redis.enabled -}}{{- $sources = append $sources "redis.enabled" -}}{{- end -}}
{{- if eq (len $sources) 0 -}}
{{- fail "broker: set broker.url, broker.existingSecret.name, or redis.enabled=true (the bundled Redis is for trying the chart out)" -}}
{{- end -}}
{{- if gt (len $sources) 1 -}}
{{- fail (printf "broker: %s are %s set; choose one broker source (with an external Redis, also set redis.enabled=false: the bundled Redis would run unused)" (join " and " $sources) (ternary "both" "all" (eq (len $sources) 2))) -}}
{{- end -}}
{{- if and .Values.redis.enabled (eq .Values.broker.kind "redis-cluster") -}}
{{- fail "broker.kind=redis-cluster needs an external Redis Cluster (broker.url); the bundled Redis is a single instance" -}}
{{- end -}}
{{- if and .Values.auth.existingSecret.name (include "pubgate.hasInlineSecret" .) -}}
{{- fail "auth: auth.existingSecret.name and inline credentials (auth.apiKeys, auth.jwtSecret, auth.jwtPublicKey) are both set; use one (the existing Secret would win and the inline values would be ignored)" -}}
{{- end -}}
{{- if eq (int .Values.service.targetPort) (int .Values.service.metricsPort) -}}
{{- fail "service.targetPort and service.metricsPort must differ: the metrics listener is a separate port, kept off the client-facing Service" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret)" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- fail "autoscaling.maxReplicas must be at least autoscaling.minReplicas" -}}
{{- end -}}
{{- $maxConn := int (dig "server" "max_connections" 0 .Values.config) -}}
{{- $target := int .Values.autoscaling.targetConnectionsPerPod -}}
{{- if and .Values.autoscaling.enabled (gt $target 0) (gt $maxConn 0) (ge $target $maxConn) -}}
{{- fail (printf "autoscaling.targetConnectionsPerPod (%d) must be below config.server.max_connections (%d): pods would refuse connections before the autoscaler adds any" $target $maxConn) -}}
{{- end -}}
{{- $surge := toString .Values.strategy.maxSurge -}}
{{- $unavail := toString .Values.strategy.maxUnavailable -}}
{{- if and (has $surge (list "0" "0%")) (has $unavail (list "0" "0%")) -}}
{{- fail "strategy.maxSurge and strategy.maxUnavailable cannot both be 0" -}}
{{- end -}}
{{- if include "pubgate.pdbEnabled" . -}}
{{- $replicas := int (include "pubgate.minReplicas" .) -}}
{{- $budget := int (include "pubgate.pdbBudget" .) -}}
{{- if ge $budget $replicas -}}
{{- fail (printf "podDisruptionBudget.maxUnavailable (%v) allows all %d pods to be evicted at once: the budget must leave at least one pod running" .Values.podDisruptionBudget.maxUnavailable $replicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The fewest pods the Deployment runs: replicaCount, or the HPA's minReplicas. */}}
{{- define "pubgate.minReplicas" -}}
{{- if .Values.autoscaling.enabled -}}{{ .Values.autoscaling.minReplicas }}{{- else -}}{{ .Values.replicaCount }}{{- end -}}
{{- end -}}

{{/* A PodDisruptionBudget only protects two or more pods: with one, any budget either blocks every
node drain or allows the only pod to go, so none is rendered. */}}
{{- define "pubgate.pdbEnabled" -}}
{{- if and .Values.podDisruptionBudget.enabled (ge (int (include "pubgate.minReplicas" .)) 2) -}}true{{- end -}}
{{- end -}}

{{/* Pods the budget lets go at the smallest scale, rounded up like the disruption controller does
for a percentage. */}}
{{- define "pubgate.pdbBudget" -}}
{{- $v := toString .Values.podDisruptionBudget.maxUnavailable -}}
{{- $replicas := int (include "pubgate.minReplicas" .) -}}
{{- if hasSuffix "%" $v -}}
{{- div (add (mul (int (trimSuffix "%" $v)) $replicas) 99) 100 -}}
{{- else -}}
{{- int $v -}}
{{- end -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: preStop sleep + drain.grace + margin (the one place it is computed). */}}
{{- define "pubgate.terminationGracePeriodSeconds" -}}
{{- add .Values.drain.preStopSeconds .Values.drain.graceSeconds .Values.drain.marginSeconds -}}
{{- end -}}

{{/* The pubgate config map as a dict: values.config plus the keys the chart owns. */}}
{{- define "pubgate.configDict" -}}
{{- $c := deepCopy .Values.config -}}
{{- $_ := set $c "drain" (dict "grace" (printf "%ds" (int .Values.drain.graceSeconds)) "delay" (printf "%ds" (int .Values.drain.delaySeconds))) -}}
{{- $broker := default (dict) (get $c "broker") -}}
{{- $_ := set $broker "kind" .Values.broker.kind -}}
{{- if .Values.broker.url -}}
{{- $_ := set $broker "url" .Values.broker.url -}}
{{- else if .Values.redis.enabled -}}
{{- $_ := set $broker "url" (printf "redis://%s:6379" (include "pubgate.redisName" .)) -}}
{{- end -}}
{{- $_ := set $c "broker" $broker -}}
{{- if .Values.tls.enabled -}}
{{- $tls := default (dict) (get $c "tls") -}}
{{- $_ := set $tls "cert" "/etc/pubgate/tls/tls.crt" -}}
{{- $_ := set $tls "key" "/etc/pubgate/tls/tls.key" -}}
{{- $_ := set $c "tls" $tls -}}
{{- end -}}
{{- if or .Values.auth.jwtPublicKey .Values.auth.existingSecret.jwtPublicKeyKey -}}
{{- $auth := default (dict) (get $c "auth") -}}
{{- $_ := set $auth "jwt_public_key" "/etc/pubgate/jwt/jwt-public-key.pem" -}}
{{- $_ := set $c "auth" $auth -}}
{{- end -}}
{{- toJson $c -}}
{{- end -}}

{{/*
Renders a two-level map (section -> key -> value) as TOML. Scalars and lists of scalars are written with
toJson, whose strings, numbers (integers stay integers) and arrays are valid TOML; a list of maps becomes
an array of tables: inside a section ([[history.rules]]) or as a section of its own ([[namespaces]]).
*/}}
{{- define "pubgate.toml" -}}
{{- $c := . -}}
{{- range $section := keys $c | sortAlpha }}
{{- $body := get $c $section }}
{{- if kindIs "slice" $body }}
{{- /* a top-level array of tables: one [[section]] per entry, in the order given (first match wins) */}}
{{- range $t := $body }}
[[{{ $section }}]]
{{- range $tk := keys $t | sortAlpha }}
{{ $tk }} = {{ get $t $tk | toJson }}
{{- end }}
{{- end }}
{{- else }}
[{{ $section }}]
{{- /* scalars and lists of scalars first: keys after a [[table]] header would belong to it */}}
{{- range $key := keys $body | sortAlpha }}
{{- $v := get $body $key }}
{{- if not (and (kindIs "slice" $v) $v (kindIs "map" (first $v))) }}
{{ $key }} = {{ $v | toJson }}
{{- end }}
{{- end }}
{{- range $key := keys $body | sortAlpha }}
{{- $v := get $body $key }}
{{- if and (kindIs "slice" $v) $v (kindIs "map" (first $v)) }}
{{- range $t := $v }}
[[{{ $section }}.{{ $key }}]]
{{- range $tk := keys $t | sortAlpha }}
{{ $tk }} = {{ get $t $tk | toJson }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{ end }}
{{- end -}}
