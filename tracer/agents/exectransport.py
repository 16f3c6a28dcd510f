"""The cluster fallback transport: runs `podtrace agent` in the agent pod of a node through the
Kubernetes exec API (`--transport exec`; it needs pods/exec, a root shell in the agent pods —
tracer/agents/portforward.py is the default), and looks like a local process to the coordinator (stdin, stdout,
stderr, poll, wait, terminate, kill), so the merge code is the same as in the lab.

The exec API is a websocket (the official client's `kubernetes.stream`) carrying channels:
0 stdin, 1 stdout, 2 stderr, 3 the exit Status, and with v5.channel.k8s.io a "close channel"
message, which is how stdin ends without hanging up (the agent stops at the end of stdin).
On v4 servers stdin cannot end on its own: hanging up ends it (the kubelet closes the
process's stdin when the stream goes away).

Verified against tests/fakeapi/, which speaks this protocol over a real websocket and runs
the real agent in a lab node's network namespace (tests/integration/test_cluster_exec.py);
not yet against a real API server and kubelet.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

from tracer.errors import EnvironmentProblem

AGENT_NAMESPACE = "podtrace"
AGENT_SELECTOR = "app.kubernetes.io/name=podtrace-agent"
STDIN, STDOUT, STDERR, ERROR = 0, 1, 2, 3
LOST = 255   # our exit code for "the exec stream ended without an exit status"


class _Pipe:
    """A blocking byte buffer fed by the websocket pump."""

    def __init__(self):
        self.buf = bytearray()
        self.closed = False
        self.cv = threading.Condition()

    def feed(self, data: bytes) -> None:
        with self.cv:
            self.buf += data
            self.cv.notify_all()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()

    def read(self, n: int = -1) -> bytes:
        with self.cv:
            while not self.closed and (not self.buf or (n < 0)):
                self.cv.wait(0.5)
            if n < 0:
                n = len(self.buf)
            out = bytes(self.buf[:n])
            del self.buf[:n]
            return out


class _Stdin:
    def __init__(self, proc: "ExecProcess"):
        self.proc = proc
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            raise BrokenPipeError("stdin of the exec stream is closed")
        try:
            self.proc.ws.write_stdin(data)
        except Exception as exc:  # websocket-client raises its own errors once the stream is gone
            raise BrokenPipeError(str(exc)) from None

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """End of stdin: a v5 close-channel message; a v4 stream can only hang up."""
        if self.closed:
            return
        self.closed = True
        ws = self.proc.ws
        if getattr(ws, "subprotocol", None) == "v5.channel.k8s.io":
            try:
                ws.close_channel(STDIN)
                return
            except Exception:  # the stream is already gone: nothing left to end
                pass
        self.proc.hang_up()


def exit_status(raw: bytes | str | None) -> tuple[int, str | None]:
    """(exit code, message) from the Status the server sends on the error channel."""
    if not raw:
        return LOST, "the exec stream ended without an exit status (API server or kubelet connection lost)"
    try:
        st = json.loads(raw)
    except ValueError:
        return LOST, f"unreadable exit status from the API server: {raw[:120]!r}"
    if not isinstance(st, dict):
        return LOST, f"unreadable exit status from the API server: {raw[:120]!r}"
    if st.get("status") == "Success":
        return 0, None
    for cause in ((st.get("details") or {}).get("causes") or []):
        if cause.get("reason") == "ExitCode":
            try:
                return int(cause.get("message")), None
            except (TypeError, ValueError):
                break
    return LOST, str(st.get("message") or "the exec failed")


class RemoteProcess:
    """What an agent reached through the API server (exec stream, port-forward) shares of
    subprocess.Popen's interface: a pump thread sets `returncode`; no signals reach the
    agent, so terminate and kill hang up, and an agent whose input ends stops and removes
    what it attached."""

    returncode: int | None
    node: str
    what = "agent"

    def poll(self):
        return self.returncode

    def wait(self, timeout: float | None = None):
        end = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(f"{self.what} {self.node}", timeout)
            time.sleep(0.05)
        return self.returncode

    def hang_up(self) -> None:
        raise NotImplementedError

    def terminate(self) -> None:
        self.hang_up()

    def kill(self) -> None:
        self.hang_up()


class ExecProcess(RemoteProcess):
    """An exec stream with the interface of subprocess.Popen that the coordinator uses."""

    what = "exec on"

    def __init__(self, ws, node: str, pod: str):
        self.ws = ws
        self.node = node
        self.pod = pod
        self.stdin = _Stdin(self)
        self.stdout = _Pipe()
        self.stderr = _Pipe()
        self.returncode: int | None = None
        self._hang_up = threading.Event()
        threading.Thread(target=self._pump, name=f"exec-{node}", daemon=True).start()

    def _drain(self) -> None:
        for ch, pipe in ((STDOUT, self.stdout), (STDERR, self.stderr)):
            data = self.ws.read_channel(ch, timeout=0)
            if data:
                pipe.feed(data if isinstance(data, bytes) else data.encode())

    def _pump(self) -> None:
        problem = None
        try:
            while self.ws.is_open():
                if self._hang_up.is_set():
                    # Closing reads the server's close reply: done here, by the only thread
                    # that reads the socket (two readers can leave one blocked for good).
                    self.ws.close()
                    break
                self.ws.update(timeout=0.2)
                self._drain()
        except Exception as exc:  # the connection broke: websocket-client raises several kinds
            problem = f"the exec stream to {self.pod} broke: {exc}"
        finally:
            try:
                self._drain()
                raw = self.ws.read_channel(ERROR, timeout=0)
            except Exception:  # nothing more can be read from a broken stream
                raw = None
            rc, msg = exit_status(raw)
            if rc == LOST and problem:
                msg = problem
            if msg:
                self.stderr.feed(f"\n{msg}\n".encode())
            self.returncode = rc
            self.stdout.close()
            self.stderr.close()

    def hang_up(self) -> None:
        """End the stream (the pump thread closes it within one update)."""
        self._hang_up.set()


class KubeExecTransport:
    def __init__(self, conn, namespace: str = AGENT_NAMESPACE, selector: str = AGENT_SELECTOR):
        self.conn = conn
        self.namespace = namespace
        self.selector = selector

    def agent_pod(self, node: str) -> str:
        return running_agent_pod(self.conn, node, self.namespace, self.selector).metadata.name

    def start(self, plan):
        from kubernetes.stream import stream, ws_client

        pod = self.agent_pod(plan.node)
        try:
            ws = stream(self.conn.core.connect_get_namespaced_pod_exec, pod, self.namespace,
                        command=["podtrace", "agent"], stdin=True, stdout=True, stderr=True, tty=False,
                        _preload_content=False, binary=True)
        except Exception as exc:  # ApiException(status=0) carries the handshake's status line
            raise exec_error(exc, pod, self.namespace, plan.node) from None
        # The client keeps a copy of everything read unless told otherwise, and stream() cannot
        # tell it: without this a long trace would hold its whole stream in memory twice.
        if hasattr(ws, "_all"):
            ws._all = ws_client._IgnoredIO()
        return ExecProcess(ws, plan.node, pod)


def running_agent_pod(conn, node: str, namespace: str = AGENT_NAMESPACE, selector: str = AGENT_SELECTOR):
    """The running podtrace agent pod on `node` (the first by name), or EnvironmentProblem."""
    from tracer.cluster import api

    try:
        pods = conn.core.list_namespaced_pod(namespace, label_selector=selector,
                                             field_selector=f"spec.nodeName={node}",
                                             _request_timeout=conn.timeout).items
    except Exception as exc:  # the client raises ApiException/urllib3 errors; map to one line
        raise api.api_error(exc, conn, f"find the podtrace agent pod on {node}") from None
    running = sorted((p for p in pods if (p.status and p.status.phase == "Running")), key=lambda p: p.metadata.name)
    if not running:
        raise EnvironmentProblem(f"no running podtrace agent on node {node}",
                                 "kubectl apply -k manifests/ and wait for the DaemonSet "
                                 "(kubectl -n podtrace get pods -o wide)")
    return running[0]


def exec_error(exc: BaseException, pod: str, namespace: str, node: str) -> EnvironmentProblem:
    text = " ".join(str(getattr(exc, "reason", "") or exc).split())
    where = f"the podtrace agent pod {namespace}/{pod} on {node}"
    if "403" in text:
        return EnvironmentProblem(f"not allowed to exec into {where} (403 Forbidden)",
                                  "use the default --transport portforward (the podtrace-user Role grants no exec), "
                                  "or, where port-forward is forbidden, bind the podtrace-exec Role "
                                  "(manifests/rbac.yaml; a root shell on every node)")
    if "401" in text:
        return EnvironmentProblem(f"the API server rejected the credentials for exec into {where} (401)",
                                  "refresh them (log in again, or check the kubeconfig)")
    if "404" in text:
        return EnvironmentProblem(f"{where} disappeared before the exec (404)",
                                  "retry when the DaemonSet has replaced it (kubectl -n podtrace get pods)")
    return EnvironmentProblem(f"exec into {where} failed: {text[:200]}",
                              "check the API server and kubelet (kubectl -n podtrace exec POD -- podtrace doctor)")
