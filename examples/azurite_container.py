"""Creates a blob container in a local Azurite with its well-known development account, so the
Azurite demo needs nothing but python3 (no Azure CLI, no SDK).

    python3 examples/azurite_container.py data [http://127.0.0.1:10000/devstoreaccount1]

An existing container is fine. Waits up to 10 s for Azurite to accept connections.
"""

import base64
import email.utils
import hashlib
import hmac
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

ACCOUNT = "devstoreaccount1"
# Azurite's published development key (not a secret).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
VERSION = "2021-08-06"
CONTENT_TYPE = "application/octet-stream"


def create(container, endpoint):
    url = f"{endpoint}/{container}?restype=container"
    date = email.utils.formatdate(usegmt=True)
    # Shared Key: the verb, the eleven standard headers (only Content-Type set: urllib would
    # add one), the x-ms- headers, the resource.
    resource = f"/{ACCOUNT}{urllib.parse.urlparse(url).path}\nrestype:container"
    standard = ["", "", "", "", CONTENT_TYPE, "", "", "", "", "", ""]
    to_sign = "\n".join(["PUT", *standard, f"x-ms-date:{date}", f"x-ms-version:{VERSION}", resource])
    signature = base64.b64encode(
        hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest()
    ).decode()
    request = urllib.request.Request(url, method="PUT", data=b"")
    request.add_header("x-ms-date", date)
    request.add_header("x-ms-version", VERSION)
    request.add_header("Authorization", f"SharedKey {ACCOUNT}:{signature}")
    request.add_header("Content-Type", CONTENT_TYPE)
    try:
        urllib.request.urlopen(request, timeout=5)
        print(f"created container {container}")
    except urllib.error.HTTPError as e:
        if e.code != 409:
            raise SystemExit(f"creating container {container} failed: {e.code} {e.read().decode()}")
        print(f"container {container} exists")


def main():
    container = sys.argv[1]
    endpoint = sys.argv[2] if len(sys.argv) > 2 else f"http://127.0.0.1:10000/{ACCOUNT}"
    for attempt in range(20):
        try:
            return create(container, endpoint.rstrip("/"))
        except urllib.error.URLError as e:
            if isinstance(e, urllib.error.HTTPError) or attempt == 19:
                raise SystemExit(f"Azurite at {endpoint} is not answering: {e.reason}")
            time.sleep(0.5)


if __name__ == "__main__":
    main()
