{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "unclip.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name; RayService names become pod name prefixes, so keep it short. */}}
{{- define "unclip.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "unclip.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades. */}}
{{- define "unclip.selectorLabels" -}}
app.kubernetes.io/name: {{ include "unclip.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels. Call with (dict "ctx" $ "component" "name"). */}}
{{- define "unclip.labels" -}}
{{- $ctx := .ctx -}}
helm.sh/chart: {{ include "unclip.chart" $ctx }}
{{ include "unclip.selectorLabels" $ctx }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: unclip
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "unclip.componentSelector" -}}
{{ include "unclip.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "unclip.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "unclip.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "unclip.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "unclip.gatewayServiceName" -}}
{{- printf "%s-gateway" (include "unclip.fullname" .) }}
{{- end }}

{{- define "unclip.gatewayTlsSecretName" -}}
{{- default (printf "%s-gateway-tls" (include "unclip.fullname" .)) .Values.gateway.tls.secretName }}
{{- end }}

{{/* With gateway.tls: a worker's readiness probe, replacing the one KubeRay injects, which asks
     the Serve proxy for /-/healthz over plain HTTP and so would never pass against HTTPS. The
     same checks, the raylet's (dashboard agent) and the proxy's, the latter over HTTPS; the
     certificate names the public host, not localhost, so it is not verified here. */}}
{{- define "unclip.workerReadinessProbe" -}}
{{- if .Values.gateway.tls.enabled }}
readinessProbe:
  exec:
    command:
      - bash
      - -c
      - >-
        wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success &&
        wget --tries 1 -T 2 -q -O- --no-check-certificate https://localhost:{{ .Values.serve.httpPort }}/-/healthz | grep success
  initialDelaySeconds: 10
  periodSeconds: 5
  timeoutSeconds: 2
  successThreshold: 1
  failureThreshold: 1                # as KubeRay's: a worker whose proxy fails leaves the Service at once
{{- end }}
{{- end }}

{{- define "unclip.s3ServiceName" -}}
{{- printf "%s-s3" (include "unclip.fullname" .) }}
{{- end }}

{{- define "unclip.s3SecretName" -}}
{{- default (printf "%s-s3" (include "unclip.fullname" .)) .Values.s3.existingSecret }}
{{- end }}

{{/* host:port the gateway uses for S3. */}}
{{- define "unclip.s3Endpoint" -}}
{{- if .Values.s3.internal.enabled }}
{{- printf "%s.%s.svc:%d" (include "unclip.s3ServiceName" .) .Release.Namespace (int .Values.s3.internal.port) }}
{{- else }}
{{- required "s3.external.endpoint is required when s3.internal.enabled is false" .Values.s3.external.endpoint }}
{{- end }}
{{- end }}

{{/* The Ray Serve config (ServeDeploySchema) as a dict, rendered into serveConfigV2. */}}
{{- define "unclip.serveConfig" -}}
{{- $serve := .Values.serve }}
{{- $http := dict "host" "0.0.0.0" "port" (int $serve.httpPort) }}
{{- if .Values.gateway.tls.enabled }}
{{- $_ := set $http "ssl_certfile" (printf "%s/tls.crt" .Values.gateway.tls.mountPath) }}
{{- $_ := set $http "ssl_keyfile" (printf "%s/tls.key" .Values.gateway.tls.mountPath) }}
{{- end }}
{{- $grpc := dict "port" (int $serve.grpcPort) "grpc_servicer_functions" $serve.grpcServicerFunctions }}
{{- if $serve.grpcRequestTimeoutSeconds }}
{{- $_ := set $grpc "request_timeout_s" $serve.grpcRequestTimeoutSeconds }}
{{- end }}
{{- $apps := list }}
{{- range $name := keys $serve.applications | sortAlpha }}
{{- $app := get $serve.applications $name }}
{{- if $app.enabled }}
{{- $entry := dict "name" $name "import_path" $app.importPath "route_prefix" $app.routePrefix }}
{{- $args := deepCopy (default (dict) $app.args) }}
{{- if hasSuffix ":gateway_app" $app.importPath }}
{{- include "unclip.gatewayAuthArgs" (dict "ctx" $ "args" $args) }}
{{- end }}
{{- if $args }}{{- $_ := set $entry "args" $args }}{{- end }}
{{- if $app.deployments }}{{- $_ := set $entry "deployments" $app.deployments }}{{- end }}
{{- if $app.runtimeEnv }}{{- $_ := set $entry "runtime_env" $app.runtimeEnv }}{{- end }}
{{- $apps = append $apps $entry }}
{{- end }}
{{- end }}
{{- $config := dict "proxy_location" $serve.proxyLocation "http_options" $http "grpc_options" $grpc "applications" $apps }}
{{- toYaml $config }}
{{- end }}

{{/* A gateway app's API-key args (auth.*): the keys file where the Secret is mounted, and the
     per-key quota defaults. Sets them in "args"; renders nothing. */}}
{{- define "unclip.gatewayAuthArgs" -}}
{{- $auth := .ctx.Values.auth }}
{{- if $auth.existingSecret }}
{{- $_ := set .args "api_keys_file" (printf "%s/%s" $auth.mountPath $auth.secretKey) }}
{{- end }}
{{- if or $auth.imagesPerMinute $auth.maxConcurrentPerKey }}
{{- if not $auth.existingSecret }}
{{- fail "auth.imagesPerMinute and auth.maxConcurrentPerKey are per API key: set auth.existingSecret" }}
{{- end }}
{{- with $auth.imagesPerMinute }}{{- $_ := set $.args "images_per_minute" (int .) }}{{- end }}
{{- with $auth.maxConcurrentPerKey }}{{- $_ := set $.args "max_concurrent_per_key" (int .) }}{{- end }}
{{- end }}
{{- end }}

{{/* Env shared by every Ray container: the object store settings the gateway reads. */}}
{{- define "unclip.rayEnv" -}}
- name: HOME
  value: /tmp
# A pod runs several replicas: idle OpenMP threads spin briefly, then sleep (unclip/launcher.py).
- name: GOMP_SPINCOUNT
  value: "1000"
{{- if .Values.s3.enabled }}
- name: UNCLIP_S3_ENDPOINT
  value: {{ include "unclip.s3Endpoint" . | quote }}
- name: UNCLIP_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "unclip.s3SecretName" . }}
      key: accessKey
- name: UNCLIP_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "unclip.s3SecretName" . }}
      key: secretKey
- name: UNCLIP_S3_BUCKET
  value: {{ .Values.s3.bucket | quote }}
- name: UNCLIP_S3_SECURE
  value: {{ ternary "true" "false" .Values.s3.secure | quote }}
{{- if .Values.s3.publicEndpoint }}
- name: UNCLIP_S3_PUBLIC_ENDPOINT
  value: {{ .Values.s3.publicEndpoint | quote }}
{{- end }}
{{- end }}
{{- with .Values.ray.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes and mounts shared by every Ray pod. */}}
{{- define "unclip.rayVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.ray.tmpSizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.ray.shmSizeLimit }}
{{- if .Values.weights.existingClaim }}
- name: weights
  persistentVolumeClaim:
    claimName: {{ .Values.weights.existingClaim }}
    readOnly: true
{{- else if .Values.weights.s3.prefix }}
- name: weights
  emptyDir:
    sizeLimit: {{ .Values.weights.s3.sizeLimit }}
{{- end }}
{{- if .Values.auth.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ .Values.auth.existingSecret }}
    defaultMode: 0440                # hashes only, but no one else's business
{{- end }}
{{- if .Values.gateway.tls.enabled }}
- name: gateway-tls
  secret:
    secretName: {{ include "unclip.gatewayTlsSecretName" . }}
    defaultMode: 0440                # the key: owner and fsGroup (the Ray user's group) only
{{- end }}
{{- end }}

{{/* With weights.s3.prefix: an init container pulling the weights from the release's object store
     into the pod's weights emptyDir before Ray starts (`unclip weights pull`). */}}
{{- define "unclip.weightsInit" -}}
{{- if and .Values.weights.s3.prefix (not .Values.weights.existingClaim) }}
{{- if not .Values.s3.enabled }}
{{- fail "weights.s3.prefix pulls from the release's object store: set s3.enabled (internal or external)" }}
{{- end }}
initContainers:
  - name: pull-weights
    image: {{ include "unclip.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command:
      - python
      - -m
      - unclip
      - weights
      - pull
      - {{ .Values.weights.mountPath | quote }}
      - --prefix
      - {{ .Values.weights.s3.prefix | quote }}
      {{- with .Values.weights.s3.bucket }}
      - --bucket
      - {{ . | quote }}
      {{- end }}
    env:
      {{- include "unclip.rayEnv" . | nindent 6 }}
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: tmp
        mountPath: /tmp
      - name: weights
        mountPath: {{ .Values.weights.mountPath }}
{{- end }}
{{- end }}

{{- define "unclip.rayVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- if .Values.weights.existingClaim }}
- name: weights
  mountPath: {{ .Values.weights.mountPath }}
  readOnly: true
  {{- with .Values.weights.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- else if .Values.weights.s3.prefix }}
- name: weights
  mountPath: {{ .Values.weights.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.auth.existingSecret }}
# A directory, not a subPath: kubelet swaps the files when the Secret changes, so keys rotate live.
- name: api-keys
  mountPath: {{ .Values.auth.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.gateway.tls.enabled }}
- name: gateway-tls
  mountPath: {{ .Values.gateway.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Container ports of a Ray node: Serve's HTTP and gRPC proxies. Names "serve" and "serve-grpc"
     are the ones KubeRay puts in its own serve Service. */}}
{{- define "unclip.servePorts" -}}
- name: serve
  containerPort: {{ .Values.serve.httpPort }}
  protocol: TCP
- name: serve-grpc
  containerPort: {{ .Values.serve.grpcPort }}
  protocol: TCP
{{- end }}

{{/* Pod spec fields common to head and workers. */}}
{{- define "unclip.rayPodCommon" -}}
serviceAccountName: {{ include "unclip.serviceAccountName" . }}
terminationGracePeriodSeconds: {{ include "unclip.terminationGracePeriod" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- include "unclip.rayVolumes" . | nindent 2 }}
{{- end }}

{{/* Labels every Ray pod of the release carries, head and workers (and no other pod): the Ray
     NetworkPolicy's selector, and what the metrics PodMonitor / Service select. */}}
{{- define "unclip.rayPodSelector" -}}
{{ include "unclip.selectorLabels" . }}
unclip.dev/serve-proxy: "true"
{{- end }}

{{/* A Ray node's rayStartParams (call with (dict "ctx" $ "params" MAP)): the group's values,
     plus metrics-export-port = metrics.port when metrics are on. KubeRay defaults the port to
     8080 too; setting it here keeps it equal to the `metrics` container port the chart declares. */}}
{{- define "unclip.rayStartParams" -}}
{{- $metrics := .ctx.Values.metrics }}
{{- $params := deepCopy (default (dict) .params) }}
{{- if $metrics.enabled }}
{{- $given := get $params "metrics-export-port" }}
{{- if and $given (ne (toString $given) (toString $metrics.port)) }}
{{- fail (printf "rayStartParams.metrics-export-port (%v) differs from metrics.port (%v): set metrics.port only" $given $metrics.port) }}
{{- end }}
{{- $_ := set $params "metrics-export-port" $metrics.port }}
{{- end }}
{{- range $k, $v := $params }}
{{ $k }}: {{ $v | toString | quote }}
{{- else }}
{}
{{- end }}
{{- end }}

{{/* The `metrics` container port of a Ray node (Ray's Prometheus endpoint). KubeRay adds one at
     8080 when a container has no port named `metrics`; declaring it keeps it at metrics.port. */}}
{{- define "unclip.metricsPort" -}}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
  protocol: TCP
{{- end }}

{{/* Seconds the longest Serve deployment drains for (Ray's default graceful_shutdown_timeout_s is 20). */}}
{{- define "unclip.drainSeconds" -}}
{{- $longest := 0 }}
{{- range $name, $app := .Values.serve.applications }}
{{- if $app.enabled }}
{{- range $app.deployments }}
{{- $longest = max $longest (int (default 20 .graceful_shutdown_timeout_s)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $longest }}
{{- end }}

{{/* A Ray container's stop: leave the Service's endpoints, then let Serve's replicas drain. */}}
{{- define "unclip.rayLifecycle" -}}
preStop:
  exec:
    command: ["/bin/sh", "-c", "sleep {{ .Values.ray.shutdown.preStopSleepSeconds }}; ray stop --grace-period {{ include "unclip.drainSeconds" . }}"]
{{- end }}

{{/* How long Kubernetes waits before it kills a stopping Ray pod: more than the drain. */}}
{{- define "unclip.terminationGracePeriod" -}}
{{- add .Values.ray.shutdown.preStopSleepSeconds (include "unclip.drainSeconds" . | int) .Values.ray.shutdown.stopMarginSeconds }}
{{- end }}
