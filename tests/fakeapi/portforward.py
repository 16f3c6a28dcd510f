"""Port-forward, as the real API server and kubelet do it: the API server's side of
`pods/portforward` (a websocket, over TLS like every request, see execws.py).

Port-forward: GET /api/v1/namespaces/NS/pods/NAME/portforward?ports=P[,Q…] with a websocket
upgrade speaks the v4.channel.k8s.io protocol (what the kubelet's websocket port-forward
speaks and the official Python client's `kubernetes.stream.portforward` asks for): for the
i-th port, channel 2i carries data and channel 2i+1 errors; the first message the server
sends on each channel is the port number, two bytes little-endian. Each port is dialled at
the start, like the kubelet does, on 127.0.0.1 inside the pod's network namespace — for the
lab's agent pods (hostNetwork) the node's namespace, named by the pod's `podtrace.io/netns`
annotation; a failed dial is a message on the port's error channel. The client closing the
websocket closes the connections to the pod; the pod closing them all closes the websocket.
`forbidden` may hold "pods/portforward" (403 before the upgrade). Each port-forward is recorded
in `FakeApi.forwards`.

Also the agent side: the token Secret, and `podtrace agent --serve` on every lab node.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import struct
import threading
from pathlib import Path

from tests.fakeapi.execws import WS_GUID, _await_close, _ServerWebsocket

PORTFORWARD_PROTOCOLS = ("v4.channel.k8s.io",)


def _dial(pod: dict, port: int) -> socket.socket:
    """127.0.0.1:port in the pod's network namespace (the node's, for a hostNetwork pod)."""
    from tracer.node import netns

    ns = ((pod.get("metadata") or {}).get("annotations") or {}).get("podtrace.io/netns")
    s = netns.socket_in(ns, socket.AF_INET, socket.SOCK_STREAM) if ns else socket.socket()
    try:
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        s.settimeout(None)
        return s
    except OSError:
        s.close()
        raise


def portforward_session(handler, ns: str, name: str, qs: dict) -> None:
    """One port-forward: upgrade, dial each port, relay the channels, close."""
    fake = handler.fake
    if "pods/portforward" in fake.forbidden:
        return handler.status(403, "Forbidden", f'pods "{name}" is forbidden: User "fake" cannot create resource '
                                                 f'"pods/portforward" in API group "" in the namespace "{ns}"')
    pod = fake.get("Pod", ns, name)
    if pod is None:
        return handler.status(404, "NotFound", f'pods "{name}" not found')
    if handler.headers.get("Upgrade", "").lower() != "websocket" or not handler.headers.get("Sec-WebSocket-Key"):
        return handler.status(400, "BadRequest", "Upgrade request required")
    offered = [p.strip() for p in handler.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    proto = next((p for p in PORTFORWARD_PROTOCOLS if p in offered), None)
    if proto is None:
        return handler.status(400, "BadRequest", f"none of the offered subprotocols {offered} is supported")
    try:
        ports = [int(p) for v in qs.get("ports", []) for p in v.split(",")]
        if not ports or not all(0 < p < 65536 for p in ports):
            raise ValueError
    except ValueError:
        return handler.status(400, "BadRequest", "query parameter ports must be port numbers")
    accept = base64.b64encode(hashlib.sha1((handler.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest())
    handler.send_response(101, "Switching Protocols")
    handler.send_header("Upgrade", "websocket")
    handler.send_header("Connection", "Upgrade")
    handler.send_header("Sec-WebSocket-Accept", accept.decode())
    handler.send_header("Sec-WebSocket-Protocol", proto)
    handler.end_headers()
    handler.wfile.flush()
    handler.close_connection = True
    ws = _ServerWebsocket(handler.rfile, handler.connection)
    record = {"namespace": ns, "pod": name, "ports": ports, "protocol": proto, "errors": [], "closed_by": None}
    forwards(fake).append(record)
    targets: dict[int, socket.socket] = {}
    for i, port in enumerate(ports):
        head = struct.pack("<H", port)
        ws.send(0x2, bytes([2 * i]) + head)
        ws.send(0x2, bytes([2 * i + 1]) + head)
        try:
            targets[i] = _dial(pod, port)
        except OSError as exc:
            msg = (f"error forwarding port {port} to pod {(pod['metadata'].get('uid') or name)}, uid : failed to "
                   f"connect to localhost:{port} inside namespace of pod {name}: {exc}")
            record["errors"].append(msg)
            ws.send(0x2, bytes([2 * i + 1]) + msg.encode())
    open_sockets(fake).update(targets.values())
    left = [len(targets)]
    lock = threading.Lock()

    def from_pod(i: int, s: socket.socket) -> None:
        while True:
            try:
                data = s.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            ws.send(0x2, bytes([2 * i]) + data)
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:          # the pod closed every connection: so does the server
            record["closed_by"] = record["closed_by"] or "pod"
            ws.send(0x8, struct.pack("!H", 1000))
            # The client's close reply (or its hang-up) before the socket goes, as exec does:
            # a reset can lose what we sent last (over TLS, the records still in flight).
            ws.wait_closed(5.0)
            _cut(handler.connection)

    relays = [threading.Thread(target=from_pod, args=(i, s), daemon=True) for i, s in targets.items()]
    for t in relays:
        t.start()
    if not targets:       # nothing to relay: the error channels said why
        ws.send(0x8, struct.pack("!H", 1000))
        _await_close(ws, handler.connection)
    try:
        while targets:
            op, data = ws.recv()
            if op == 0x8:
                record["closed_by"] = record["closed_by"] or "client"
                ws.send(0x8, data[:2] or struct.pack("!H", 1000))
                break
            if op == 0x9:
                ws.send(0xA, data)
            elif op in (0x1, 0x2) and data and data[0] % 2 == 0 and data[0] // 2 in targets:
                with contextlib.suppress(OSError):
                    targets[data[0] // 2].sendall(data[1:])
    except (EOFError, OSError, ValueError):
        record["closed_by"] = record["closed_by"] or "client"
    for s in targets.values():    # the stream is gone: so are its connections to the pod
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
    for t in relays:
        t.join(10)
    for s in targets.values():
        s.close()
        open_sockets(fake).discard(s)


def _cut(conn: socket.socket) -> None:
    """Shut the client's connection down under the TLS layer (as FakeApi.stop does): the thread
    still reading it sees its end, and nothing is written in the clear."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(conn, socket.SHUT_RDWR)


def forwards(fake) -> list[dict]:
    """One record per port-forward: pod, ports, protocol, dial errors, who closed it."""
    return fake.forwards


def open_sockets(fake) -> set:
    """The connections to pods of the port-forwards still open."""
    return fake._forward_socks


def close_forwards(fake) -> None:
    """Cut every open port-forward's connections to its pods (like a kubelet going away)."""
    for s in list(open_sockets(fake)):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------------------
# The DaemonSet's `agent --serve`, played by the lab


def token_secret(token: str, namespace: str = "podtrace") -> dict:
    """The Secret podtrace-agent-token, as `kubectl create secret generic` makes it."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "podtrace-agent-token", "namespace": namespace},
            "data": {"token": base64.b64encode(token.encode()).decode()}}


@contextlib.contextmanager
def lab_agent_servers(prefix: str, token_file: Path, python: str, cwd: str, env: dict | None = None):
    """`podtrace agent --serve` on every lab node, in the node's network namespace only (as a
    hostNetwork container runs it), each up and listening before this yields {node: Popen}."""
    import os
    import select
    import subprocess

    from tracer.lab import topology as T

    topo = T.plan(T.LabConfig(prefix=prefix, state_dir=Path("/nonexistent")))
    procs: dict[str, subprocess.Popen] = {}
    try:
        for n in topo.nodes:
            procs[n.name] = p = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{n.netns}", "--", python, "-m", "tracer.cli", "agent", "--serve",
                 "--token-file", str(token_file), "--node", n.name],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd="/",
                env=dict(env if env is not None else os.environ, PYTHONPATH=cwd))
        for name, p in procs.items():
            ready, _, _ = select.select([p.stderr], [], [], 60)
            line = p.stderr.readline() if ready else ""
            if "serving on 127.0.0.1:" not in line:
                raise RuntimeError(f"the agent server of {name} did not start: {line}")
        yield procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
