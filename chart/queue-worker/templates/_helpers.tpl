{{/*
Names. The worker's Deployment is named and labelled as faas-netes' chart names it
(<release>-queue-worker; app=queue-worker, component=queue-worker), so `helm upgrade` of a release
made with that chart keeps the same Deployment and its immutable selector.
*/}}
{{- define "queue-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "queue-worker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The front door's objects: <fullname>-frontdoor, cut so the suffix always fits. */}}
{{- define "queue-worker.frontdoor.fullname" -}}
{{- printf "%s-frontdoor" (include "queue-worker.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}

{{/* A value as text; an unset (null) value is "", where toString would give "<nil>". */}}
{{- define "queue-worker.str" -}}
{{- if not (kindIs "invalid" .) }}{{ toString . }}{{ end }}
{{- end }}

{{- define "queue-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of an object: dict "root" $ "component" <name> ["extra" <map>]. The extra labels
(a monitor's, the dashboard's) win over the chart's: Prometheus selects monitors by them.
*/}}
{{- define "queue-worker.labels" -}}
{{- $root := .root }}
{{- $labels := dict
  "app" (include "queue-worker.name" $root)
  "component" .component
  "release" $root.Release.Name
  "heritage" $root.Release.Service
  "chart" (include "queue-worker.chart" $root)
  "helm.sh/chart" (include "queue-worker.chart" $root)
  "app.kubernetes.io/name" (include "queue-worker.name" $root)
  "app.kubernetes.io/instance" $root.Release.Name
  "app.kubernetes.io/version" $root.Chart.AppVersion
  "app.kubernetes.io/managed-by" $root.Release.Service }}
{{- toYaml (merge (deepCopy (default dict .extra)) $labels) }}
{{- end }}

{{/*
Labels of a pod: dict "root" $ "component" <name>. podLabels are added, but cannot replace the
labels the chart's selectors use.
*/}}
{{- define "queue-worker.podLabels" -}}
{{- $root := .root }}
{{- $labels := dict
  "app" (include "queue-worker.name" $root)
  "component" .component
  "release" $root.Release.Name
  "app.kubernetes.io/name" (include "queue-worker.name" $root)
  "app.kubernetes.io/instance" $root.Release.Name }}
{{- toYaml (merge $labels (deepCopy (default dict $root.Values.podLabels))) }}
{{- end }}

{{/*
The queue the worker consumes: queueName, else nats.stream.name (as the worker decides).
*/}}
{{- define "queue-worker.queue" -}}
{{- default .Values.nats.stream.name .Values.queueName }}
{{- end }}

{{/*
Seconds in a Go duration ("25s", "1m30s", "2h", "500ms"), rounded down; fails on other text.
Used to keep terminationGracePeriodSeconds above drainTimeout.
*/}}
{{- define "queue-worker.seconds" -}}
{{- $text := toString . | trim }}
{{- if not (regexMatch "^([0-9]+(\\.[0-9]+)?(h|ms|m|s))+$" $text) }}
{{- fail (printf "drainTimeout: %q is not a duration such as 25s, 1m30s or 2h" $text) }}
{{- end }}
{{- $total := 0.0 }}
{{- range regexFindAll "[0-9.]+(h|ms|m|s)" $text -1 }}
{{- $unit := regexFind "(h|ms|m|s)$" . }}
{{- $n := float64 (trimSuffix $unit .) }}
{{- $scale := dict "h" 3600.0 "m" 60.0 "s" 1.0 "ms" 0.001 }}
{{- $total = addf $total (mulf $n (get $scale $unit)) }}
{{- end }}
{{- floor $total | int }}
{{- end }}

{{- define "queue-worker.terminationGracePeriodSeconds" -}}
{{- $drain := include "queue-worker.seconds" .Values.drainTimeout | int }}
{{- $set := include "queue-worker.str" .Values.terminationGracePeriodSeconds }}
{{- if eq $set "" }}
{{- add $drain 15 }}
{{- else }}
{{- $grace := $set | int }}
{{- if le $grace (add $drain 10) }}
{{- fail (printf "terminationGracePeriodSeconds: %d must be more than drainTimeout (%s) + 10s: after the drain the worker takes up to 10s to hand back unfinished messages and flush its acks, and Kubernetes would kill it first; leave it empty for drainTimeout + 15s" $grace .Values.drainTimeout) }}
{{- end }}
{{- $grace }}
{{- end }}
{{- end }}

{{/*
The env vars of faas-netes' chart, with the same names and values, then ours. Shared by the
worker and the front door, which read the same configuration.
*/}}
{{- define "queue-worker.env" -}}
- name: nats_host
  value: {{ include "queue-worker.str" .Values.nats.host | quote }}
- name: nats_port
  value: {{ include "queue-worker.str" .Values.nats.port | quote }}
- name: nats_stream
  value: {{ include "queue-worker.str" .Values.nats.stream.name | quote }}
- name: nats_durable
  value: {{ include "queue-worker.str" .Values.nats.consumer.durableName | quote }}
- name: queue_name
  value: {{ include "queue-worker.str" .Values.queueName | quote }}
- name: queue_partitions
  value: {{ include "queue-worker.str" .Values.queuePartitions | quote }}
- name: filter_partition
  value: {{ include "queue-worker.str" .Values.partition | quote }}
- name: max_inflight
  value: {{ include "queue-worker.str" .Values.maxInflight | quote }}
- name: scaling_mode
  value: {{ include "queue-worker.str" .Values.mode | quote }}
{{- if .Values.consumer.inactiveThreshold }}
- name: consumer_inactive_threshold
  value: {{ include "queue-worker.str" .Values.consumer.inactiveThreshold | quote }}
{{- end }}
{{- if .Values.consumer.pullMaxMessages }}
- name: consumer_pull_max_messages
  value: {{ include "queue-worker.str" .Values.consumer.pullMaxMessages | quote }}
{{- end }}
- name: gateway_url
  value: {{ printf "%s:%s" (include "queue-worker.str" .Values.gateway.host) (include "queue-worker.str" .Values.gateway.port) | quote }}
- name: tls_insecure
  value: {{ include "queue-worker.str" .Values.insecureTLS | quote }}
- name: debug
  value: {{ include "queue-worker.str" .Values.logs.debug | quote }}
- name: log_encoding
  value: {{ include "queue-worker.str" .Values.logs.format | quote }}
- name: nats_stream_replicas
  value: {{ include "queue-worker.str" .Values.nats.stream.replicas | quote }}
- name: ack_wait
  value: {{ include "queue-worker.str" .Values.nats.consumer.ackWait | quote }}
- name: adaptive_concurrency
  value: {{ include "queue-worker.str" .Values.adaptiveConcurrency | quote }}
- name: upstream_timeout
  value: {{ include "queue-worker.str" .Values.upstreamTimeout | quote }}
- name: max_retry_attempts
  value: {{ include "queue-worker.str" .Values.maxRetryAttempts | quote }}
- name: max_retry_wait
  value: {{ include "queue-worker.str" .Values.maxRetryWait | quote }}
- name: initial_retry_wait
  value: {{ include "queue-worker.str" .Values.initialRetryWait | quote }}
- name: retry_http_codes
  value: {{ include "queue-worker.str" .Values.httpRetryCodes | quote }}
- name: backoff
  value: {{ include "queue-worker.str" .Values.backoff | quote }}
{{- /* Ours from here. */}}
- name: default_function_name
  value: {{ include "queue-worker.str" .Values.functionNamespace | quote }}
- name: metrics_port
  value: {{ include "queue-worker.str" .Values.metrics.port | quote }}
- name: drain_timeout
  value: {{ include "queue-worker.str" .Values.drainTimeout | quote }}
- name: max_message_bytes
  value: {{ include "queue-worker.str" .Values.maxMessageBytes | quote }}
- name: max_call_age
  value: {{ include "queue-worker.str" .Values.maxCallAge | quote }}
- name: dead_letter_max_age
  value: {{ include "queue-worker.str" .Values.deadLetter.maxAge | quote }}
- name: dead_letter_max_bytes
  value: {{ include "queue-worker.str" .Values.deadLetter.maxBytes | quote }}
- name: call_status
  value: {{ include "queue-worker.str" .Values.callStatus.enabled | quote }}
- name: call_status_ttl
  value: {{ include "queue-worker.str" .Values.callStatus.ttl | quote }}
- name: call_status_max_bytes
  value: {{ include "queue-worker.str" .Values.callStatus.maxBytes | quote }}
- name: callback_max_attempts
  value: {{ include "queue-worker.str" .Values.callback.maxAttempts | quote }}
- name: callback_timeout
  value: {{ include "queue-worker.str" .Values.callback.timeout | quote }}
- name: callback_retry_wait
  value: {{ include "queue-worker.str" .Values.callback.retryWait | quote }}
- name: callback_allowed_networks
  value: {{ include "queue-worker.str" .Values.callback.allowedNetworks | quote }}
- name: callback_max_pending
  value: {{ include "queue-worker.str" .Values.callback.maxPending | quote }}
- name: callback_max_pending_bytes
  value: {{ include "queue-worker.str" .Values.callback.maxPendingBytes | quote }}
{{- with .Values.nats.url }}
- name: nats_url
  value: {{ include "queue-worker.str" . | quote }}
{{- end }}
{{- $auth := .Values.nats.auth }}
{{- if $auth.user }}
- name: nats_user
  value: {{ include "queue-worker.str" $auth.user | quote }}
{{- end }}
{{- if $auth.passwordSecret.name }}
- name: nats_password_file
  value: /var/secrets/nats/password
{{- end }}
{{- if $auth.tokenSecret.name }}
- name: nats_token_file
  value: /var/secrets/nats/token
{{- end }}
{{- if $auth.credsSecret.name }}
- name: nats_creds_file
  value: /var/secrets/nats/nats.creds
{{- end }}
{{- if $auth.nkeySecret.name }}
- name: nats_nkey_file
  value: /var/secrets/nats/nkey
{{- end }}
{{- if .Values.nats.tls.caSecret.name }}
- name: nats_tls_ca_file
  value: /var/secrets/nats/ca.crt
{{- end }}
{{- if .Values.nats.tls.clientSecret.name }}
- name: nats_tls_cert_file
  value: /var/secrets/nats/tls.crt
- name: nats_tls_key_file
  value: /var/secrets/nats/tls.key
{{- end }}
{{- end }}

{{/* extraEnv, refusing names the chart already renders (a second entry would silently win). */}}
{{- define "queue-worker.extraEnv" -}}
{{- $rendered := list }}
{{- range (include "queue-worker.env" . | fromYamlArray) }}
{{- $rendered = append $rendered .name }}
{{- end }}
{{- $rendered = concat $rendered (list "frontdoor_listen" "frontdoor_max_body" "frontdoor_queues" "frontdoor_check_function" "secret_mount_path") }}
{{- range .Values.extraEnv }}
{{- if has .name $rendered }}
{{- fail (printf "extraEnv: %s is rendered by the chart; set its value instead (see the chart's README)" .name) }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* True when any NATS Secret is set, so the projected volume is mounted. */}}
{{- define "queue-worker.natsSecrets" -}}
{{- $a := .Values.nats.auth }}
{{- $t := .Values.nats.tls -}}
{{- if or $a.passwordSecret.name $a.tokenSecret.name $a.credsSecret.name $a.nkeySecret.name $t.caSecret.name $t.clientSecret.name }}true{{ end }}
{{- end }}

{{/* One read-only projected volume with every NATS Secret, under fixed file names. */}}
{{- define "queue-worker.natsVolume" -}}
{{- $a := .Values.nats.auth }}
{{- $t := .Values.nats.tls -}}
- name: nats-secrets
  projected:
    defaultMode: 0444
    sources:
    {{- if $a.passwordSecret.name }}
      - secret:
          name: {{ $a.passwordSecret.name }}
          items:
            - key: {{ $a.passwordSecret.key }}
              path: password
    {{- end }}
    {{- if $a.tokenSecret.name }}
      - secret:
          name: {{ $a.tokenSecret.name }}
          items:
            - key: {{ $a.tokenSecret.key }}
              path: token
    {{- end }}
    {{- if $a.credsSecret.name }}
      - secret:
          name: {{ $a.credsSecret.name }}
          items:
            - key: {{ $a.credsSecret.key }}
              path: nats.creds
    {{- end }}
    {{- if $a.nkeySecret.name }}
      - secret:
          name: {{ $a.nkeySecret.name }}
          items:
            - key: {{ $a.nkeySecret.key }}
              path: nkey
    {{- end }}
    {{- if $t.caSecret.name }}
      - secret:
          name: {{ $t.caSecret.name }}
          items:
            - key: {{ $t.caSecret.key }}
              path: ca.crt
    {{- end }}
    {{- if $t.clientSecret.name }}
      - secret:
          name: {{ $t.clientSecret.name }}
          items:
            - key: tls.crt
              path: tls.crt
            - key: tls.key
              path: tls.key
    {{- end }}
{{- end }}

{{/* A PodDisruptionBudget's limit: exactly one of minAvailable and maxUnavailable. */}}
{{- define "queue-worker.pdbLimit" -}}
{{- $min := include "queue-worker.str" .minAvailable }}
{{- $max := include "queue-worker.str" .maxUnavailable }}
{{- if and (ne $min "") (ne $max "") }}
{{- fail (printf "%s: set one of minAvailable and maxUnavailable, not both" .path) }}
{{- else if ne $min "" }}
minAvailable: {{ if regexMatch "^[0-9]+$" $min }}{{ $min | int }}{{ else }}{{ $min | quote }}{{ end }}
{{- else if ne $max "" }}
maxUnavailable: {{ if regexMatch "^[0-9]+$" $max }}{{ $max | int }}{{ else }}{{ $max | quote }}{{ end }}
{{- else }}
{{- fail (printf "%s: set minAvailable or maxUnavailable" .path) }}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by the worker and the front door. */}}
{{- define "queue-worker.podSecurity" -}}
# Neither talks to the Kubernetes API.
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "queue-worker.podScheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Probes and the container's security context, shared by both containers. */}}
{{- define "queue-worker.containerChecks" -}}
{{- with .Values.livenessProbe }}
livenessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.readinessProbe }}
readinessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Values the worker would refuse at start-up (exit code 2, CrashLoopBackOff), refused here
instead with the same reason.
*/}}
{{- define "queue-worker.validate" -}}
{{- if not (has (include "queue-worker.str" .Values.queuePartitions) (list "" "1")) }}
{{- fail (printf "queuePartitions: %v is not supported yet; only 1" .Values.queuePartitions) }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "metrics: enable serviceMonitor or podMonitor, not both: every series would be scraped twice and the dashboard's sums would double" }}
{{- end }}
{{- if and .Values.frontdoor.enabled (eq (include "queue-worker.str" .Values.metrics.port) (include "queue-worker.str" .Values.frontdoor.service.port)) }}
{{- fail (printf "frontdoor.service.port: %v is also metrics.port; the front door needs both" .Values.metrics.port) }}
{{- end }}
{{- if not (has (include "queue-worker.str" .Values.partition) (list "" "0")) }}
{{- fail (printf "partition: %v is not supported yet; only 0" .Values.partition) }}
{{- end }}
{{- end }}

{{/*
Pod annotations: the Prometheus scrape pair OpenFaaS's chart sets, under podAnnotations
(which may replace them, e.g. prometheus.io/scrape: "false" when a monitor scrapes instead).
*/}}
{{- define "queue-worker.podAnnotations" -}}
{{- $scrape := dict "prometheus.io/scrape" "true" "prometheus.io/port" (include "queue-worker.str" .Values.metrics.port) }}
{{- toYaml (merge (deepCopy (default dict .Values.podAnnotations)) $scrape) }}
{{- end }}
