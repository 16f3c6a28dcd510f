"""The doctor's report: what this machine offers for tracing, with a fix for each problem.

It says what `flow` will use and what blocks it, through the same detection as `flow`
(tracer/kernel/hooks.py); tracer/cli/doctor.py renders it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tracer import settings
from tracer.kernel import formats, hooks
from tracer.errors import CAPABILITIES, EnvironmentProblem, PodtraceError, missing_capabilities

# What flow needs (CAP_NET_RAW: ICMP probes, the default, use a raw socket).
TRACE_CAPS = ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_NET_RAW")

# The capabilities the report shows (bit numbers from tracer/errors.py).
CAPS = {name: CAPABILITIES[name] for name in ("CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_PERFMON", "CAP_BPF")}
CONFIG_KEYS = ["CONFIG_BPF_SYSCALL", "CONFIG_BPF_JIT", "CONFIG_DEBUG_INFO_BTF", "CONFIG_BPF_EVENTS",
               "CONFIG_KPROBES", "CONFIG_FUNCTION_TRACER", "CONFIG_NET_CLS_BPF", "CONFIG_NET_SCH_INGRESS",
               "CONFIG_NF_CONNTRACK", "CONFIG_BRIDGE_NETFILTER", "CONFIG_VXLAN"]


def _caps() -> dict[str, bool]:
    eff = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            eff = int(line.split()[1], 16)
    return {name: bool(eff >> bit & 1) for name, bit in CAPS.items()}


def _headers() -> dict:
    rel = os.uname().release
    build = Path(f"/lib/modules/{rel}/build")
    if not build.exists():
        return {"kind": "none", "path": None,
                "note": "BCC needs a headers tree; run scripts/dev.sh setup to link a substitute"}
    target = build.resolve()
    if build.is_symlink() and rel not in target.name:
        return {"kind": "substitute", "path": str(target),
                "note": "used only so BCC compiles; every struct layout comes from BTF"}
    return {"kind": "real", "path": str(target), "note": None}


def _mounted(path: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == path for line in f)
    except OSError:
        return False


def _metadata(lab_prefix: str | None = None) -> dict:
    from tracer.cluster import topology

    lab = topology.load_local(lab_prefix or settings.lab_prefix())
    kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and \
        Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()
    sources = []
    if lab:
        sources.append(f"{lab.source} ({len(lab.pods)} pods)")
    try:
        have_kubeconfig = Path(kubeconfig).exists()
    except OSError:   # HOME=/root (mode 700) kept by setpriv or sudo -u: not ours to read
        have_kubeconfig = False
    if have_kubeconfig:
        sources.append(f"kubeconfig {kubeconfig} (not read by flow yet: pass --cluster FILE)")
    if in_cluster:
        sources.append("in-cluster service account (not read by flow yet)")
    return {"sources": sources or ["none: pass --cluster FILE or run `podtrace lab up`"],
            "default": sources[0] if sources else None}


def _fentry() -> dict:
    """fentry needs the BPF `tracing` program type; loading one is the only honest test."""
    try:
        import bcc
    except ImportError:
        return {"available": False, "reason": "BCC not importable"}
    from tracer.kernel.program import _quiet_stderr

    try:
        with _quiet_stderr():
            b = bcc.BPF(text=b"KFUNC_PROBE(icmp_rcv, void *skb) { return 0; }")
            b.cleanup()
        return {"available": True, "reason": "a tracing (fentry) program loaded; podtrace uses kprobes for the same functions"}
    except Exception as exc:  # BCC raises bare Exception
        # BCC words an EPERM from the kernel as "Need super-user privileges" even for root
        why = "EPERM" if "super-user" in str(exc) else str(exc)
        return {"available": False, "reason": f"the kernel refused to load a tracing (fentry) program ({why}); kprobes or tracepoints are used instead"}


def report(compile_test: bool = True, lab_prefix: str | None = None) -> dict:
    problems: list[dict] = []
    root = os.geteuid() == 0
    caps = _caps()
    if not root and not (caps["CAP_BPF"] and caps["CAP_NET_ADMIN"]):
        problems.append({"problem": "not root and without CAP_BPF/CAP_NET_ADMIN", "fix": "run with sudo"})
    elif root and missing_capabilities(TRACE_CAPS):
        problems.append({"problem": f"root, but without {', '.join(missing_capabilities(TRACE_CAPS))} "
                                    "(capabilities dropped)",
                         "fix": "run with full root capabilities (not under capsh --drop or a restricted securityContext)"})
    cfg = hooks.kernel_config()
    btf = Path("/sys/kernel/btf/vmlinux")
    btf_info = {"path": str(btf), "present": btf.exists(), "offsets": None}
    if not btf.exists():
        problems.append({"problem": "no kernel BTF at /sys/kernel/btf/vmlinux",
                         "fix": "use a kernel built with CONFIG_DEBUG_INFO_BTF=y"})
    elif root:
        from tracer.kernel.btf import kernel_offsets

        try:
            offs = kernel_offsets()
            btf_info["offsets"] = "ok"
            btf_info["conntrack"] = bool(offs.get("HAVE_CT"))
        except PodtraceError as exc:
            btf_info["offsets"] = exc.line()
            problems.append({"problem": exc.message, "fix": exc.fix or "report this kernel to podtrace"})
    try:
        tracefs_root = str(formats.tracefs_root())
    except PodtraceError as exc:
        tracefs_root = None
        problems.append({"problem": exc.message, "fix": exc.fix})
    headers = _headers()
    if headers["kind"] == "none":
        problems.append({"problem": "no kernel headers tree for BCC", "fix": "run scripts/dev.sh setup"})
    try:
        import bcc

        bcc_info = {"importable": True, "version": getattr(bcc, "__version__", "?"), "path": os.path.dirname(bcc.__file__)}
    except ImportError as exc:
        bcc_info = {"importable": False, "error": str(exc)}
        problems.append({"problem": "BCC is not importable", "fix": "apt install python3-bpfcc; run scripts/dev.sh setup"})
    statuses = hooks.detect()
    try:
        chosen, degraded = hooks.select(statuses)
    except PodtraceError as exc:
        chosen, degraded = [], []
        problems.append({"problem": exc.message, "fix": exc.fix})
    compile_info = None
    if compile_test and root and bcc_info.get("importable") and not problems:
        from tracer.kernel import program

        t0 = time.monotonic()
        try:
            loaded = program.load(attach=False, hooks=chosen)
            try:   # attach=False loads nothing: load each program so the verifier runs
                tracepoints = loaded.tracepoints
                for h in chosen:
                    kind = loaded.prog_type(h.kind)
                    # a tc hook's observer comes in two programs: tcx links, clsact filters
                    tcx_fn = h.fn.replace("pt_tc_", "pt_tcx_") if h.kind == "tc" else None
                    for fn in filter(None, (h.fn, h.ret_fn, tcx_fn)):
                        try:
                            with program._quiet_stderr():
                                loaded.bpf.load_func(fn.encode(), kind)
                        except Exception as exc:  # BCC raises bare Exception
                            raise EnvironmentProblem(f"the kernel's verifier rejected {fn}: {exc}",
                                                     "PODTRACE_DEBUG_BPF=1 podtrace doctor shows the verifier log") from None
            finally:
                loaded.close()
            compile_info = {"ok": True, "seconds": round(time.monotonic() - t0, 3), "tracepoints": tracepoints}
        except PodtraceError as exc:
            compile_info = {"ok": False, "error": exc.line()}
            problems.append({"problem": exc.message, "fix": exc.fix})
    used = {h.name for h in chosen}
    return {
        "kernel": {"release": os.uname().release, "version": os.uname().version, "arch": os.uname().machine},
        "config": {k: cfg.get(k) for k in CONFIG_KEYS} if cfg else "unreadable (/proc/config.gz missing)",
        "btf": btf_info,
        "headers": headers,
        "tracefs": tracefs_root,
        "debugfs": "/sys/kernel/debug" if _mounted("/sys/kernel/debug") else None,
        "privileges": {"euid": os.geteuid(), "capabilities": caps},
        "bcc": bcc_info,
        "compile": compile_info,
        "hooks": [{"name": s.hook.name, "kind": s.hook.kind, "tells": s.hook.tells,
                   "active": s.hook.name in used, "available": s.available, "reason": s.reason,
                   "fallback": s.hook.fallback} for s in statuses],
        "fentry": _fentry() if root else {"available": None, "reason": "needs root to test"},
        "metadata": _metadata(lab_prefix),
        "degraded": degraded,
        "can_trace": not problems,
        "problems": problems,
    }
