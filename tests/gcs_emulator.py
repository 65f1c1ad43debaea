"""Start gcp-storage-emulator with one bug of it worked around, for the test servers.

The emulator parses multipart uploads (what gcsfs sends for every small write) with the
``email`` package, which drops a trailing b"\\r" from the uploaded bytes: a value ending in
0x0d comes back one byte short. Real GCS stores the bytes exactly. Doomed lists, index files
and summaries end in arbitrary bytes, so tests against the emulator failed now and then.
Here the multipart body is split on its boundary byte for byte instead; everything else is
the emulator's own code.

Run as ``python -m tests.gcs_emulator <the emulator's arguments>``.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main

_original_read_data = server._read_data


def _boundary(content_type: str) -> bytes | None:
    for part in content_type.split(";"):
        name, _, value = part.strip().partition("=")
        if name.lower() == "boundary":
            return value.strip('"').encode()
    return None


def _split_related(raw: bytes, boundary: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related body: (headers, exact body bytes) each.

    A delimiter is "--boundary" at the start of a line. Line breaks are CRLF by the RFC;
    gcsfs writes bare LF: each part's first line break says which, and the line break
    before the next delimiter is not part of the body.
    """
    parts = []
    for chunk in (b"\n" + raw).split(b"\n--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        eol = b"\r\n" if chunk.startswith(b"\r\n") else b"\n"
        head, _, body = chunk[len(eol) :].partition(eol + eol)
        if eol == b"\r\n" and body.endswith(b"\r"):
            body = body[:-1]  # the CR of the CRLF before the delimiter (the LF went with it)
        headers = {}
        for line in head.decode("latin-1").split(eol.decode()):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        parts.append((headers, body))
    return parts


def _read_data(request_handler: Any, query: Any) -> Any:
    content_type = request_handler.headers.get("Content-Type") or ""
    boundary = _boundary(content_type)
    if not content_type.startswith("multipart/related") or boundary is None:
        return _original_read_data(request_handler, query)
    raw = server._decode_raw_data(server._read_raw_data(request_handler), request_handler)
    parts = _split_related(raw or b"", boundary)
    if len(parts) < 2:
        return _original_read_data(request_handler, query)
    (_, meta), (headers, content) = parts[0], parts[1]
    if headers.get("content-transfer-encoding", "").lower() == "base64":
        content = base64.b64decode(content)
    return {
        "meta": json.loads(meta),
        "content": content,
        "content-type": headers.get("content-type", "application/octet-stream").split(";")[0].strip(),
    }


server._read_data = _read_data

if __name__ == "__main__":
    main(sys.argv[1:])
