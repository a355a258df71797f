#!/usr/bin/env bash
# Create a kind cluster, build and load the image, install the operator with kustomize.
# Usage: e2e/setup.sh            (needs docker, kind, kubectl)
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=piggyback-e2e
IMAGE=ghcr.io/piggyback-dev/piggyback:e2e

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "e2e/setup.sh: $tool is required" >&2; exit 2; }
done

kind get clusters | grep -qx "$CLUSTER" || kind create cluster --config e2e/kind-config.yaml
docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

# Fake GPU capacity on the worker (a device plugin would advertise it on a real GPU node).
WORKER=$(kubectl get nodes -l piggyback.dev/e2e-gpu=true -o jsonpath='{.items[0].metadata.name}')
kubectl proxy --port=8089 >/dev/null 2>&1 &
PROXY=$!
trap 'kill $PROXY' EXIT
sleep 1
curl -fsS -H 'Content-Type: application/json-patch+json' -X PATCH \
  "http://127.0.0.1:8089/api/v1/nodes/$WORKER/status" \
  --data '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"2"}]' >/dev/null

# Install with the e2e image for the operator and for the runtimes it creates.
TMP=$(mktemp -d)
cat >"$TMP/kustomization.yaml" <<KUST
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(pwd)/manifests/base
images:
  - name: ghcr.io/piggyback-dev/piggyback
    newTag: e2e
patches:
  - target: {kind: Deployment, name: piggyback-operator}
    patch: |-
      - op: replace
        path: /spec/template/spec/containers/0/env/0/value
        value: $IMAGE
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
