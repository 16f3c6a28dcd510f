"""The cluster transport without exec: the agent pod's loopback server through the API server's port-forward.

Each node's agent pod runs `podtrace agent --serve` on 127.0.0.1 of the node (the pod uses
the host network); the API server's `pods/portforward` (a websocket speaking the
v4.channel.k8s.io protocol: per port a data and an error channel, the official client's
`kubernetes.stream.portforward`) carries one connection to it per node and trace. The
request goes out as a `request` frame with the token of the Secret podtrace-agent-token,
each steering command as a `command` frame (tracer/agents/server.py); the agent's frames
come back unchanged. To the coordinator this looks like a local process (stdin, stdout,
stderr, poll, wait, terminate, kill), as the exec transport does.

Verified against tests/fakeapi/'s port-forward (tests/fakeapi/portforward.py, over TLS), which relays
to the real agent server in a lab node's network namespace; not yet against a real API
server and kubelet.
"""

from __future__ import annotations

import base64
import json
import socket
import threading

from tracer.agents import wire
from tracer.agents.exectransport import AGENT_NAMESPACE, AGENT_SELECTOR, LOST, RemoteProcess, _Pipe, running_agent_pod
from tracer.agents.server import DEFAULT_PORT
from tracer.errors import EnvironmentProblem

TOKEN_SECRET = "podtrace-agent-token"
PORT_ANNOTATION = "podtrace.io/agent-port"     # on the agent pods: the port `agent --serve` listens on
CREATE_SECRET = (f"kubectl -n {AGENT_NAMESPACE} create secret generic {TOKEN_SECRET} "
                 "--from-literal=token=$(head -c 32 /dev/urandom | base64)")


class _Frames:
    """The coordinator's JSON lines, as frames: the first is the request (with the token),
    every later one a command."""

    def __init__(self, proc: "ServedProcess"):
        self.proc = proc
        self.closed = False
        self.sent_request = False
        self.pending = b""

    def write(self, data: bytes) -> None:
        if self.closed:
            raise BrokenPipeError("the connection to the agent is closed")
        self.pending += data
        while b"\n" in self.pending:
            line, self.pending = self.pending.split(b"\n", 1)
            if not line.strip():
                continue
            doc = json.loads(line)
            if self.sent_request:
                frame = wire.encode("command", doc)
            else:
                frame = wire.encode("request", {"token": self.proc.token, "request": doc})
                self.sent_request = True
            try:
                self.proc.sock.sendall(frame)
            except OSError as exc:
                raise BrokenPipeError(str(exc)) from None

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """No half-close through a port-forward: the end of the connection is the end of
        the agent's input (it stops and removes what it attached)."""
        if not self.closed:
            self.closed = True
            self.proc.hang_up()


class ServedProcess(RemoteProcess):
    """One port-forwarded connection to a node's agent server, with a process's interface."""

    what = "port-forward to"

    def __init__(self, forward, port: int, token: str, node: str, pod: str):
        self.forward = forward
        self.port = port
        self.sock = forward.socket(port)
        self.token = token
        self.node = node
        self.pod = pod
        self.stdin = _Frames(self)
        self.stdout = _Pipe()
        self.stderr = _Pipe()
        self.returncode: int | None = None
        self._hung_up = False
        threading.Thread(target=self._pump, name=f"portforward-{node}", daemon=True).start()

    def _pump(self) -> None:
        problem = None
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                self.stdout.feed(data)
        except OSError as exc:
            if not self._hung_up:
                problem = f"the port-forward to {self.pod} broke: {exc}"
        err = self.forward.error(self.port)
        if err:
            problem = (f"the API server could not reach the agent server of {self.pod} on 127.0.0.1:{self.port} "
                       f"({' '.join(err.split())[:200]}); check that the agent pod runs `podtrace agent --serve`")
        if problem:
            self.stderr.feed(f"\n{problem}\n".encode())
        self.forward.close()
        self.returncode = LOST if problem else 0
        self.stdout.close()
        self.stderr.close()

    def hang_up(self) -> None:
        """End the connection (the pump sees its end and closes the port-forward)."""
        self._hung_up = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

class KubePortForwardTransport:
    """Agents reached through `pods/portforward` to their loopback server (the default in a cluster)."""

    def __init__(self, conn, namespace: str = AGENT_NAMESPACE, selector: str = AGENT_SELECTOR):
        self.conn = conn
        self.namespace = namespace
        self.selector = selector
        self._token: str | None = None

    def token(self) -> str:
        if self._token is None:
            self._token = read_token(self.conn, self.namespace)
        return self._token

    def start(self, plan):
        from kubernetes.stream import portforward

        pod = running_agent_pod(self.conn, plan.node, self.namespace, self.selector)
        name = pod.metadata.name
        port = agent_port(pod)
        token = self.token()
        try:
            forward = portforward(self.conn.core.connect_get_namespaced_pod_portforward, name, self.namespace,
                                  ports=str(port))
        except Exception as exc:  # ApiException(status=0) carries the handshake's status line
            raise forward_error(exc, name, self.namespace, plan.node) from None
        return ServedProcess(forward, port, token, plan.node, name)


def agent_port(pod) -> int:
    raw = ((pod.metadata.annotations or {}).get(PORT_ANNOTATION) or "").strip()
    try:
        port = int(raw) if raw else DEFAULT_PORT
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise EnvironmentProblem(f"the agent pod {pod.metadata.name} has a bad {PORT_ANNOTATION} annotation {raw!r}",
                                 "fix the DaemonSet (manifests/daemonset.yaml)")
    return port


def read_token(conn, namespace: str = AGENT_NAMESPACE) -> str:
    """The agents' token from the Secret podtrace-agent-token (key `token`)."""
    from kubernetes.client.exceptions import ApiException

    from tracer.cluster import api

    what = f"the Secret {namespace}/{TOKEN_SECRET}"
    try:
        secret = conn.core.read_namespaced_secret(TOKEN_SECRET, namespace, _request_timeout=conn.timeout)
    except ApiException as exc:
        if exc.status == 403:
            raise EnvironmentProblem(f"not allowed to read {what}, which holds the agents' token (403 Forbidden)",
                                     "bind the podtrace-user Role (manifests/rbac.yaml) to your user or group") from None
        if exc.status == 404:
            raise EnvironmentProblem(f"{what} does not exist: the agents have no token", CREATE_SECRET) from None
        raise api.api_error(exc, conn, f"read {what}") from None
    except Exception as exc:  # urllib3 errors: one line
        raise api.api_error(exc, conn, f"read {what}") from None
    raw = (secret.data or {}).get("token")
    try:
        token = base64.b64decode(raw or "", validate=True).decode().strip()
    except (ValueError, UnicodeDecodeError):
        token = ""
    if not token:
        raise EnvironmentProblem(f"{what} has no `token` key", CREATE_SECRET)
    return token


def forward_error(exc: BaseException, pod: str, namespace: str, node: str) -> EnvironmentProblem:
    text = " ".join(str(getattr(exc, "reason", "") or exc).split())
    where = f"the podtrace agent pod {namespace}/{pod} on {node}"
    if "403" in text:
        return EnvironmentProblem(f"not allowed to port-forward to {where} (403 Forbidden)",
                                  "bind the podtrace-user Role (manifests/rbac.yaml: get and create on "
                                  "pods/portforward in namespace podtrace) to your user or group")
    if "401" in text:
        return EnvironmentProblem(f"the API server rejected the credentials for port-forward to {where} (401)",
                                  "refresh them (log in again, or check the kubeconfig)")
    if "404" in text:
        return EnvironmentProblem(f"{where} disappeared before the port-forward (404)",
                                  "retry when the DaemonSet has replaced it (kubectl -n podtrace get pods)")
    return EnvironmentProblem(f"port-forward to {where} failed: {text[:200]}",
                              "check the API server and kubelet, or use --transport exec where port-forward is "
                              "not allowed")
