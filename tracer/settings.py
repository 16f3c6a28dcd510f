"""The PODTRACE_* environment variables podtrace reads, each read here and nowhere else.

Each is read when asked for, not at import: a test or a parent process may set one after
podtrace was imported (the test suite runs labs under prefixes of its own).

==========================  ================  ==============================================
variable                    default           what it does
==========================  ================  ==============================================
PODTRACE_LAB_PREFIX         ``ptlab``         which lab `flow`, `capture`, `doctor` and
                                              `lab` use when no cluster is given and no
                                              --prefix (the option wins)
PODTRACE_STATE_DIR          ``/run/podtrace`` where runs record what they own (tc filters,
                                              trace files being written) for `cleanup`
PODTRACE_FLOW_MODE          ``agents``        how `flow` traces the nodes: ``agents`` (one
                                              agent per node) or ``single`` (every node
                                              from this process, lab only)
PODTRACE_HOST_PROC          ``/proc``         the host's /proc as an agent pod sees it
                                              (the DaemonSet mounts it at /host/proc)
PODTRACE_RINGBUF_READER     (mmap)            ``bcc``: read the ring buffer through BCC's
                                              per-record callback instead of the batch
                                              reader of tracer/kernel/ringbuf.py
PODTRACE_TC_ATTACH          ``auto``          how tc observers attach: ``tcx`` (BPF links,
                                              Linux 6.6+), ``clsact`` (classic filters,
                                              adding a clsact qdisc where none is), or
                                              ``auto`` (tcx where the kernel has it and the
                                              device has no clsact qdisc)
PODTRACE_TC_OBSERVERS       ``auto``          where tc observers go: ``auto`` (on the path's
                                              devices only when another tc program or
                                              filter runs on one of them: an eBPF
                                              datapath, whose programs can move a packet
                                              past the device tracepoints), ``all`` (on
                                              every device of the path, always)
PODTRACE_TRACEPOINTS        ``auto``          how the device and skb tracepoints attach:
                                              ``raw`` (raw tracepoints: the kernel fills no
                                              record before the program runs), ``perf``
                                              (perf-event tracepoints), or ``auto`` (raw,
                                              and perf where raw cannot attach)
PODTRACE_DEBUG              (off)             ``1``: tracebacks of errors, like --debug
PODTRACE_DEBUG_BPF          (off)             any value: let BCC's compiler warnings and
                                              the verifier's log through to stderr
==========================  ================  ==============================================

Test switches and pause points (PODTRACE_TEST_*, and the agent's test-only variables) are
tracer/testhooks.py's; the lab's own build switches are tracer/lab/'s.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_LAB_PREFIX = "ptlab"
DEFAULT_STATE_DIR = "/run/podtrace"

# Every variable of the table above (tests check the table and the readers agree).
VARIABLES = ("PODTRACE_LAB_PREFIX", "PODTRACE_STATE_DIR", "PODTRACE_FLOW_MODE", "PODTRACE_HOST_PROC",
             "PODTRACE_RINGBUF_READER", "PODTRACE_TC_ATTACH", "PODTRACE_TC_OBSERVERS",
             "PODTRACE_TRACEPOINTS", "PODTRACE_DEBUG", "PODTRACE_DEBUG_BPF")


def lab_prefix() -> str:
    """The lab `flow`, `capture` and `doctor` look at when no cluster is given."""
    return os.environ.get("PODTRACE_LAB_PREFIX") or DEFAULT_LAB_PREFIX


def lab_prefix_source() -> str:
    """Where lab_prefix() comes from, as --help says it: "PODTRACE_LAB_PREFIX" or "default"."""
    return "PODTRACE_LAB_PREFIX" if os.environ.get("PODTRACE_LAB_PREFIX") else "default"


def state_dir() -> Path:
    """Where runs record what they own, for `podtrace cleanup`."""
    return Path(os.environ.get("PODTRACE_STATE_DIR") or DEFAULT_STATE_DIR)


def tc_attach() -> str:
    """How tc observers attach: "auto", "tcx" or "clsact" (anything else counts as auto)."""
    v = (os.environ.get("PODTRACE_TC_ATTACH") or "auto").lower()
    return v if v in ("tcx", "clsact") else "auto"


def tc_observers() -> str:
    """Where tc observers go: "auto" (only when another tc program or filter runs on one of
    the path's devices) or "all" (anything else counts as auto)."""
    v = (os.environ.get("PODTRACE_TC_OBSERVERS") or "auto").lower()
    return v if v == "all" else "auto"


def tracepoints() -> str:
    """How tracepoint hooks attach: "auto", "raw" or "perf" (anything else counts as auto)."""
    v = (os.environ.get("PODTRACE_TRACEPOINTS") or "auto").lower()
    return v if v in ("raw", "perf") else "auto"


def flow_mode() -> str:
    """`flow`'s default mode: "agents" (one agent per node) or "single" (in-process)."""
    return os.environ.get("PODTRACE_FLOW_MODE", "agents")


def host_proc() -> Path:
    """The host's /proc (an agent pod mounts it at /host/proc)."""
    return Path(os.environ.get("PODTRACE_HOST_PROC") or "/proc")


def ringbuf_reader() -> str:
    """"bcc" for BCC's per-record callback; anything else means the batch reader."""
    return os.environ.get("PODTRACE_RINGBUF_READER", "")


def debug() -> bool:
    """Tracebacks of errors (as `--debug`)."""
    return os.environ.get("PODTRACE_DEBUG") == "1"


def debug_bpf() -> bool:
    """BCC's compiler output and the verifier's log on stderr."""
    return bool(os.environ.get("PODTRACE_DEBUG_BPF"))
