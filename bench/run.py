#!/usr/bin/env python3
"""Transfer benchmark: `datastore` vs rclone vs azcopy against a local Azurite.

Workloads (at --scale 1):
  W1  10,000 x 16 KiB files (in 100 sub-directories)
  W2  16 x 64 MiB files
  W3  1 x 1 GiB file

Then the node cache (the CSI node plugin, `datastore csi-node`) on W1 and W2: a miss
(NodePublishVolume until mounted) against `datastore download` of the same folder, then a hit,
by the ignored test `numbers_of_a_miss_and_a_hit_against_a_download` of tests/csi.rs (release
build; it needs root for its private mount namespace). --no-node-cache skips it.

For every workload and every tool: a fresh Azurite (disk persistence in a temp dir, loopback
only, telemetry off), a fresh container, an upload of the generated data, a download of it into
a fresh empty directory, and a check that the files arrived (names, sizes, sampled contents)
and that the container holds what was uploaded. Wall time, client CPU (user+sys of the client
process and its children) and peak RSS (both via GNU time's wait4) are measured per transfer.

Only the Python standard library is used. See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS_PREFIX = REPO / ".tools"
AZURITE_BLOB = TOOLS_PREFIX / "node_modules" / ".bin" / "azurite-blob"
TIME = "/usr/bin/time"  # GNU time (Debian package `time`)
AZCOPY = TOOLS_PREFIX / "node_modules" / "@azure-tools" / "azcopy-linux" / "dist" / "bin" / "azcopy_linux_amd64"
# Pinned so that numbers from different days compare; bump deliberately.
NPM_PACKAGES = ["azurite@3.35.0", "@azure-tools/azcopy-linux@10.32.2"]

ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
SAS_VERSION = "2021-08-06"

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

ALL_TOOLS = ["ours", "rclone", "azcopy"]
PEERS = ["rclone", "azcopy"]

# Targets from the issue.
TARGET_CPU_FRACTION_OF_AZCOPY = 1 / 3
TARGET_RSS_MIB = 64
# Other processes using more than this many cores during a transfer make it unreliable.
NOISY_CORES = 0.25

# Peer settings, chosen for a fair fight on this kind of box (2 cores) and printed in the report.
# azcopy: its own defaults on <= 4 cores: 32 concurrent network operations, 8 MiB blocks,
#   1 GB buffer cap. --put-md5 so it hashes like `datastore` and rclone do (both store
#   Content-MD5); downloads then check it (--check-md5 FailIfDifferent is the default).
#   --log-level ERROR: the default INFO writes one log entry per request.
AZCOPY_UPLOAD_FLAGS = ["--recursive", "--from-to", "LocalBlob", "--put-md5", "--log-level", "ERROR",
                       "--output-type", "json"]
AZCOPY_DOWNLOAD_FLAGS = ["--recursive", "--from-to", "BlobLocal", "--log-level", "ERROR",
                         "--output-type", "json"]
# rclone: its defaults are 4 transfers and 4 MiB chunks, which would make it a strawman; these
#   match the in-flight request budget of azcopy (32) and azcopy's 8 MiB block size.
RCLONE_FLAGS = ["--transfers", "32", "--checkers", "32", "--azureblob-chunk-size", "8M",
                "--azureblob-upload-concurrency", "8", "--stats", "0", "-q"]
AZCOPY_CONCURRENCY: int | None = None  # None: azcopy's default


@dataclass
class Workload:
    name: str
    description: str
    files: list[tuple[str, int]]  # (relative path, size)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def prefix(self) -> str:
        return self.name.lower()


def make_workloads(scale: float) -> dict[str, Workload]:
    n1 = max(1, round(10_000 * scale))
    w1 = [(f"d{i // 100:03d}/f{i:05d}.bin", 16 * KIB) for i in range(n1)]
    s2 = max(1, int(64 * MIB * scale))
    w2 = [(f"f{i:02d}.bin", s2) for i in range(16)]
    s3 = max(1, int(GIB * scale))
    w3 = [("big.bin", s3)]
    return {
        "W1": Workload("W1", f"{n1} x {human(16 * KIB)}", w1),
        "W2": Workload("W2", f"16 x {human(s2)}", w2),
        "W3": Workload("W3", f"1 x {human(s3)}", w3),
    }


def human(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if abs(v - round(v)) < 0.005 else f"{v:.2f} {unit}"
    return f"{n:.0f} B"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Installing the tools (idempotent)
# --------------------------------------------------------------------------------------------

def run_quiet(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def apt_install(pkg: str) -> None:
    log(f"installing Debian package {pkg}")
    if run_quiet(["apt-get", "install", "-y", pkg], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}).returncode == 0:
        return
    run_quiet(["apt-get", "update"])
    r = run_quiet(["apt-get", "install", "-y", pkg], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if r.returncode != 0:
        sys.exit(f"apt-get install {pkg} failed:\n{r.stdout[-2000:]}")


def ensure_npm_tools(need_azcopy: bool) -> None:
    if not AZURITE_BLOB.exists() or (need_azcopy and not AZCOPY.exists()):
        if not shutil.which("npm"):
            sys.exit("npm not found: install Node.js (Debian package nodejs + npm)")
        log(f"installing {' '.join(NPM_PACKAGES)} into {TOOLS_PREFIX}")
        TOOLS_PREFIX.mkdir(parents=True, exist_ok=True)
        r = run_quiet(["npm", "install", "--prefix", str(TOOLS_PREFIX), "--no-audit", "--no-fund", *NPM_PACKAGES])
        if r.returncode != 0:
            sys.exit(f"npm install failed:\n{r.stdout[-3000:]}")
    if need_azcopy:
        # The npm package ships the binary without the executable bit.
        mode = AZCOPY.stat().st_mode
        if not mode & 0o111:
            AZCOPY.chmod(mode | 0o755)
        # This azcopy build links libsecret (used for `azcopy login`, unused here).
        ldd = run_quiet(["ldd", str(AZCOPY)]).stdout
        if "libsecret" in ldd and "not found" in ldd:
            apt_install("libsecret-1-0")


def ensure_gnu_time() -> None:
    if not Path(TIME).exists():
        apt_install("time")


def ensure_rclone() -> None:
    if not shutil.which("rclone"):
        apt_install("rclone")


def ensure_ours(binary: Path, build: bool) -> None:
    if build:
        log("cargo build --release")
        r = subprocess.run(["cargo", "build", "--release"], cwd=REPO)
        if r.returncode != 0:
            sys.exit("cargo build --release failed")
    if not binary.exists():
        sys.exit(f"binary {binary} not found (build it with `cargo build --release` or pass --binary, "
                 f"or leave `ours` out of --tools)")


def ours_defaults(binary: Path | None, tools: list[str]) -> str:
    """Our tuning defaults as --help states them, for the report."""
    if "ours" not in tools or binary is None:
        return ""
    text = run_quiet([str(binary), "upload", "--help"]).stdout
    found = [f"{flag} {m.group(1)}" for flag in ("--concurrency", "--block-size-mib")
             if (m := re.search(re.escape(flag) + r"\b.*?\[default: ([^\]]+)\]", text, re.S))]
    return f" (defaults: {', '.join(found)})" if found else " (defaults)"


def tool_version(tool: str, binary: Path) -> str:
    try:
        if tool == "rclone":
            return run_quiet(["rclone", "version"]).stdout.splitlines()[0].strip()
        if tool == "azcopy":
            return run_quiet([str(AZCOPY), "--version"]).stdout.strip()
        if tool == "ours":
            return run_quiet([str(binary), "--version"]).stdout.strip() or "unknown"
        if tool == "azurite":
            pkg = TOOLS_PREFIX / "node_modules" / "azurite" / "package.json"
            return "azurite " + json.loads(pkg.read_text())["version"]
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unknown ({e})"
    return "unknown"


# --------------------------------------------------------------------------------------------
# Azurite and the REST bits (account SAS minted here; no Azure SDK)
# --------------------------------------------------------------------------------------------

def account_sas(hours: int = 12) -> str:
    """Account SAS: blob service, service/container/object, read/add/create/write/delete/list."""
    expiry = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")
    sp, ss, srt = "racwdl", "b", "sco"
    # accountname, sp, ss, srt, st, se, sip, spr, sv, ses (sv >= 2020-12-06), each + "\n"
    string_to_sign = "\n".join([ACCOUNT, sp, ss, srt, "", expiry, "", "", SAS_VERSION, ""]) + "\n"
    sig = base64.b64encode(hmac.new(base64.b64decode(ACCOUNT_KEY), string_to_sign.encode(), hashlib.sha256).digest())
    return urllib.parse.urlencode({"sv": SAS_VERSION, "ss": ss, "srt": srt, "sp": sp, "se": expiry, "sig": sig.decode()})


NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Azurite:
    def __init__(self, workdir: Path, tag: str):
        self.location = workdir / f"azurite-{tag}"
        self.location.mkdir(parents=True)
        self.log_path = workdir / "logs" / f"azurite-{tag}.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.sas = account_sas()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    def start(self) -> None:
        for _ in range(5):
            self.port = free_port()
            logf = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [str(AZURITE_BLOB), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                 "--disableTelemetry", "--skipApiVersionCheck", "--loose", "--silent",
                 "--location", str(self.location)],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            logf.close()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        return
                except OSError:
                    time.sleep(0.1)
            self.stop()
        sys.exit(f"azurite did not start; see {self.log_path}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def cpu_seconds(self) -> float:
        """user+sys CPU of the Azurite (node) process so far."""
        if not self.proc:
            return 0.0
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.location, ignore_errors=True)

    def _request(self, method: str, path: str, query: str = "") -> bytes:
        url = f"{self.endpoint}/{path}?{query + '&' if query else ''}{self.sas}"
        req = urllib.request.Request(url, method=method, data=b"" if method == "PUT" else None,
                                     headers={"x-ms-version": SAS_VERSION})
        with NO_PROXY_OPENER.open(req, timeout=60) as r:
            return r.read()

    def create_container(self, name: str) -> None:
        self._request("PUT", name, "restype=container")

    def list_blobs(self, container: str, prefix: str) -> dict[str, tuple[int, bool]]:
        """name -> (size, has Content-MD5)."""
        out: dict[str, tuple[int, bool]] = {}
        marker = ""
        while True:
            q = urllib.parse.urlencode({"restype": "container", "comp": "list", "prefix": prefix + "/",
                                        "maxresults": "5000", **({"marker": marker} if marker else {})})
            root = ET.fromstring(self._request("GET", container, q))
            for b in root.iter("Blob"):
                props = b.find("Properties")
                md5 = props.findtext("Content-MD5") if props is not None else None
                out[b.findtext("Name")] = (int(props.findtext("Content-Length")), bool(md5))
            marker = root.findtext("NextMarker") or ""
            if not marker:
                return out


# --------------------------------------------------------------------------------------------
# Data generation and verification
# --------------------------------------------------------------------------------------------

def generate(root: Path, wl: Workload) -> Path:
    base = root / wl.prefix
    marker = root / f".{wl.prefix}.complete"  # outside the tree that gets uploaded
    if marker.exists():
        return base
    shutil.rmtree(base, ignore_errors=True)
    log(f"generating {wl.name}: {wl.description} ({human(wl.total_bytes)}) in {base}")
    rng = random.Random(f"datastore-bench-{wl.name}")  # deterministic data
    for rel, size in wl.files:
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            left = size
            while left:
                n = min(left, 8 * MIB)
                # randbytes is a fast PRNG (much faster than os.urandom); incompressible enough.
                f.write(rng.randbytes(n))
                left -= n
    marker.touch()
    return base


def tree(base: Path) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(base):
        for fn in files:
            p = Path(dirpath) / fn
            out[p.relative_to(base).as_posix()] = p.stat().st_size
    return out


def verify_download(src: Path, dst: Path, wl: Workload) -> str | None:
    """None if dst holds the same files as src (names, sizes, sampled content), else a reason."""
    if not dst.is_dir():
        return f"download directory {dst} missing"
    want, got = {rel: size for rel, size in wl.files}, tree(dst)
    if got != want:
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])[:3]
        return (f"file set differs: {len(got)} files / {sum(got.values())} B downloaded, want "
                f"{len(want)} / {sum(want.values())} B; missing {missing} extra {extra} wrong size {wrong}")
    rng = random.Random(len(want))
    for rel in rng.sample(sorted(want), min(4, len(want))):
        size = want[rel]
        windows = {0, max(0, size - 65536)} | {rng.randrange(0, max(1, size - 65536)) for _ in range(3)}
        with open(src / rel, "rb") as a, open(dst / rel, "rb") as b:
            for off in sorted(windows):
                a.seek(off)
                b.seek(off)
                if a.read(65536) != b.read(65536):
                    return f"content of {rel} differs at offset ~{off}"
    return None


def verify_upload(az: Azurite, container: str, wl: Workload) -> tuple[str | None, bool]:
    """(reason or None, every blob has Content-MD5)."""
    blobs = az.list_blobs(container, wl.prefix)
    want = {f"{wl.prefix}/{rel}": size for rel, size in wl.files}
    got = {name: size for name, (size, _) in blobs.items()}
    if got != want:
        return (f"container holds {len(got)} blobs / {sum(got.values())} B under {wl.prefix}/, want "
                f"{len(want)} / {sum(want.values())} B"), False
    return None, all(md5 for _, md5 in blobs.values())


# --------------------------------------------------------------------------------------------
# Running one transfer
# --------------------------------------------------------------------------------------------

@dataclass
class Result:
    workload: str
    direction: str
    tool: str
    ok: bool = False
    error: str | None = None
    bytes: int = 0
    files: int = 0
    wall_s: float = 0.0
    cpu_user_s: float = 0.0
    cpu_sys_s: float = 0.0
    max_rss_mib: float = 0.0
    azurite_cpu_s: float = 0.0
    # CPU used by everything else on the machine during the transfer (a noisy-neighbour check)
    other_cpu_s: float = 0.0
    content_md5_stored: bool | None = None
    rep: int = 0
    samples: list[dict] = field(default_factory=list)  # per repetition, in the aggregate
    command: list[str] = field(default_factory=list)
    log: str = ""

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_sys_s

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_s / (self.bytes / GIB) if self.bytes else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.bytes / MIB / self.wall_s if self.wall_s else 0.0

    @property
    def other_cores(self) -> float:
        return self.other_cpu_s / self.wall_s if self.wall_s else 0.0

    def sample(self) -> dict:
        return dict(rep=self.rep, ok=self.ok, error=self.error, wall_s=round(self.wall_s, 3),
                    cpu_user_s=round(self.cpu_user_s, 3), cpu_sys_s=round(self.cpu_sys_s, 3),
                    max_rss_mib=round(self.max_rss_mib, 1), azurite_cpu_s=round(self.azurite_cpu_s, 2),
                    other_cpu_s=round(self.other_cpu_s, 2))

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("rep")
        d.update(cpu_s=round(self.cpu_s, 3), cpu_s_per_gib=round(self.cpu_s_per_gib, 3),
                 mib_per_s=round(self.mib_per_s, 1))
        return d


def busy_cpu_seconds() -> float:
    """Machine-wide non-idle CPU seconds so far (all cores), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal ...; guest time is already in user
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")


QUIET = {"max_wait": 30.0, "gave_up": False}


def wait_for_quiet() -> None:
    """Wait (bounded) until other processes leave the cores alone, so they do not skew a transfer."""
    if QUIET["gave_up"] or QUIET["max_wait"] <= 0:
        return
    deadline = time.monotonic() + QUIET["max_wait"]
    said = False
    while True:
        b0 = busy_cpu_seconds()
        time.sleep(1.0)
        load = busy_cpu_seconds() - b0  # includes Azurite idling and this script: both ~0
        if load < NOISY_CORES:
            return
        if time.monotonic() > deadline:
            log(f"machine still busy ({load:.2f} cores) after {QUIET['max_wait']:.0f} s; "
                "not waiting any more in this run")
            QUIET["gave_up"] = True
            return
        if not said:
            log(f"machine busy ({load:.2f} cores used by other processes); waiting up to "
                f"{QUIET['max_wait']:.0f} s for it to calm down")
            said = True


@dataclass
class Usage:
    user_s: float
    sys_s: float
    max_rss_kib: int


def measure(cmd: list[str], env: dict, log_path: Path, timeout: float, az: Azurite
            ) -> tuple[int, float, Usage | None, float, float]:
    """Run cmd; return (exit status, wall s, CPU/RSS of it and its children, azurite CPU s, busy CPU s).

    The tool runs under GNU time rather than as a direct child of this script: Linux carries
    the RSS high-water mark of the pre-exec image (a fork of this Python process, tens of MiB)
    into the exec'd program's ru_maxrss, so os.wait4 on a direct child would report at least
    this script's RSS. time's own image is ~1 MiB, and the CPU figures are the same wait4 ones.
    """
    usage_path = log_path.with_suffix(".rusage")
    usage_path.unlink(missing_ok=True)
    cmd = [TIME, "-o", str(usage_path), "-f", "%e %U %S %M", *cmd]
    os.sync()  # do not let the previous run's dirty pages be flushed on this run's clock
    wait_for_quiet()
    az_cpu0 = az.cpu_seconds()
    busy0 = busy_cpu_seconds()
    with open(log_path, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                os.wait4(proc.pid, 0)
                status = -1
                break
            time.sleep(0.005)
        wall = time.perf_counter() - t0
    busy = busy_cpu_seconds() - busy0
    proc.returncode = 0  # reaped by wait4; keep Popen from trying again
    code = os.waitstatus_to_exitcode(status) if status != -1 else -1
    usage = None
    try:  # "Command exited with non-zero status N" may precede the figures
        _, user, sys_, rss = usage_path.read_text().strip().splitlines()[-1].split()
        usage = Usage(float(user), float(sys_), int(rss))
    except (OSError, ValueError, IndexError):
        pass
    return code, wall, usage, az.cpu_seconds() - az_cpu0, busy


def ours_datastores_file(path: Path, az: Azurite, container: str) -> None:
    path.write_text(f"""apiVersion: datastore.dev/v1alpha1
kind: Datastore
metadata: {{name: bench}}
spec:
  azureBlob:
    accountName: {ACCOUNT}
    containerName: {container}
    endpoint: {az.endpoint}
    credentials:
      secretRef: {{name: bench-creds}}
---
apiVersion: v1
kind: Secret
metadata: {{name: bench-creds}}
stringData:
  accountKey: {ACCOUNT_KEY}
""")


def build_command(tool: str, direction: str, *, binary: Path, az: Azurite, container: str,
                  src: Path, dl: Path, wl: Workload, scratch: Path) -> tuple[list[str], dict]:
    env = dict(os.environ)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"  # all traffic stays on loopback
    if tool == "ours":
        ds = scratch / f"datastores-{container}.yaml"
        ours_datastores_file(ds, az, container)
        common = ["--datastores", str(ds), "--datastore", "bench", "--no-progress", "--output", "json"]
        if direction == "upload":
            return [str(binary), "upload", *common, "--src-dir", str(src), "--target-path", wl.prefix], env
        return [str(binary), "download", *common, "--target-path", str(dl), "--prefix", wl.prefix], env
    if tool == "azcopy":
        env.update(AZCOPY_LOG_LOCATION=str(scratch / "azcopy-logs"),
                   AZCOPY_JOB_PLAN_LOCATION=str(scratch / "azcopy-plans"),
                   AZCOPY_DISABLE_SYSLOG="true")
        if AZCOPY_CONCURRENCY:
            env["AZCOPY_CONCURRENCY_VALUE"] = str(AZCOPY_CONCURRENCY)
        if direction == "upload":  # copying dir .../wN into the container root gives blobs wN/...
            return [str(AZCOPY), "copy", str(src), f"{az.endpoint}/{container}?{az.sas}", *AZCOPY_UPLOAD_FLAGS], env
        return [str(AZCOPY), "copy", f"{az.endpoint}/{container}/{wl.prefix}?{az.sas}", str(dl), *AZCOPY_DOWNLOAD_FLAGS], env
    if tool == "rclone":
        # rclone 1.60 (Debian) builds https://<account>.<endpoint> from `endpoint`, so the only
        # way to reach an http emulator on a non-default port is a SAS URL (container-level).
        env.update(RCLONE_CONFIG=str(scratch / "rclone.conf"),
                   RCLONE_CONFIG_AZ_TYPE="azureblob",
                   RCLONE_CONFIG_AZ_SAS_URL=f"{az.endpoint}/{container}?{az.sas}")
        if direction == "upload":
            return ["rclone", "copy", str(src), f"az:{container}/{wl.prefix}", *RCLONE_FLAGS], env
        return ["rclone", "copy", f"az:{container}/{wl.prefix}", str(dl / wl.prefix), *RCLONE_FLAGS], env
    raise ValueError(tool)


def check_tool_output(tool: str, log_path: Path) -> str | None:
    """Tool-reported failures that an exit code of 0 might hide."""
    if tool != "azcopy":
        return None
    end = None
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("MessageType") == "EndOfJob":
            end = json.loads(msg["MessageContent"])
    if end is None:
        return "azcopy printed no EndOfJob message"
    if end.get("JobStatus") != "Completed" or end.get("TransfersFailed") not in ("0", 0):
        return f"azcopy job {end.get('JobStatus')}, {end.get('TransfersFailed')} transfers failed"
    return None


def bench_tool(tool: str, wl: Workload, src: Path, args, workdir: Path, shared_az: Azurite | None,
               rep: int) -> list[Result]:
    tag = f"{wl.prefix}-{tool}-r{rep}"
    container = f"{tool}-{wl.prefix}-r{rep}"
    az = shared_az or Azurite(workdir, tag)
    if not shared_az:
        az.start()
    scratch = workdir / "scratch" / tag
    scratch.mkdir(parents=True, exist_ok=True)
    dl = workdir / "download" / tag
    results = []
    try:
        az.create_container(container)
        for direction in ("upload", "download"):
            r = Result(wl.name, direction, tool, bytes=wl.total_bytes, files=len(wl.files), rep=rep)
            results.append(r)
            if direction == "download":
                shutil.rmtree(dl, ignore_errors=True)
                dl.mkdir(parents=True)
            cmd, env = build_command(tool, direction, binary=args.binary, az=az, container=container,
                                     src=src, dl=dl, wl=wl, scratch=scratch)
            r.command = [c.split("?")[0] + ("?<sas>" if "?" in c else "") for c in cmd]
            log_path = workdir / "logs" / f"{tag}-{direction}.log"
            r.log = str(log_path)
            code, wall, ru, az_cpu, busy = measure(cmd, env, log_path, args.timeout, az)
            r.wall_s, r.azurite_cpu_s = wall, az_cpu
            if ru is not None:
                r.cpu_user_s, r.cpu_sys_s = ru.user_s, ru.sys_s
                r.max_rss_mib = ru.max_rss_kib / 1024
            r.other_cpu_s = max(0.0, busy - r.cpu_s - az_cpu)
            if code != 0:
                r.error = f"exit code {code}" + (" (timeout)" if code == -1 else "")
            else:
                r.error = check_tool_output(tool, log_path)
            if r.error is None:
                if direction == "upload":
                    r.error, r.content_md5_stored = verify_upload(az, container, wl)
                else:
                    r.error = verify_download(src, dl / wl.prefix, wl)
            r.ok = r.error is None
            status = "ok" if r.ok else f"FAILED: {r.error}"
            log(f"{wl.name} #{rep} {direction:8s} {tool:6s} {wall:8.2f} s {r.mib_per_s:7.1f} MiB/s  "
                f"cpu {r.cpu_s:6.2f} s  rss {r.max_rss_mib:6.1f} MiB  azurite cpu {az_cpu:6.2f} s  "
                f"other load {r.other_cores:4.2f} cores  {status}")
            if r.other_cores > NOISY_CORES:
                log(f"warning: other processes used {r.other_cores:.2f} cores during this transfer; "
                    "numbers are unreliable")
            if not r.ok:
                tail = Path(log_path).read_text(errors="replace")[-1500:]
                print(f"---- tail of {log_path} ----\n{tail}\n----", flush=True)
                if direction == "upload":
                    # download needs the upload; record it as skipped
                    results.append(Result(wl.name, "download", tool, bytes=wl.total_bytes, files=len(wl.files),
                                          rep=rep, error="skipped: upload failed"))
                    break
    finally:
        shutil.rmtree(dl, ignore_errors=True)
        if not shared_az:
            az.destroy()
    return results


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def aggregate(runs: list[Result]) -> list[Result]:
    """One Result per (workload, direction, tool): median wall and CPU, max RSS over the repetitions."""
    groups: dict[tuple, list[Result]] = {}
    for r in runs:
        groups.setdefault((r.workload, r.direction, r.tool), []).append(r)
    out = []
    for (wl, direction, tool), rs in groups.items():
        a = Result(wl, direction, tool, bytes=rs[0].bytes, files=rs[0].files, command=rs[0].command,
                   log=rs[0].log, samples=[r.sample() for r in rs])
        bad = [r for r in rs if not r.ok]
        a.ok = not bad
        a.error = bad[0].error if bad else None
        good = [r for r in rs if r.ok] or rs
        a.wall_s = median([r.wall_s for r in good])
        a.cpu_user_s = median([r.cpu_user_s for r in good])
        a.cpu_sys_s = median([r.cpu_sys_s for r in good])
        a.max_rss_mib = max(r.max_rss_mib for r in good)
        a.azurite_cpu_s = median([r.azurite_cpu_s for r in good])
        a.other_cpu_s = median([r.other_cpu_s for r in good])
        md5 = [r.content_md5_stored for r in good if r.content_md5_stored is not None]
        a.content_md5_stored = all(md5) if md5 else None
        out.append(a)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def evaluate_targets(results: list[Result]) -> list[dict]:
    by = {(r.workload, r.direction, r.tool): r for r in results}
    targets = []
    for (wl, direction, tool), r in by.items():
        if tool != "ours":
            continue
        for peer in PEERS:
            p = by.get((wl, direction, peer))
            if p is None:
                continue
            ok = r.ok and p.ok and r.wall_s < p.wall_s
            targets.append(dict(target=f"faster than {peer}", workload=wl, direction=direction, passed=ok,
                                value=round(r.wall_s / p.wall_s, 3) if r.ok and p.ok and p.wall_s else None,
                                limit="< 1.0 (wall ratio ours/peer)"))
        a = by.get((wl, direction, "azcopy"))
        if a is not None:
            frac = r.cpu_s_per_gib / a.cpu_s_per_gib if r.ok and a.ok and a.cpu_s_per_gib else None
            targets.append(dict(target="CPU-s/GiB <= 1/3 of azcopy", workload=wl, direction=direction,
                                passed=frac is not None and frac <= TARGET_CPU_FRACTION_OF_AZCOPY,
                                value=round(frac, 3) if frac is not None else None, limit="<= 0.333"))
        targets.append(dict(target=f"peak RSS <= {TARGET_RSS_MIB} MiB", workload=wl, direction=direction,
                            passed=r.ok and r.max_rss_mib <= TARGET_RSS_MIB,
                            value=round(r.max_rss_mib, 1) if r.ok else None, limit=f"<= {TARGET_RSS_MIB}"))
    return targets


def print_report(results: list[Result], workloads: dict[str, Workload], tools: list[str], targets: list[dict],
                 meta: dict) -> None:
    print()
    print(f"Benchmark: {meta['scale_note']}; {meta['cpus']} CPUs; {meta['azurite']} "
          f"(disk persistence, fresh {'per workload and repetition' if meta['shared_azurite'] else 'per tool, workload and repetition'})")
    for t in tools:
        print(f"  {t:6s} {meta['versions'].get(t, '')}")
        if t in meta["flags"]:
            print(f"         flags: {meta['flags'][t]}")
    print("  wall = process wall time; CPU = user+sys of the client and its children (wait4, via GNU time);")
    print("  RSS = peak resident set (ru_maxrss, via GNU time); ratio = ours wall / this tool's wall (< 1: ours faster);")
    print("  n = repetitions (wall, CPU: median; RSS: max); srv CPU = Azurite's CPU during the transfer")
    print("  (it shares the cores with the client); other = cores used by anything else meanwhile")
    print(f"  (> {NOISY_CORES} means a noisy machine: rerun); MD5 = every blob has Content-MD5 after upload")
    print("  (Azurite computes it itself for single-shot Put Blob, so only W2/W3 tell the tools apart).")
    by = {(r.workload, r.direction, r.tool): r for r in results}
    hdr = (f"{'workload':<22} {'dir':<8} {'tool':<6} {'n':>2} {'wall s':>8} {'MiB/s':>7} {'ratio':>6} "
           f"{'CPU s':>7} {'CPU-s/GiB':>9} {'RSS MiB':>8} {'srv CPU s':>9} {'other':>5} {'MD5':>4}  status")
    print()
    print(hdr)
    print("-" * len(hdr))
    for wname, wl in workloads.items():
        for direction in ("upload", "download"):
            ours = by.get((wname, direction, "ours"))
            for tool in tools:
                r = by.get((wname, direction, tool))
                if r is None:
                    continue
                ratio = ""
                if tool != "ours" and ours and ours.ok and r.ok and r.wall_s:
                    ratio = f"{ours.wall_s / r.wall_s:.2f}"
                md5 = "" if r.content_md5_stored is None else ("yes" if r.content_md5_stored else "no")
                label = f"{wname} {wl.description}"
                n = len(r.samples) or 1
                if r.ok or r.wall_s:
                    print(f"{label:<22} {direction:<8} {tool:<6} {n:>2} {r.wall_s:8.2f} {r.mib_per_s:7.1f} {ratio:>6} "
                          f"{r.cpu_s:7.2f} {r.cpu_s_per_gib:9.2f} {r.max_rss_mib:8.1f} {r.azurite_cpu_s:9.2f} "
                          f"{r.other_cores:5.2f} {md5:>4}  {'ok' if r.ok else 'FAILED: ' + str(r.error)}")
                else:
                    print(f"{label:<22} {direction:<8} {tool:<6} {n:>2} {'-':>8}  FAILED: {r.error}")
        print()
    if targets:
        print("Targets (ours):")
        for t in targets:
            v = "n/a" if t["value"] is None else t["value"]
            print(f"  [{'PASS' if t['passed'] else 'FAIL'}] {t['workload']} {t['direction']:<8} "
                  f"{t['target']:<28} value {v} (want {t['limit']})")
        passed = sum(t["passed"] for t in targets)
        print(f"  {passed}/{len(targets)} targets met")
    print()


# --------------------------------------------------------------------------------------------

NODE_CACHE_LINE = re.compile(
    r"^(w\d): datastore download ([\d.]+) s; miss \(publish until mounted\) ([\d.]+) s \(([\d.]+)x\); "
    r"hit ([\d.]+) s$")


def bench_node_cache(timeout: float) -> dict:
    """The node cache's numbers from tests/csi.rs's ignored numbers test, and its targets: a hit
    under one second, a miss within 10% of `datastore download` of the same data."""
    cmd = ["cargo", "test", "--release", "--test", "csi", "--", "--ignored", "--nocapture",
           "numbers_of_a_miss_and_a_hit_against_a_download"]
    log("node cache: " + " ".join(cmd))
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "rows": []}
    rows = []
    for line in out.stdout.splitlines():
        m = NODE_CACHE_LINE.match(line.strip())
        if m:
            download, miss, ratio, hit = (float(m[i]) for i in (2, 3, 4, 5))
            rows.append({"workload": m[1].upper(), "download_s": download, "miss_s": miss,
                         "miss_ratio": ratio, "hit_s": hit,
                         "hit_under_1s": hit < 1.0, "miss_within_10pct": ratio <= 1.10})
    error = None
    if out.returncode != 0 or not rows:
        error = f"exit {out.returncode}: {(out.stderr or out.stdout).strip()[-2000:]}"
    return {"error": error, "rows": rows}


def print_node_cache(node_cache: dict) -> None:
    print("Node cache (NodePublishVolume until mounted; download = `datastore download` of the same folder):")
    if node_cache.get("error"):
        print(f"  FAILED: {node_cache['error']}")
    for r in node_cache["rows"]:
        print(f"  {r['workload']}: download {r['download_s']:.2f} s; miss {r['miss_s']:.2f} s "
              f"({r['miss_ratio']:.2f}x) [{'PASS' if r['miss_within_10pct'] else 'FAIL'} within 10%]; "
              f"hit {r['hit_s']:.3f} s [{'PASS' if r['hit_under_1s'] else 'FAIL'} under 1 s]")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="W1,W2,W3", help="comma list of W1,W2,W3 (default all)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="shrink the workloads: W1 file count, W2 file size, W3 file size (default 1)")
    ap.add_argument("--tools", default="ours,rclone,azcopy", help="comma list of ours,rclone,azcopy")
    ap.add_argument("--binary", type=Path, default=None, help="our binary (default target/release/datastore, "
                    "built with `cargo build --release` first)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build for the default binary")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results.json", help="where to write results")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch dir (default a new dir under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (data, logs) afterwards")
    ap.add_argument("--shared-azurite", action="store_true",
                    help="one Azurite per workload shared by all tools (default: a fresh one per tool)")
    ap.add_argument("--rclone-flags", default=None,
                    help=f"replace rclone's flags (default: {' '.join(RCLONE_FLAGS)!r})")
    ap.add_argument("--azcopy-concurrency", type=int, default=None,
                    help="set AZCOPY_CONCURRENCY_VALUE (default: azcopy's own choice, 32 on <= 4 cores)")
    ap.add_argument("--repeat", default="auto",
                    help="repetitions per workload and tool (median reported); 'auto' = 1 for W1, 3 for W2/W3")
    ap.add_argument("--quiet-wait", type=float, default=30,
                    help="before each transfer wait up to this many seconds for other processes to stop "
                         "using the CPU (0: do not wait; after one timeout the run stops waiting)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per transfer (default 1800)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--no-node-cache", action="store_true",
                    help="skip the node cache's numbers (tests/csi.rs, release build, needs root)")
    args = ap.parse_args()

    t_start = time.monotonic()
    QUIET["max_wait"] = args.quiet_wait
    global AZCOPY_CONCURRENCY
    AZCOPY_CONCURRENCY = args.azcopy_concurrency
    if args.rclone_flags is not None:
        RCLONE_FLAGS[:] = args.rclone_flags.split()
    wanted = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    tools = [t.strip().lower() for t in args.tools.split(",") if t.strip()]
    all_wl = make_workloads(args.scale)
    if bad := [w for w in wanted if w not in all_wl]:
        ap.error(f"unknown workload(s) {bad}")
    if bad := [t for t in tools if t not in ALL_TOOLS]:
        ap.error(f"unknown tool(s) {bad}")
    workloads = {w: all_wl[w] for w in wanted}

    ensure_gnu_time()
    ensure_npm_tools("azcopy" in tools)
    if "rclone" in tools:
        ensure_rclone()
    if "ours" in tools:
        default_binary = args.binary is None
        args.binary = (args.binary or REPO / "target" / "release" / "datastore").resolve()
        ensure_ours(args.binary, build=default_binary and not args.no_build)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="datastore-bench-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    need = sum(w.total_bytes for w in workloads.values())
    free = shutil.disk_usage(workdir).free
    # data + one download + one Azurite copy of the largest workload, with headroom
    if free < need + 3 * max(w.total_bytes for w in workloads.values()) + GIB:
        log(f"warning: only {human(free)} free under {workdir}")
    log(f"workdir {workdir}; tools {tools}; workloads {list(workloads)}; scale {args.scale}")

    meta = {
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "scale": args.scale,
        "scale_note": f"scale {args.scale}",
        "shared_azurite": args.shared_azurite,
        "azurite": tool_version("azurite", args.binary),
        "versions": {t: tool_version(t, args.binary) for t in tools},
        "flags": {"azcopy": f"upload {' '.join(AZCOPY_UPLOAD_FLAGS)}; download {' '.join(AZCOPY_DOWNLOAD_FLAGS)}; "
                            + (f"AZCOPY_CONCURRENCY_VALUE={AZCOPY_CONCURRENCY}" if AZCOPY_CONCURRENCY else
                               "defaults: 32 concurrent ops on <= 4 CPUs, 8 MiB blocks"),
                  "rclone": " ".join(RCLONE_FLAGS) + " (SAS URL remote)",
                  "ours": "upload/download --no-progress --output json" + ours_defaults(args.binary, tools)},
        "workloads": {k: {"description": w.description, "files": len(w.files), "bytes": w.total_bytes}
                      for k, w in workloads.items()},
    }
    runs: list[Result] = []
    data_root = workdir / "data"
    try:
        for wl in workloads.values():
            src = generate(data_root, wl)
            reps = (1 if wl.name == "W1" else 3) if args.repeat == "auto" else max(1, int(args.repeat))
            shared = None
            if args.shared_azurite:
                shared = Azurite(workdir, wl.prefix)
                shared.start()
            try:
                for rep in range(reps):
                    # rotate the order so that no tool always runs first (or right after another)
                    for tool in tools[rep % len(tools):] + tools[:rep % len(tools)]:
                        runs += bench_tool(tool, wl, src, args, workdir, shared, rep)
            finally:
                if shared:
                    shared.destroy()
            # free the disk before the next workload
            shutil.rmtree(src, ignore_errors=True)
            (data_root / f".{wl.prefix}.complete").unlink(missing_ok=True)
    except KeyboardInterrupt:
        log("interrupted; reporting what was measured")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    results = aggregate(runs)
    targets = evaluate_targets(results) if "ours" in tools else []
    node_cache = None if args.no_node_cache else bench_node_cache(args.timeout)
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    print_report(results, workloads, tools, targets, meta)
    if node_cache is not None:
        print_node_cache(node_cache)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": [r.to_json() for r in results], "targets": targets,
                                     "node_cache": node_cache}, indent=2) + "\n")
    log(f"wrote {args.json}; total {meta['elapsed_s']:.0f} s" + (f"; kept {workdir}" if args.keep else ""))
    noisy = [r for r in runs if r.other_cores > NOISY_CORES]
    for r in noisy:
        log(f"noisy: {r.workload} #{r.rep} {r.direction} {r.tool}: other processes used {r.other_cores:.2f} cores")
    if noisy:
        log(f"warning: {len(noisy)} of {len(runs)} transfers ran while other processes used more than "
            f"{NOISY_CORES} cores (see 'other'); the comparison is unreliable, rerun on a quiet machine")
    if any(not r.ok for r in results):
        return 1
    if node_cache and node_cache["error"]:
        return 1
    node_cache_missed = node_cache and any(
        not (r["hit_under_1s"] and r["miss_within_10pct"]) for r in node_cache["rows"])
    if args.strict and (any(not t["passed"] for t in targets) or node_cache_missed):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
