#!/usr/bin/env bash
# Create a kind cluster, build and load both images (Dockerfile targets runtime and operator), install the
# operator with kustomize, naming the e2e images through the base's `images:` entries.
# Usage: e2e/setup.sh            (needs docker, kind, kubectl)
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=piggyback-e2e
TAG=e2e
RUNTIME_IMAGE=ghcr.io/piggyback-dev/piggyback-runtime:$TAG
OPERATOR_IMAGE=ghcr.io/piggyback-dev/piggyback-operator:$TAG
ROUTER_IMAGE=ghcr.io/piggyback-dev/piggyback-router:$TAG

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "e2e/setup.sh: $tool is required" >&2; exit 2; }
done

kind get clusters | grep -qx "$CLUSTER" || kind create cluster --config e2e/kind-config.yaml
# The runtime image is CUDA-based; kind nodes have no GPU, so its pods run the CPU path of the same image.
docker build --target operator -t "$OPERATOR_IMAGE" .
docker build --target runtime -t "$RUNTIME_IMAGE" .
docker build --target router -t "$ROUTER_IMAGE" .
kind load docker-image "$OPERATOR_IMAGE" "$RUNTIME_IMAGE" "$ROUTER_IMAGE" --name "$CLUSTER"

# Fake GPU capacity on the worker (a device plugin would advertise it on a real GPU node).
WORKER=$(kubectl get nodes -l piggyback.dev/e2e-gpu=true -o jsonpath='{.items[0].metadata.name}')
kubectl proxy --port=8089 >/dev/null 2>&1 &
PROXY=$!
trap 'kill $PROXY' EXIT
sleep 1
curl -fsS -H 'Content-Type: application/json-patch+json' -X PATCH \
  "http://127.0.0.1:8089/api/v1/nodes/$WORKER/status" \
  --data '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"2"}]' >/dev/null

# Install with the e2e images: the images entries rename the operator's image, PIGGYBACK_RUNTIME_IMAGE and PIGGYBACK_ROUTER_IMAGE.
TMP=$(mktemp -d)
cat >"$TMP/kustomization.yaml" <<KUST
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(realpath --relative-to="$TMP" manifests/base)
images:
  - name: ghcr.io/piggyback-dev/piggyback-operator
    newTag: $TAG
  - name: ghcr.io/piggyback-dev/piggyback-runtime
    newTag: $TAG
  - name: ghcr.io/piggyback-dev/piggyback-router
    newTag: $TAG
patches:
  - target: {kind: Deployment, name: piggyback-operator}
    patch: |-
      - op: replace
        path: /spec/template/spec/containers/0/env/1/value
        value: "3"
      - op: replace
        path: /spec/template/spec/containers/0/env/2/value
        value: "5"
      - op: add
        path: /spec/template/spec/containers/0/imagePullPolicy
        value: IfNotPresent
KUST
kubectl apply --server-side -k "$TMP"
kubectl -n piggyback-system rollout status deployment/piggyback-operator --timeout=180s
echo "installed; run: .venv/bin/pytest e2e -q"
