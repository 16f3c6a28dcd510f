"""The cluster transport: runs `podtrace agent` in the agent pod of a node through the
Kubernetes exec API, and looks like a local process to the coordinator (stdin, stdout,
stderr, poll, wait, kill), so the merge code is the same as in the lab.

Not exercised against a real API server here (none can run on this machine); the framing,
merge and agent it carries are the ones the lab tests exercise.
"""

from __future__ import annotations

import threading
import time

from .errors import EnvironmentProblem

AGENT_NAMESPACE = "podtrace"
AGENT_SELECTOR = "app.kubernetes.io/name=podtrace-agent"
STDIN, STDOUT, STDERR, ERROR = 0, 1, 2, 3


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
            while not self.buf and not self.closed:
                self.cv.wait(0.5)
            if n < 0:
                n = len(self.buf)
            out = bytes(self.buf[:n])
            del self.buf[:n]
            return out


class _Stdin:
    def __init__(self, ws):
        self.ws = ws

    def write(self, data: bytes) -> None:
        self.ws.write_stdin(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # the websocket may already be gone; closing is best effort
            pass


class ExecProcess:
    def __init__(self, ws, node: str):
        self.ws = ws
        self.node = node
        self.stdin = _Stdin(ws)
        self.stdout = _Pipe()
        self.stderr = _Pipe()
        self.returncode: int | None = None
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            while self.ws.is_open():
                self.ws.update(timeout=0.2)
                if self.ws.peek_stdout():
                    self.stdout.feed(self.ws.read_stdout())
                if self.ws.peek_stderr():
                    self.stderr.feed(self.ws.read_stderr())
        finally:
            self.returncode = self.ws.returncode if self.ws.returncode is not None else 0
            self.stdout.close()
            self.stderr.close()

    def poll(self):
        return self.returncode

    def wait(self, timeout: float | None = None):
        end = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            if end is not None and time.monotonic() > end:
                import subprocess

                raise subprocess.TimeoutExpired(f"exec on {self.node}", timeout)
            time.sleep(0.05)
        return self.returncode

    def kill(self) -> None:
        self.stdin.close()


class KubeExecTransport:
    def __init__(self, conn, namespace: str = AGENT_NAMESPACE, selector: str = AGENT_SELECTOR):
        self.conn = conn
        self.namespace = namespace
        self.selector = selector

    def agent_pod(self, node: str) -> str:
        from . import kube

        try:
            pods = self.conn.core.list_namespaced_pod(self.namespace, label_selector=self.selector,
                                                      field_selector=f"spec.nodeName={node}",
                                                      _request_timeout=self.conn.timeout).items
        except Exception as exc:  # the client raises ApiException/urllib3 errors; map to one line
            raise kube.api_error(exc, self.conn, f"podtrace agent pods on {node}") from None
        running = [p.metadata.name for p in pods if (p.status and p.status.phase == "Running")]
        if not running:
            raise EnvironmentProblem(f"no running podtrace agent on node {node}",
                                     "kubectl apply -k manifests/ and wait for the DaemonSet")
        return running[0]

    def start(self, plan):
        from kubernetes.stream import stream

        pod = self.agent_pod(plan.node)
        ws = stream(self.conn.core.connect_get_namespaced_pod_exec, pod, self.namespace,
                    command=["podtrace", "agent"], stdin=True, stdout=True, stderr=True, tty=False,
                    _preload_content=False, binary=True)
        return ExecProcess(ws, plan.node)
