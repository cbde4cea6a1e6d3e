{{/* SPDX-License-Identifier: Apache-2.0 */}}

{{/* Labels on every object's metadata. Selectors and pod template labels use
     only "power-dra-driver.selectorLabels", so they stay the same across
     upgrades and equal to the kustomize manifests. */}}
{{- define "power-dra-driver.labels" -}}
app.kubernetes.io/name: power-dra-driver
app.kubernetes.io/part-of: power-dra-driver
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "power-dra-driver.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* "true" when the OpenShift objects are wanted. */}}
{{- define "power-dra-driver.openshift" -}}
{{- if eq (toString .Values.openshift) "auto" -}}
{{- .Capabilities.APIVersions.Has "security.openshift.io/v1" -}}
{{- else -}}
{{- toString .Values.openshift -}}
{{- end -}}
{{- end -}}

{{/* The newest resource.k8s.io version the cluster serves DeviceClasses in
     (v1 from Kubernetes 1.34, v1beta2 in 1.33, v1beta1 in 1.32). */}}
{{- /*
The newest resource.k8s.io version the target release serves: v1 from 1.34,
v1beta2 on 1.33, v1beta1 on 1.32. Both the release and the API list must
agree: `helm template` offers a fixed API list (which has v1) whatever
--kube-version says, while a live install sees the server's own list.
*/ -}}
{{- define "power-dra-driver.resourceApiVersion" -}}
{{- $kube := .Capabilities.KubeVersion.Version -}}
{{- if and (.Capabilities.APIVersions.Has "resource.k8s.io/v1") (semverCompare ">=1.34.0-0" $kube) -}}
resource.k8s.io/v1
{{- else if and (.Capabilities.APIVersions.Has "resource.k8s.io/v1beta2") (semverCompare ">=1.33.0-0" $kube) -}}
resource.k8s.io/v1beta2
{{- else -}}
resource.k8s.io/v1beta1
{{- end -}}
{{- end }}

{{- define "power-dra-driver.pluginServiceAccount" -}}power-dra-kubeletplugin{{- end -}}
{{- define "power-dra-driver.controllerServiceAccount" -}}power-dra-controller{{- end -}}
