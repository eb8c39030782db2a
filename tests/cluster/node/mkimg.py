#!/usr/bin/env python3
"""Writes an OCI image layout as a tar that `ctr images import` takes: one uncompressed
layer holding ROOTFS, named NAME (the io.containerd.image.name annotation), so that no
registry and no image builder is needed.

usage: mkimg.py OUT.tar NAME ROOTFS [--entrypoint JSON] [--cmd JSON] [--user U] [--env K=V]...
"""
import argparse, hashlib, io, json, os, tarfile


def blob(tar, data, media):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo("blobs/sha256/" + digest.split(":")[1])
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return {"mediaType": media, "digest": digest, "size": len(data)}


def layer(rootfs):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name in sorted(os.listdir(rootfs)):
            t.add(os.path.join(rootfs, name), arcname=name, filter=owned_by_root)
    return out.getvalue()


def owned_by_root(info):
    # Reproducible and independent of who built the rootfs.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("name")
    p.add_argument("rootfs")
    p.add_argument("--entrypoint", type=json.loads)
    p.add_argument("--cmd", type=json.loads)
    p.add_argument("--user")
    p.add_argument("--env", action="append", default=[])
    a = p.parse_args()
    data = layer(a.rootfs)
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    config = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + a.env}
    for key, value in (("Entrypoint", a.entrypoint), ("Cmd", a.cmd), ("User", a.user)):
        if value is not None:
            config[key] = value
    with tarfile.open(a.out, "w") as tar:
        lay = blob(tar, data, "application/vnd.oci.image.layer.v1.tar")
        cfg = blob(tar, json.dumps({
            "architecture": "amd64", "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }).encode(), "application/vnd.oci.image.config.v1+json")
        man = blob(tar, json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": cfg, "layers": [lay],
        }).encode(), "application/vnd.oci.image.manifest.v1+json")
        man["annotations"] = {"io.containerd.image.name": a.name,
                              "org.opencontainers.image.ref.name": a.name.rsplit(":", 1)[-1]}
        for path, doc in (("oci-layout", {"imageLayoutVersion": "1.0.0"}),
                          ("index.json", {"schemaVersion": 2, "manifests": [man]})):
            raw = json.dumps(doc).encode()
            info = tarfile.TarInfo(path)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


if __name__ == "__main__":
    main()
