#!/usr/bin/env bash
# Builds the e2e node's images as OCI layout tars in OUTDIR, from this machine: nothing is
# pulled. pause.tar (localhost/pause:e2e, the static pause of pause.c, also the node
# namespace's PID 1 as OUTDIR/pause) and standin.tar (localhost/standin:e2e, the users'
# stand-in: busybox-static with its applets and an /etc/passwd).
# Usage: images.sh OUTDIR        Needs: gcc with a static libc, busybox-static, python3.
set -euo pipefail
out=${1:?usage: images.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
work=$(mktemp -d "$out/rootfs.XXXXXX")
trap 'rm -rf "$work"' EXIT

gcc -static -Os -s -o "$out/pause" "$here/pause.c"
mkdir -p "$work/pause"
cp "$out/pause" "$work/pause/pause"
python3 "$here/mkimg.py" "$out/pause.tar" localhost/pause:e2e "$work/pause" --entrypoint '["/pause"]'

busybox=$(command -v busybox)
file -L "$busybox" | grep -q 'statically linked' || { echo "images.sh: $busybox is not static (apt install busybox-static)" >&2; exit 1; }
root=$work/standin
mkdir -p "$root/bin" "$root/etc" "$root/tmp"
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
python3 "$here/mkimg.py" "$out/standin.tar" localhost/standin:e2e "$root" --cmd '["/bin/sh"]'
