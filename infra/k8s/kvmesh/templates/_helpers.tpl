{{/* Names, labels and the endpoints every component shares. */}}

{{- define "kvmesh.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name: the release name, or release-chart when they differ. */}}
{{- define "kvmesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A component's resource name: fullname-<component in kebab case>. Args: dict root, name. */}}
{{- define "kvmesh.componentName" -}}
{{- printf "%s-%s" (include "kvmesh.fullname" .root) (kebabcase .name) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kvmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvmesh
{{- end -}}

{{/* Selector labels of one component. Args: dict root, name. */}}
{{- define "kvmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvmesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ kebabcase .name }}
{{- end -}}

{{/* NATS: the bundled server's Service (templates/nats.yaml) or externalNats.url. */}}
{{- define "kvmesh.natsUrl" -}}
{{- if .Values.nats.enabled -}}
nats://{{ include "kvmesh.componentName" (dict "root" . "name" "nats") }}:4222
{{- else -}}
{{- required "externalNats.url is required when nats.enabled=false" .Values.externalNats.url -}}
{{- end -}}
{{- end -}}

{{/* Redis: the bundled server's Service (templates/redis.yaml) or externalRedis.url. */}}
{{- define "kvmesh.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "kvmesh.componentName" (dict "root" . "name" "redis") }}:6379
{{- else -}}
{{- required "externalRedis.url is required when redis.enabled=false" .Values.externalRedis.url -}}
{{- end -}}
{{- end -}}

{{- define "kvmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvmesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The port a component serves /health and /metrics on. Args: dict root, component. */}}
{{- define "kvmesh.probePort" -}}
{{- default .root.Values.metricsPort .component.port -}}
{{- end -}}
