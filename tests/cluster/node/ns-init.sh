#!/usr/bin/env bash
# Sets up the e2e node's namespaces and becomes their PID 1. Run as
#   unshare --mount --net --pid --fork --kill-child --mount-proc --propagation private \
#     ns-init.sh DIR NODE_IP/PREFIX
# Inside: loopback up, the node's address on a bridge (a `dummy` link cannot be made on
# these machines), / rshared (mount propagation for pods, seen only in here), a tmpfs on
# /run (containerd's and runc's fixed paths), /var/lib and /var/log bound to DIR (libcni's
# cache, the kubelet's log links), and copies of the sysctls the kubelet sets bound over
# /proc/sys so that its writes never reach the machine. Then DIR/ns-ready, then exec
# DIR/images/pause: when it ends, the kernel kills everything left in the namespace.
set -euo pipefail
dir=${1:?usage: ns-init.sh DIR NODE_IP/PREFIX}
addr=${2:?usage: ns-init.sh DIR NODE_IP/PREFIX}

mount --make-rshared /
ip link set lo up
ip link add node0 type bridge
ip addr add "$addr" dev node0
ip link set node0 up
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p "$dir/var/lib" "$dir/var/log" "$dir/sysctl"
mount --bind "$dir/var/lib" /var/lib
mount --bind "$dir/var/log" /var/log
for key in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops \
           kernel/keys/root_maxkeys kernel/keys/root_maxbytes; do
  copy=$dir/sysctl/${key//\//.}
  cat "/proc/sys/$key" >"$copy"
  mount --bind "$copy" "/proc/sys/$key"
done
touch "$dir/ns-ready"
exec "$dir/images/pause"
