"""The agent stream: framed, versioned records an agent writes on stdout and the
coordinator reads — over a pipe in the lab, over the API server's port-forward (or exec) in a
cluster. A served agent (tracer/agents/server.py) also reads its client's `request` and
`command` frames in this format.

A frame is a 16-byte header — magic `PTW1`, version, kind, flags, payload length, CRC32 of
the payload — then the payload: raw event records (EVENT_DTYPE) for `events`, UTF-8 JSON
for everything else. A bad magic, a CRC mismatch or a short read is reported as a
WireError naming the offset; the reader never guesses past it. A kind added later is only sent in answer to a command
that names it (`drained` answers `drain`), so a reader that does not know it never meets it.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

MAGIC = b"PTW1"
VERSION = 2   # 2: event records with 16-byte addresses (both IP families) and flow_lbl
HEADER = struct.Struct("!4sBBHII")
MAX_PAYLOAD = 64 << 20

KINDS = {1: "hello", 2: "ready", 3: "events", 4: "counters", 5: "facts", 6: "probes",
         7: "clock", 8: "error", 9: "end", 10: "log", 11: "drained",
         12: "probe",   # one probe's outcome as it comes, only when the probe command asks for it
         # client → served agent only (tracer/agents/server.py): the token and trace request,
         # then steering commands
         13: "request", 14: "command",
         15: "sample"}  # the guard raised the sampling, only once a `sample` command came
KIND_IDS = {v: k for k, v in KINDS.items()}


class WireError(Exception):
    pass


@dataclass
class Frame:
    kind: str
    payload: bytes

    def json(self):
        return json.loads(self.payload.decode())


def encode(kind: str, payload: bytes | dict | list) -> bytes:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        payload = json.dumps(payload, separators=(",", ":")).encode()
    payload = bytes(payload)
    return HEADER.pack(MAGIC, VERSION, KIND_IDS[kind], 0, len(payload), zlib.crc32(payload)) + payload


def write(f: BinaryIO, kind: str, payload) -> None:
    f.write(encode(kind, payload))
    f.flush()


def _read_exact(f: BinaryIO, n: int) -> bytes:
    chunks = []
    while n:
        b = f.read(n)
        if not b:
            break
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def read(f: BinaryIO, limit: int = MAX_PAYLOAD) -> Iterator[Frame]:
    """Frames until a clean end of stream; WireError on anything else (also a payload
    longer than `limit`)."""
    offset = 0
    while True:
        head = _read_exact(f, HEADER.size)
        if not head:
            return
        if len(head) < HEADER.size:
            raise WireError(f"stream truncated inside a frame header at byte {offset}")
        magic, version, kind, _flags, length, crc = HEADER.unpack(head)
        if magic != MAGIC:
            raise WireError(f"not a podtrace agent frame at byte {offset} (bad magic {magic!r})")
        if version > VERSION:
            raise WireError(f"agent speaks stream version {version}, this podtrace reads {VERSION}: upgrade it")
        if version < VERSION:   # its event records have another layout
            raise WireError(f"agent speaks the older stream version {version}, this podtrace reads {VERSION}: "
                            "run the same podtrace version on the nodes")
        if kind not in KINDS:
            raise WireError(f"unknown frame kind {kind} at byte {offset}")
        if length > limit:
            raise WireError(f"frame of {length} bytes at byte {offset} exceeds the limit")
        payload = _read_exact(f, length)
        if len(payload) < length:
            raise WireError(f"stream truncated inside a {KINDS[kind]} frame at byte {offset}")
        if zlib.crc32(payload) != crc:
            raise WireError(f"corrupt {KINDS[kind]} frame at byte {offset} (CRC mismatch)")
        offset += HEADER.size + length
        yield Frame(KINDS[kind], payload)
