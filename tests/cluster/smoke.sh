#!/usr/bin/env bash
# Smoke test for the `kube` multi-call binary: brings up a real control plane
# (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) on
# 127.0.0.1 only, then with curl + a static bearer token checks that
#   - PodSecurity admission is active (privileged pod rejected under baseline),
#   - the Job controller creates a Pod for a Job,
#   - the scheduler marks that Pod Unschedulable (there are no nodes).
# Everything is stopped and removed on exit, success or failure.
#
# Usage: tests/cluster/smoke.sh KUBE_BINARY
# Env:   KEEP_SMOKE_DIR=1   keep the work dir (certs, logs, data) for debugging
# Needs: openssl, curl, jq, python3 (free ports).
set -euo pipefail

KUBE=${1:?usage: smoke.sh KUBE_BINARY}
case "$KUBE" in /*) ;; *) KUBE="$PWD/$KUBE" ;; esac
[ -x "$KUBE" ] || { echo "smoke: $KUBE is not executable" >&2; exit 1; }
for tool in openssl curl jq python3; do
  command -v "$tool" >/dev/null || { echo "smoke: $tool not found" >&2; exit 1; }
done

T0=$(date +%s%N)
elapsed() { local ms=$(( ($(date +%s%N) - $1) / 1000000 )); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }
log() { echo "[smoke +$(elapsed "$T0")s] $*"; }

DIR=$(mktemp -d "${TMPDIR:-/tmp}/kube-smoke.XXXXXX")
PIDS=()
OK=0

cleanup() {
  local rc=$?
  set +e
  if [ "$OK" != 1 ]; then
    echo "smoke: FAILED (rc=$rc); last log lines:" >&2
    for f in "$DIR"/*.log; do
      [ -f "$f" ] || continue
      echo "---- $f" >&2
      tail -n 25 "$f" | grep -v '^[-.+*]*$' >&2  # (drop openssl key-generation dots)
    done
  fi
  # Stop one at a time in reverse start order (etcd last, so the apiserver
  # doesn't spew etcd reconnect errors): SIGTERM, SIGKILL after 15s.
  local i pid
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do
    pid=${PIDS[i]}
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  cd /
  if [ -n "${KEEP_SMOKE_DIR:-}" ]; then
    echo "smoke: kept $DIR" >&2
  else
    rm -rf "$DIR"
  fi
  [ "$OK" = 1 ] && log "PASS (total $(elapsed "$T0")s)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() { echo "smoke: $*" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_for SECONDS DESCRIPTION COMMAND... : retry COMMAND every 0.5s.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    for pid in "${PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null || fail "a component (pid $pid) exited while waiting for $what"
    done
    [ "$(date +%s)" -lt "$deadline" ] || fail "timed out after ${secs}s waiting for $what"
    sleep 0.5
  done
}

# ---------------------------------------------------------------- certs
log "work dir $DIR"
cd "$DIR"
PKI=$DIR/pki
mkdir -p "$PKI"
SERVICE_CIDR=10.0.0.0/24
SERVICE_IP=10.0.0.1   # first IP of SERVICE_CIDR: the "kubernetes" Service

ossl() { openssl "$@" 2>>"$DIR/openssl.log"; }

ossl req -x509 -newkey rsa:2048 -nodes -days 2 -sha256 \
  -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -subj "/CN=kube-smoke-ca" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign"

# sign NAME SUBJECT EXTENSIONS
sign() {
  local name=$1 subj=$2 ext=$3
  ossl req -new -newkey rsa:2048 -nodes -keyout "$PKI/$name.key" -out "$PKI/$name.csr" -subj "$subj"
  printf '%s\n' "$ext" > "$PKI/$name.ext"
  ossl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 2 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt"
}
sign apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
sign admin "/O=system:masters/CN=kube-smoke-admin" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"

# Service-account token signing key pair.
ossl genrsa -out "$PKI/sa.key" 2048
ossl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"

# Static token: token,user,uid,"group1,group2"
TOKEN=$(openssl rand -hex 24)
echo "$TOKEN,kube-smoke-token-admin,kube-smoke-token-admin,\"system:masters\"" > "$PKI/tokens.csv"
chmod 600 "$PKI"/*.key "$PKI/tokens.csv"
log "certs ready"

# ---------------------------------------------------------------- etcd
ETCD_PORT=$(free_port)
ETCD_PEER_PORT=$(free_port)
"$KUBE" etcd --name smoke --data-dir "$DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --unsafe-no-fsync >"$DIR/etcd.log" 2>&1 &
PIDS+=($!)
wait_for 60 "etcd /health" curl -fsS "http://127.0.0.1:$ETCD_PORT/health"
log "etcd ready on 127.0.0.1:$ETCD_PORT"

# ---------------------------------------------------------------- kube-apiserver
API_PORT=$(free_port)
SERVER=https://127.0.0.1:$API_PORT
T_API=$(date +%s%N)
"$KUBE" kube-apiserver \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --secure-port="$API_PORT" \
  --tls-cert-file="$PKI/apiserver.crt" \
  --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" \
  --token-auth-file="$PKI/tokens.csv" \
  --authorization-mode=Node,RBAC \
  --enable-admission-plugins=NodeRestriction,PodSecurity \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.pub" \
  --service-account-signing-key-file="$PKI/sa.key" \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --endpoint-reconciler-type=none \
  --allow-privileged=true \
  --cert-dir="$DIR/apiserver-certs" \
  >"$DIR/kube-apiserver.log" 2>&1 &
PIDS+=($!)

CURL=(curl -fsS --cacert "$PKI/ca.crt" -H "Authorization: Bearer $TOKEN")
wait_for 180 "kube-apiserver /readyz" "${CURL[@]}" "$SERVER/readyz"
API_READY_S=$(elapsed "$T_API")
log "kube-apiserver ready on $SERVER after ${API_READY_S}s"

# Admin kubeconfig (client certificate, O=system:masters) for KCM/scheduler.
KUBECONFIG_FILE=$DIR/admin.kubeconfig
cat >"$KUBECONFIG_FILE" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: smoke
  cluster:
    server: $SERVER
    certificate-authority: $PKI/ca.crt
users:
- name: admin
  user:
    client-certificate: $PKI/admin.crt
    client-key: $PKI/admin.key
contexts:
- name: smoke
  context: {cluster: smoke, user: admin}
current-context: smoke
EOF

# ---------------------------------------------------------------- controller-manager, scheduler
KCM_PORT=$(free_port)
"$KUBE" kube-controller-manager \
  --kubeconfig="$KUBECONFIG_FILE" \
  --authentication-kubeconfig="$KUBECONFIG_FILE" \
  --authorization-kubeconfig="$KUBECONFIG_FILE" \
  --bind-address=127.0.0.1 \
  --secure-port="$KCM_PORT" \
  --leader-elect=false \
  --controllers='*' \
  --use-service-account-credentials=true \
  --service-account-private-key-file="$PKI/sa.key" \
  --root-ca-file="$PKI/ca.crt" \
  --cluster-signing-cert-file="$PKI/ca.crt" \
  --cluster-signing-key-file="$PKI/ca.key" \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  >"$DIR/kube-controller-manager.log" 2>&1 &
PIDS+=($!)

SCHED_PORT=$(free_port)
"$KUBE" kube-scheduler \
  --kubeconfig="$KUBECONFIG_FILE" \
  --authentication-kubeconfig="$KUBECONFIG_FILE" \
  --authorization-kubeconfig="$KUBECONFIG_FILE" \
  --bind-address=127.0.0.1 \
  --secure-port="$SCHED_PORT" \
  --leader-elect=false \
  >"$DIR/kube-scheduler.log" 2>&1 &
PIDS+=($!)

wait_for 120 "kube-controller-manager /healthz" curl -kfsS "https://127.0.0.1:$KCM_PORT/healthz"
log "kube-controller-manager healthy on 127.0.0.1:$KCM_PORT"
wait_for 120 "kube-scheduler /healthz" curl -kfsS "https://127.0.0.1:$SCHED_PORT/healthz"
log "kube-scheduler healthy on 127.0.0.1:$SCHED_PORT"

# ---------------------------------------------------------------- checks
api() { # METHOD PATH [JSON-BODY]
  local method=$1 path=$2
  if [ $# -ge 3 ]; then
    "${CURL[@]}" -X "$method" -H 'Content-Type: application/json' --data-binary "$3" "$SERVER$path"
  else
    "${CURL[@]}" -X "$method" "$SERVER$path"
  fi
}

NS=smoke
api POST /api/v1/namespaces "$(jq -nc --arg ns "$NS" '{
  apiVersion: "v1", kind: "Namespace",
  metadata: {name: $ns, labels: {"pod-security.kubernetes.io/enforce": "baseline"}}}')" >/dev/null
log "namespace $NS created (PodSecurity enforce=baseline)"

# The ServiceAccount admission plugin needs the namespace's default SA,
# which the controller manager's serviceaccount controller creates.
wait_for 60 "default ServiceAccount in $NS" api GET "/api/v1/namespaces/$NS/serviceaccounts/default"
log "default ServiceAccount exists"

# PodSecurity admission must reject a privileged pod (server-side dry run).
code=$(curl -sS -o "$DIR/psa.json" -w '%{http_code}' --cacert "$PKI/ca.crt" -H "Authorization: Bearer $TOKEN" \
  -X POST -H 'Content-Type: application/json' "$SERVER/api/v1/namespaces/$NS/pods?dryRun=All" \
  --data-binary '{"apiVersion":"v1","kind":"Pod","metadata":{"name":"priv"},"spec":{"containers":[{"name":"c","image":"busybox","securityContext":{"privileged":true}}]}}')
[ "$code" = 403 ] && grep -q 'violates PodSecurity' "$DIR/psa.json" \
  || fail "privileged pod was not rejected by PodSecurity (HTTP $code): $(cat "$DIR/psa.json")"
log "PodSecurity rejected a privileged pod (HTTP 403)"

api POST "/apis/batch/v1/namespaces/$NS/jobs" '{
  "apiVersion": "batch/v1", "kind": "Job",
  "metadata": {"name": "hello"},
  "spec": {"backoffLimit": 0, "template": {"spec": {
    "restartPolicy": "Never",
    "containers": [{"name": "hello", "image": "busybox", "command": ["echo", "hello"]}]}}}}' >/dev/null
log "job $NS/hello created"

job_pod_name() {
  api GET "/api/v1/namespaces/$NS/pods?labelSelector=job-name%3Dhello" | jq -er '.items[0].metadata.name'
}
wait_for 60 "a Pod created by the Job controller" job_pod_name
POD=$(job_pod_name)
log "job controller created pod $POD"

pod_unschedulable() {
  api GET "/api/v1/namespaces/$NS/pods/$POD" | jq -e '
    .status.conditions[]? | select(.type == "PodScheduled" and .status == "False" and .reason == "Unschedulable")'
}
wait_for 60 "PodScheduled=False/Unschedulable on $POD" pod_unschedulable
MSG=$(api GET "/api/v1/namespaces/$NS/pods/$POD" | jq -r '.status.conditions[] | select(.type == "PodScheduled") | .message')
log "scheduler marked $POD Unschedulable: $MSG"

# The kubectl sub-command (absent when built with -tags nokubectl).
if "$KUBE" kubectl version --client >/dev/null 2>&1; then
  "$KUBE" kubectl --kubeconfig "$KUBECONFIG_FILE" -n "$NS" get jobs,pods -o wide \
    || fail "kubectl get failed"
  "$KUBE" kubectl --kubeconfig "$KUBECONFIG_FILE" get service kubernetes -o name >/dev/null \
    || fail "default/kubernetes Service missing"
  log "kubectl works"
fi

echo "smoke: apiserver start->ready ${API_READY_S}s"
OK=1
