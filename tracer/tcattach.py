"""tc clsact attachment of the observer programs, and the removal of ours — also after a
SIGKILL, by a mark only podtrace uses (the filter name `podtrace:<direction>`).

Rules: attach only to the devices asked for; add a `clsact` qdisc only where none exists
(and then remove it again); never replace, reorder or touch a filter someone else put
there: ours goes in at a priority nobody uses, after theirs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import netns as netns_mod
from . import testhooks

MARK = "podtrace:"
PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
PREFERRED_PRIO = 49152
STATE_FILE = Path(os.environ.get("PODTRACE_STATE_DIR", "/run/podtrace")) / "tc-attached.json"


@dataclass
class Attachment:
    netns: str | None            # named namespace, or None for this one
    dev: str
    ifindex: int
    direction: str
    prio: int
    qdisc_added: bool
    pid: int = field(default_factory=os.getpid)


def _ipr(ns: str | None):
    """A netlink socket in namespace `ns` (a socket keeps the namespace it was made in)."""
    from pyroute2 import IPRoute

    if ns is None:
        return IPRoute()
    with netns_mod.entered(ns):
        return IPRoute()


def netns_inode(ns: str | None) -> int:
    return netns_mod.inode(ns) if ns else os.stat("/proc/self/ns/net").st_ino


def _filters(ipr, ifindex: int, direction: str) -> list:
    try:
        return list(ipr.get_filters(ifindex, parent=PARENT[direction]))
    except Exception:  # pyroute2 raises NetlinkError when there is no clsact qdisc
        return []


def _name(f) -> str | None:
    opts = f.get_attr("TCA_OPTIONS")
    if not opts:
        return None
    return opts.get_attr("TCA_BPF_NAME") if hasattr(opts, "get_attr") else None


def _prio(f) -> int:
    return (f["info"] >> 16) & 0xFFFF


def _has_clsact(ipr, ifindex: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(ifindex))


def _load_state() -> list[dict]:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return []


@contextlib.contextmanager
def _state_locked():
    """Concurrent runs (and `cleanup`) read-modify-write the state file: one at a time, or
    a record is lost — and with it the clsact qdisc it says to remove."""
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(STATE_FILE.with_name(STATE_FILE.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _save_state(items: list[dict]) -> None:
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_name(STATE_FILE.name + f".{os.getpid()}")
    tmp.write_text(json.dumps(items))
    tmp.replace(STATE_FILE)


class TcAttacher:
    """Attaches the loaded `pt_tc_ingress`/`pt_tc_egress` programs; `close()` removes them."""

    def __init__(self, bpf):
        from bcc import BPF

        from .bpfprog import TC_SLOTS, tc_stub_name

        self.bpf = bpf
        self._sched_cls = BPF.SCHED_CLS
        self._stub_name = tc_stub_name
        self.slots = TC_SLOTS
        progs = bpf["tc_progs"]
        for i, d in enumerate(PARENT):
            progs[progs.Key(i)] = progs.Leaf(bpf.load_func(f"pt_tc_{d}".encode(), BPF.SCHED_CLS).fd)
        self.devs = bpf["tc_devs"]
        self.attached: list[Attachment] = []
        self.failed: list[str] = []
        self.next_slot = 0

    def attach(self, ns: str | None, dev: str) -> None:
        """Attach to one device; a device the kernel refuses is noted in `failed` and
        skipped (the tracepoints still see it), never fatal for the trace."""
        try:
            self._attach(ns, dev)
        except Exception as exc:  # pyroute2 raises NetlinkError (and OSError) for kernel refusals
            self.failed.append(f"tc on {ns or 'host'}/{dev}: {exc}")

    def _attach(self, ns: str | None, dev: str) -> None:
        ipr = _ipr(ns)
        try:
            found = ipr.link_lookup(ifname=dev)
            if not found:
                return
            ifindex = found[0]
            if self.next_slot >= self.slots:
                return   # more devices than slots: the tracepoints still see them
            slot = self.next_slot
            self.next_slot += 1
            v = self.devs.Leaf()
            v.inum = netns_inode(ns)
            v.name = dev.encode()[:15]
            self.devs[self.devs.Key(slot)] = v
            added = not _has_clsact(ipr, ifindex)   # added below, once recorded
            for direction, parent in PARENT.items():
                used = {_prio(f) for f in _filters(ipr, ifindex, direction)}
                prio = PREFERRED_PRIO
                while prio in used:
                    prio += 1
                att = Attachment(ns, dev, ifindex, direction, prio, added)
                # Recorded before the kernel call: a SIGKILL in between still leaves a trace
                # for `podtrace cleanup`.
                self.attached.append(att)
                with _state_locked():
                    _save_state(_load_state() + [asdict(att)])
                if added and direction == "ingress":
                    ipr.tc("add", "clsact", ifindex)
                fd = self.bpf.load_func(self._stub_name(slot, direction).encode(), self._sched_cls).fd
                ipr.tc("add-filter", "bpf", ifindex, ":1", fd=fd,
                       name=f"{MARK}{direction}", parent=parent, classid=1, direct_action=True, prio=prio)
                testhooks.pause("attaching")
        finally:
            ipr.close()

    def close(self) -> None:
        mine = [asdict(a) for a in self.attached]
        for a in self.attached:
            _remove(a.netns, a.dev, a.direction, a.prio, a.qdisc_added)
        self.attached.clear()
        # Empty the tail-call array now: its entries hold the shared programs, and a
        # prog_array left populated can outlive this process's fds for a while.
        progs = self.bpf["tc_progs"]
        for i in range(len(PARENT)):
            with contextlib.suppress(Exception):
                del progs[progs.Key(i)]
        with _state_locked():
            _save_state([x for x in _load_state() if x not in mine])


def _remove(ns: str | None, dev: str, direction: str, prio: int | None, qdisc_added: bool) -> list[str]:
    """Delete our filter(s) on one device; the clsact qdisc too when we added it and nothing
    else is left on it."""
    done = []
    if ns and not netns_mod.exists(ns):
        return done
    ipr = _ipr(ns)
    try:
        found = ipr.link_lookup(ifname=dev)
        if not found:
            return done
        ifindex = found[0]
        for f in _filters(ipr, ifindex, direction):
            name = _name(f)
            if name and name.startswith(MARK) and (prio is None or _prio(f) == prio):
                with contextlib.suppress(Exception):
                    ipr.tc("del-filter", "bpf", ifindex, ":1", parent=PARENT[direction], prio=_prio(f))
                    done.append(f"tc filter {name} on {ns or 'host'}/{dev}")
        if qdisc_added and not any(_filters(ipr, ifindex, d) for d in PARENT):
            with contextlib.suppress(Exception):
                ipr.tc("del", "clsact", ifindex)
                done.append(f"clsact qdisc on {ns or 'host'}/{dev}")
    finally:
        ipr.close()
    return done


def cleanup(extra_netns: list[str] | None = None, scan: bool = True) -> list[str]:
    """Remove every filter of ours: those recorded in the state file (a killed run's), and,
    with `scan`, any other carrying our mark on every device of this namespace and of
    `extra_netns`. Attachments of a podtrace process that is still running are left alone."""
    removed: list[str] = []
    keep = []
    initial = _load_state()
    for a in initial:
        if a.get("pid") and a["pid"] != os.getpid() and _alive(a["pid"]):
            keep.append(a)
            continue
        removed += _remove(a["netns"], a["dev"], a["direction"], a["prio"], a["qdisc_added"])
    for ns in ([None, *(extra_netns or [])] if scan else []):
        if ns and not netns_mod.exists(ns):
            continue
        # re-read per namespace: a run that started meanwhile has recorded its devices
        live = {(a["netns"], a["dev"]) for a in keep + _load_state()
                if a.get("pid") and a["pid"] != os.getpid() and _alive(a["pid"])}
        ipr = _ipr(ns)
        try:
            devs = [(l.get_attr("IFLA_IFNAME"), l["index"]) for l in ipr.get_links()]
        finally:
            ipr.close()
        for dev, _ in devs:
            if (ns, dev) in live:
                continue
            for direction in PARENT:
                removed += _remove(ns, dev, direction, None, False)
    # the state file is shared by concurrent runs: drop only the records handled here
    handled = [a for a in initial if a not in keep]
    with _state_locked():
        _save_state([a for a in _load_state() if a not in handled])
    return sorted(set(removed))


def _alive(pid: int) -> bool:
    """Running (a zombie, killed but not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def ours(ns: str | None, dev: str) -> list[str]:
    """Names of our filters on a device (for tests and `doctor`)."""
    ipr = _ipr(ns)
    try:
        found = ipr.link_lookup(ifname=dev)
        if not found:
            return []
        return [n for d in PARENT for f in _filters(ipr, found[0], d) if (n := _name(f)) and n.startswith(MARK)]
    finally:
        ipr.close()
