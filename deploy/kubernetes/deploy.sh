#!/usr/bin/env bash
# Deploy strata's node plugin. Override images with STRATA_IMAGE=..., e.g. for kind:
#   docker build -t strata:dev . && kind load docker-image strata:dev && deploy/kubernetes/deploy.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
image=${STRATA_IMAGE:-strata:dev}
kubectl apply -f "$here/csidriver.yaml"
sed "s|image: strata:dev|image: ${image}|" "$here/node.yaml" | kubectl apply -f -
kubectl -n strata-system rollout status daemonset/strata-node --timeout=120s
