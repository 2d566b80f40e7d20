{{/* The release's name for every object of the chart (63 characters at most). */}}
{{- define "pgwarden.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pgwarden.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pgwarden.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The registry file pgwarden reads (gateway/control/targets.py), from targets.list. */}}
{{- define "pgwarden.targetsJson" -}}
{{- $targets := list -}}
{{- range .Values.targets.list -}}
{{- $t := dict "name" .name "host" .host "port" (int .port) "dbname" .dbname "user" .user
      "password_env" (.passwordEnv | default nil) "password_file" nil
      "sslmode" (.sslmode | default "prefer") "sslrootcert" (.sslrootcert | default nil)
      "labels" (.labels | default dict) "databases" (.databases | default list) -}}
{{- $targets = append $targets $t -}}
{{- end -}}
{{- dict "targets" $targets | toPrettyJson -}}
{{- end -}}

{{/*
The state directory and the shared PostgreSQL control store: the same for the gateway and
for the CLI run in its pod (init container, kubectl exec).
*/}}
{{- define "pgwarden.stateAndControlEnv" -}}
- name: PGWARDEN_STATE_DIR
  value: /var/lib/pgwarden
- name: PGWARDEN_CONTROL__STORE
  value: postgres
- name: PGWARDEN_CONTROL__POSTGRES_DSN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.control.dsnSecret.name }}
      key: {{ .Values.control.dsnSecret.key }}
{{- end -}}
