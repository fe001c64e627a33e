#!/usr/bin/env bash
# strata on a real cluster, end to end (opt-in: needs docker, kind, kubectl and the network
# to pull nginx:1.27 and busybox:1.36; never run by make test or CI, where no container
# engine runs):
#   1. create a kind cluster and build and load the strata:dev image into it;
#   2. apply deploy/overlays/kind and wait for the node plugin;
#   3. apply deploy/examples/ (all but private-registry.yaml, which needs a registry and
#      credentials of your own) and check what each shows, from inside the pods;
#   4. assert in the plugin pod that the ten replicas share one image (`strata df`, and the
#      store's records), and scrape the plugin's metrics through the API server;
#   5. optionally run the Kubernetes external-storage e2e suite against strata with
#      tests/e2e/test-driver.yaml (STRATA_E2E_SUITE=/path/to/e2e.test);
#   6. delete the cluster (STRATA_E2E_KEEP=1 keeps it for a look around).
#
#   tests/e2e/kind.sh                      # from the repository root or anywhere
#   STRATA_E2E_CLUSTER=mine STRATA_E2E_KEEP=1 tests/e2e/kind.sh
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
cluster=${STRATA_E2E_CLUSTER:-strata-e2e}
image=strata:dev
timeout=${STRATA_E2E_TIMEOUT:-300s}
ns=strata-system

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || fail "$tool is not installed"
done

cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    say "failed: the plugin's logs"
    kubectl -n "$ns" logs ds/strata-node -c strata --tail=100 || true
    kubectl get pods -A -o wide || true
  fi
  if [ "${STRATA_E2E_KEEP:-0}" = 1 ]; then
    say "keeping cluster $cluster (kind delete cluster --name $cluster)"
  else
    say "deleting cluster $cluster"
    kind delete cluster --name "$cluster" || true
  fi
  exit "$status"
}

say "cluster $cluster"
if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --wait "$timeout"
fi
trap cleanup EXIT
kubectl config use-context "kind-$cluster" >/dev/null

say "image $image"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml")
docker build -t "$image" --build-arg VERSION="$version" \
  --build-arg REVISION="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "$repo"
kind load docker-image "$image" --name "$cluster"

say "deploy/overlays/kind"
kubectl apply -k "$repo/deploy/overlays/kind"
kubectl -n "$ns" rollout status ds/strata-node --timeout="$timeout"
kubectl get csidriver strata.csi.dev

say "deploy/examples"
examples=(inline-ephemeral deployment-10-replicas pvc readonly size-limit subpath)
for e in "${examples[@]}"; do
  kubectl apply -f "$repo/deploy/examples/$e.yaml"
done
kubectl rollout status deploy/strata-ten --timeout="$timeout"
for pod in strata-inline strata-pvc strata-readonly strata-size-limit strata-subpath; do
  kubectl wait --for=condition=Ready "pod/$pod" --timeout="$timeout"
done

say "what each example shows"
kubectl exec strata-inline -- grep -q hello /site/usr/share/nginx/html/index.html ||
  fail "inline: the pod's write is not in its volume"
kubectl exec strata-pvc -- grep -q from-pvc /site/usr/share/nginx/html/index.html ||
  fail "pvc: the pod's write is not in its volume"
# grep without -q: an early exit would SIGPIPE wget and, under pipefail, fail the pipe.
kubectl exec strata-subpath -- wget -qO- http://127.0.0.1/ | grep nginx >/dev/null ||
  fail "subpath: busybox httpd does not serve nginx's page from the image"
# The containers say what happened in their logs; wait for the line rather than race it.
wait_log() {
  for _ in $(seq 60); do
    kubectl logs "$1" 2>/dev/null | grep -q "$2" && return 0
    sleep 2
  done
  fail "$1: no '$2' in its log"
}
wait_log strata-readonly "read-only as asked"
wait_log strata-size-limit "stopped at the limit"
mapfile -t pages < <(kubectl get pods -l app=strata-ten -o name)
[ "${#pages[@]}" -eq 10 ] || fail "expected 10 replicas, got ${#pages[@]}"
for p in "${pages[@]}"; do
  own=$(kubectl exec "$p" -- cat /site/usr/share/nginx/html/index.html)
  [ "$own" = "$(kubectl exec "$p" -- hostname)" ] || fail "$p sees another pod's write"
done

say "one image for ten pods, in the plugin pod"
# All pods on one node (kind's default single node): its plugin holds them all.
plugin=$(kubectl -n "$ns" get pods -l app.kubernetes.io/component=node -o name | head -1)
kubectl -n "$ns" exec "$plugin" -c strata -- strata df
kubectl -n "$ns" exec "$plugin" -c strata -- strata ls
kubectl -n "$ns" exec -i "$plugin" -c strata -- python - <<'EOF'
import collections, os
from csi.store.state import State
state = State(os.path.join(os.environ["STRATA_ROOT"], "state.db"), migrate=False)
with state.read() as tx:
    pubs = tx.publications()
    images = [i for i in tx.images() if i.name == "docker.io/library/nginx:1.27"]
ten = [p for p in pubs if p.pod_name.startswith("strata-ten-")]
assert len(ten) == 10, f"{len(ten)} publications of the replicas"
assert len({p.manifest_digest for p in ten}) == 1, "the replicas use more than one image"
assert len(images) == 1, f"{len(images)} records of nginx:1.27"
assert len({p.key for p in ten}) == 10, "the replicas share a writable layer"
print("ten replicas:", collections.Counter(p.manifest_digest[:19] for p in ten))
EOF

say "metrics through the API server"
name=${plugin#pod/}
metrics=$(kubectl get --raw "/api/v1/namespaces/$ns/pods/$name:9808/proxy/metrics")
grep -E '^strata_(publications|sharing_saved_bytes) ' <<<"$metrics" ||
  fail "no strata_publications in the plugin's metrics"

if [ -n "${STRATA_E2E_SUITE:-}" ]; then
  say "Kubernetes external-storage e2e suite"
  "$STRATA_E2E_SUITE" -ginkgo.focus='External.Storage.*strata.csi.dev' \
    -ginkgo.skip='Disruptive|Serial' \
    -storage.testdriver="$repo/tests/e2e/test-driver.yaml" \
    -kubeconfig="${KUBECONFIG:-$HOME/.kube/config}"
fi

say "cleaning up the examples"
for e in "${examples[@]}"; do
  kubectl delete -f "$repo/deploy/examples/$e.yaml" --wait=true --timeout="$timeout"
done
say "ok"
