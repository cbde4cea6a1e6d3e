# SPDX-License-Identifier: Apache-2.0
# OLM bundle image of the driver (registry+v1 format):
#   podman build -f bundle.Dockerfile -t power-dra-driver-bundle:0.1.0 manifests/olm
# The labels repeat metadata/annotations.yaml, as OLM reads either.
FROM scratch

LABEL operators.operatorframework.io.bundle.mediatype.v1=registry+v1
LABEL operators.operatorframework.io.bundle.manifests.v1=manifests/
LABEL operators.operatorframework.io.bundle.metadata.v1=metadata/
LABEL operators.operatorframework.io.bundle.package.v1=power-dra-driver
LABEL operators.operatorframework.io.bundle.channels.v1=alpha
LABEL operators.operatorframework.io.bundle.channel.default.v1=alpha
LABEL com.redhat.openshift.versions=v4.19
LABEL org.opencontainers.image.title=power-dra-driver-bundle
LABEL org.opencontainers.image.licenses=Apache-2.0

COPY manifests /manifests/
COPY metadata /metadata/
