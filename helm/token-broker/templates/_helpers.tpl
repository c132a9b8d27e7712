{{/* Names, labels and the values every template shares. */}}

{{- define "token-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "token-broker.fullname" -}}
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

{{- define "token-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "token-broker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "token-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: token-broker
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "token-broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "token-broker.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "token-broker.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Secret and ConfigMap names. */}}
{{- define "token-broker.encryptionKeysSecret" -}}
{{- default (printf "%s-encryption-keys" (include "token-broker.fullname" .)) .Values.store.encryptionKeys.existingSecret -}}
{{- end -}}
{{- define "token-broker.linkKeySecret" -}}
{{- default (printf "%s-link-signing-key" (include "token-broker.fullname" .)) .Values.links.signingKey.existingSecret -}}
{{- end -}}
{{- define "token-broker.tlsSecret" -}}
{{- default (printf "%s-tls" (include "token-broker.fullname" .)) .Values.grpc.tls.secretName -}}
{{- end -}}
{{- define "token-broker.callersConfigMap" -}}
{{- default (printf "%s-callers" (include "token-broker.fullname" .)) .Values.auth.existingConfigMap -}}
{{- end -}}
{{- define "token-broker.pvcName" -}}
{{- default (printf "%s-data" (include "token-broker.fullname" .)) .Values.store.sqlite.persistence.existingClaim -}}
{{- end -}}

{{/* Whether any provider's client secret comes from the values (the chart's providers Secret). */}}
{{- define "token-broker.hasInlineProviderSecrets" -}}
{{- range $name, $p := .Values.providers -}}
{{- if not $p.existingSecret -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* A duration "1h2m3s" (h, m, s only: the schema's pattern) in whole seconds. */}}
{{- define "token-broker.seconds" -}}
{{- $d := toString . -}}
{{- $h := regexFind "[0-9]+h" $d | trimSuffix "h" | default "0" | atoi -}}
{{- $m := regexFind "[0-9]+m" $d | trimSuffix "m" | default "0" | atoi -}}
{{- $s := regexFind "[0-9]+s" $d | trimSuffix "s" | default "0" | atoi -}}
{{- add (mul $h 3600) (mul $m 60) $s -}}
{{- end -}}

{{- define "token-broker.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- $c := .Values.config -}}
{{- $shutdown := default (dict) $c.shutdown -}}
{{- $refresh := default (dict) $c.refresh -}}
{{- $drain := include "token-broker.seconds" (default "5s" $shutdown.drain_delay) | atoi -}}
{{- $grace := include "token-broker.seconds" (default "20s" $shutdown.grace) | atoi -}}
{{- $provider := include "token-broker.seconds" (default "30s" $refresh.provider_timeout) | atoi -}}
{{- add .Values.preStopSleepSeconds $drain $grace $provider 5 -}}
{{- else -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{- define "token-broker.publicBaseUrl" -}}
{{- if .Values.publicBaseUrl -}}
{{- .Values.publicBaseUrl | trimSuffix "/" -}}
{{- else if and .Values.ingress.enabled .Values.ingress.host -}}
{{- printf "%s://%s" (ternary "https" "http" (gt (len .Values.ingress.tls) 0)) .Values.ingress.host -}}
{{- end -}}
{{- end -}}

{{/* The store URL; a password never goes in it (PGPASSWORD from a Secret instead). */}}
{{- define "token-broker.storeUrl" -}}
{{- if eq .Values.store.type "sqlite" -}}
sqlite:///var/lib/token-broker/tokens.db
{{- else -}}
{{- $pg := .Values.store.postgres -}}
{{- $params := dict "sslmode" $pg.sslmode -}}
{{- if $pg.caSecret.name -}}
{{- $_ := set $params "sslrootcert" "/etc/token-broker/postgres-ca/ca.crt" -}}
{{- end -}}
{{- $params = merge $params $pg.params -}}
{{- $q := list -}}
{{- range $k, $v := $params -}}
{{- $q = append $q (printf "%s=%s" (urlquery $k) (urlquery (toString $v))) -}}
{{- end -}}
{{- printf "postgres://%s@%s:%d/%s?%s" (urlquery $pg.user) $pg.host (int $pg.port) (urlquery $pg.database) (join "&" $q) -}}
{{- end -}}
{{- end -}}

{{/* The broker's configuration file: the chart's listeners, mounts and store, then config. */}}
{{- define "token-broker.configFile" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $grpc := default (dict) (get $cfg "grpc") -}}
{{- $tls := dict "cert_file" "/etc/token-broker/tls/tls.crt" "key_file" "/etc/token-broker/tls/tls.key" -}}
{{- if .Values.grpc.tls.clientCA -}}
{{- $_ := set $tls "client_ca_file" "/etc/token-broker/tls/ca.crt" -}}
{{- end -}}
{{- $_ := set $grpc "listen" "0.0.0.0:8443" -}}
{{- $_ = set $grpc "probe_listen" "0.0.0.0:8081" -}}
{{- $_ = set $grpc "tls" $tls -}}
{{- $_ = set $cfg "grpc" $grpc -}}
{{- $http := default (dict) (get $cfg "http") -}}
{{- $_ = set $http "public_listen" "0.0.0.0:8080" -}}
{{- $_ = set $http "admin_listen" "0.0.0.0:9090" -}}
{{- $_ = set $cfg "http" $http -}}
{{- $_ = set $cfg "auth" (dict "callers_file" "/etc/token-broker/callers/callers.yaml") -}}
{{- $store := dict "url" (include "token-broker.storeUrl" .) "encryption_keys_file" "/etc/token-broker/keys/encryption-keys" -}}
{{- if eq .Values.store.type "postgres" -}}
{{- $_ = set $store "pool_size" (int .Values.store.postgres.poolSize) -}}
{{- $_ = set $store "statement_timeout" .Values.store.postgres.statementTimeout -}}
{{- end -}}
{{- $_ = set $cfg "store" $store -}}
{{- $links := default (dict) (get $cfg "links") -}}
{{- $_ = set $links "signing_key_file" "/etc/token-broker/links/signing-key" -}}
{{- $_ = set $cfg "links" $links -}}
{{- with include "token-broker.publicBaseUrl" . -}}
{{- $_ = set $cfg "public_base_url" . -}}
{{- end -}}
{{- $providers := dict -}}
{{- range $name, $p := .Values.providers -}}
{{- $spec := deepCopy (default (dict) $p.settings) -}}
{{- $_ = set $spec "preset" $p.preset -}}
{{- $_ = set $spec "client_id" $p.clientId -}}
{{- $_ = set $spec "client_secret_file" (printf "/etc/token-broker/providers/%s" $name) -}}
{{- $_ = set $providers $name $spec -}}
{{- end -}}
{{- if $providers -}}
{{- $_ = set $cfg "providers" $providers -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}
