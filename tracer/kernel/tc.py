"""The tc clsact observers on the devices of a trace, from attachment to removal.

They are removed also after a SIGKILL, found by a mark only podtrace uses: the filter name
`podtrace:<direction>:<pid>:<start time>[:clsact]`, which names the process that owns the
filter (pid and start time, tracer/ownership.py) and says whether that process added the
device's clsact qdisc. Older podtrace named its filters `podtrace:<direction>`; those are
still recognised.

Where the kernel has tcx (Linux 6.6 and later) and the device has no clsact qdisc, the
programs are attached by tcx links instead (tracer/kernel/tcx.py): no qdisc is added, so
nothing the device sends is dropped while we attach or detach, and a killed run leaves
nothing behind (the links close with the process). Where a clsact qdisc is already there (a
CNI's datapath), ours are classic filters beside the CNI's, in the order described below.
PODTRACE_TC_ATTACH=clsact asks for classic filters everywhere.

Rules: attach only to the devices asked for; add a `clsact` qdisc only where none exists
and tcx cannot be used (and then remove it again); never replace, reorder or touch a filter someone else put
there: ours goes in at a priority nobody uses, after theirs. `cleanup` never removes a
filter whose owner is still running — even when that run records its attachments in
another state directory. Each attachment is recorded (state file, with its namespace's name
or inode) before the kernel holds it, so `cleanup` always finds what a killed run added.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field

from tracer.node import netns as netns_mod
from tracer import settings, testhooks
from tracer.kernel import tcx
from tracer.node import ownership

MARK = "podtrace:"
PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
PREFERRED_PRIO = 49152
STATE_FILE = ownership.state_dir() / "tc-attached.json"
TCX_MARK = "pt_tc"        # our tc programs' names (pt_tcx_ingress, pt_tc_ingress, pt_tcs_<slot>_in, ...)
QDISC_FLAG = "clsact"     # last field of a filter name: its owner added the clsact qdisc


@dataclass
class Attachment:
    netns: str | None            # named namespace, or None for this one
    dev: str
    ifindex: int
    direction: str
    prio: int
    qdisc_added: bool
    pid: int = field(default_factory=os.getpid)
    start: int | None = field(default_factory=lambda: ownership.start_time(os.getpid()))
    # the namespace's identity: `netns` None means the recorder's own namespace, which for an
    # agent entered into a node's namespace (nsenter --net) is not the one `cleanup` runs in
    netns_inode: int | None = None

    @property
    def name(self) -> str:
        return filter_name(self.direction, self.pid, self.start, self.qdisc_added)


def filter_name(direction: str, pid: int, start: int | None, qdisc_added: bool = False) -> str:
    return f"{MARK}{direction}:{pid}:{start if start is not None else '-'}" + (f":{QDISC_FLAG}" if qdisc_added else "")


def owner_of(name: str) -> tuple[int, int | None] | None:
    """(pid, start time) named by one of our filter names; None for the older names that
    carry no owner (`podtrace:ingress`)."""
    parts = name.split(":")
    if len(parts) < 4 or not parts[2].isdigit():
        return None
    return int(parts[2]), (int(parts[3]) if parts[3].isdigit() else None)


def _owner_running(name: str) -> bool:
    """The filter belongs to another podtrace process that is still running."""
    owner = owner_of(name)
    return owner is not None and owner[0] != os.getpid() and ownership.alive(*owner)


def _mine(name: str) -> bool:
    owner = owner_of(name)
    return owner is not None and owner[0] == os.getpid()


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
    """Attaches the loaded tc observers; `close()` removes them. On tcx one program per hook
    (`pt_tcx_ingress`/`pt_tcx_egress`, which read their device from the sk_buff); with clsact
    filters a slot stub + `pt_tc_ingress`/`pt_tc_egress` pair per hook."""

    def __init__(self, bpf):
        from bcc import BPF

        from tracer.kernel.program import TC_SLOTS, tc_stub_name

        self.bpf = bpf
        self._sched_cls = BPF.SCHED_CLS
        self._stub_name = tc_stub_name
        self.slots = TC_SLOTS
        self.attached: list[Attachment] = []
        self.failed: list[str] = []
        self.next_slot = 0
        mode = settings.tc_attach()
        self.use_tcx = mode == "tcx" or (mode == "auto" and tcx.supported())
        self.devs = bpf["tc_devs"]
        self.links: list[int] = []          # tcx link fds: closing one detaches its program
        self._copies: dict[bytes, int] = {}  # second instances, for a pair before others' programs

    def attach(self, ns: str | None, dev: str) -> None:
        """Attach to one device; a device the kernel refuses is noted in `failed` and
        skipped (the tracepoints still see it), never fatal for the trace."""
        try:
            self._attach(ns, dev)
        except Exception as exc:  # pyroute2 raises NetlinkError (and OSError) for kernel refusals
            self.failed.append(f"tc on {ns or 'host'}/{dev}: {exc}")

    def others_on(self, ns: str | None, devs: list[str]) -> bool:
        """Whether a tc program or filter that is not podtrace's runs on either hook of one
        of these devices of namespace `ns`: a classic filter (whatever its kind) or a tcx
        program. A device that is not there has none."""
        ipr = _ipr(ns)
        try:
            found = [i for d in devs for i in ipr.link_lookup(ifname=d)[:1]]
            for ifindex in found:
                for direction in PARENT:
                    filters = _filters(ipr, ifindex, direction)
                    # a bpf filter is dumped twice: its head (no options) and itself, same prio
                    ours = {_prio(f) for f in filters if (_name(f) or "").startswith(MARK)}
                    if any(_prio(f) not in ours for f in filters):
                        return True
        finally:
            ipr.close()
        if not found or not tcx.supported():
            return False
        with (netns_mod.entered(ns) if ns else contextlib.nullcontext()):
            return any(not n.startswith(TCX_MARK) for i in found for d in PARENT for n in tcx.programs(i, d))

    def _attach(self, ns: str | None, dev: str) -> None:
        ipr = _ipr(ns)
        try:
            found = ipr.link_lookup(ifname=dev)
            if not found:
                return
            ifindex = found[0]
            if self.use_tcx and not _has_clsact(ipr, ifindex):
                self._attach_tcx(ns, ifindex)
                testhooks.pause("attaching")
                return
            if self.next_slot >= self.slots:
                return   # more devices than slots: the tracepoints still see them
            slot = self.next_slot
            self.next_slot += 1
            v = self.devs.Leaf()
            v.inum = inum = netns_inode(ns)
            v.name = dev.encode()[:15]
            self.devs[self.devs.Key(slot)] = v
            added = not _has_clsact(ipr, ifindex)   # added below, once recorded
            for direction, parent in PARENT.items():
                # Two adjacent free priorities: the slot stub, then the shared program
                # (bpf/tc.c says why), after everyone else's filters; and, when someone
                # else's filters are there (a CNI's datapath), two more before them: a program
                # that redirects (bpf_redirect_peer, bpf_redirect_neigh) or drops a packet
                # ends the hook, so only an observer before it sees that packet there.
                filters = _filters(ipr, ifindex, direction)
                used = {_prio(f) for f in filters}
                prio = PREFERRED_PRIO
                while prio in used or prio + 1 in used:
                    prio += 1
                stub_fd = self.bpf.load_func(self._stub_name(slot, direction).encode(), self._sched_cls).fd
                pairs = [(prio, stub_fd), (prio + 1, self._fd(f"pt_tc_{direction}"))]
                before = before_prio(filters, prio)
                if before is not None:
                    pairs = [(before, stub_fd), (before + 1, self._fd(f"pt_tc_{direction}"))] + pairs
                for at, fd in pairs:
                    att = Attachment(ns, dev, ifindex, direction, at, added, netns_inode=inum)
                    # Recorded before the kernel call: a SIGKILL in between still leaves a
                    # trace for `podtrace cleanup`.
                    self.attached.append(att)
                    with _state_locked():
                        _save_state(_load_state() + [asdict(att)])
                    if added and direction == "ingress" and at == pairs[0][0]:
                        _add_clsact(ipr, ifindex)
                    ipr.tc("add-filter", "bpf", ifindex, ":1", fd=fd,
                           name=att.name, parent=parent, classid=1, direct_action=True, prio=at)
                testhooks.pause("attaching")
        finally:
            ipr.close()

    def _fd(self, name: str) -> int:
        """A program of ours, loaded (verified) the first time a device needs it."""
        return self.bpf.load_func(name.encode(), self._sched_cls).fd

    def _copy(self, name: bytes) -> int:
        """A second instance of a loaded program (a tcx hook runs each program once)."""
        if name not in self._copies:
            first = self.bpf.funcs.pop(name)
            try:
                self._copies[name] = self.bpf.load_func(name, self._sched_cls).fd
            finally:
                self.bpf.funcs[name] = first
        return self._copies[name]

    def _attach_tcx(self, ns: str | None, ifindex: int) -> None:
        """Our program by a tcx link, last on the hook; and, when other programs are there
        already (a CNI's datapath on tcx), a second instance first, for the reason `_attach`
        gives."""
        with (netns_mod.entered(ns) if ns else contextlib.nullcontext()):
            for direction in PARENT:
                others = [n for n in tcx.programs(ifindex, direction) if not n.startswith(TCX_MARK)]
                self.links.append(tcx.link(self._fd(f"pt_tcx_{direction}"), ifindex, direction))
                if others:
                    self.links.append(tcx.link(self._copy(f"pt_tcx_{direction}".encode()), ifindex, direction,
                                               tcx.BPF_F_BEFORE))

    def close(self) -> None:
        for fd in reversed(self.links):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.links.clear()
        for fd in self._copies.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._copies.clear()
        mine = []
        for a in reversed(self.attached):     # the shared program before its stub
            _, pending = _remove(a.netns, a.dev, a.direction, a.prio, a.qdisc_added, name=a.name)
            if not pending:   # else the record stays: a later cleanup removes the qdisc we added
                mine.append(asdict(a))
        self.attached.clear()
        with _state_locked():
            _save_state([x for x in _load_state() if x not in mine])


def before_prio(filters, prio: int | None = None) -> int | None:
    """The first of two adjacent free priorities before every filter that is not ours, or
    None when there is no such filter (nothing to be before), no room before the first one
    (a filter at pref 1 or 2), or the pair at `prio` (and prio + 1) runs before them all
    already: a second pair would see every packet twice."""
    foreign = [_prio(f) for f in filters if not ((n := _name(f)) and n.startswith(MARK))]
    if not foreign or (prio is not None and prio + 1 < min(foreign)):
        return None
    used = {_prio(f) for f in filters}
    prio = min(foreign) - 2
    while prio >= 1 and (prio in used or prio + 1 in used):
        prio -= 1
    return prio if prio >= 1 else None


def _add_clsact(ipr, ifindex: int) -> None:
    """Add the clsact qdisc; one that another podtrace run added meanwhile will do (its
    filters and ours are then removed before it is)."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def _remove(ns: str | None, dev: str, direction: str, prio: int | None, qdisc_added: bool,
            name: str | None = None, spare_unowned: bool = False) -> tuple[list[str], bool]:
    """Delete our filter(s) on one device — the one at `prio` (and named `name`, when
    given), or all of them — except those of a podtrace process still running (and, with
    `spare_unowned`, those of the older names that carry no owner); then the clsact qdisc
    when we added it (`qdisc_added`, or the name of a filter removed says so) and nothing
    else is left on it. Returns what was removed, and whether a qdisc we added stays only
    because filters of ours are still on it, a running run's or a killed one's (a later
    cleanup can finish it)."""
    done: list[str] = []
    if ns and not netns_mod.exists(ns):
        return done, False
    ipr = _ipr(ns)
    try:
        found = ipr.link_lookup(ifname=dev)
        if not found:
            return done, False
        ifindex = found[0]
        spared = False
        for f in _filters(ipr, ifindex, direction):
            fname = _name(f)
            if not (fname and fname.startswith(MARK)) or (prio is not None and _prio(f) != prio):
                continue
            if name is not None and owner_of(fname) is not None and fname != name:
                spared = True   # another run's filter, at a priority the recorded one never got
                continue
            if _owner_running(fname) or (spare_unowned and owner_of(fname) is None):
                spared = True
                continue
            qdisc_added = qdisc_added or fname.split(":")[-1] == QDISC_FLAG
            with contextlib.suppress(Exception):
                ipr.tc("del-filter", "bpf", ifindex, ":1", parent=PARENT[direction], prio=_prio(f))
                done.append(f"tc filter {fname} on {ns or 'host'}/{dev}")
        pending = False
        if qdisc_added:
            left = [f for d in PARENT for f in _filters(ipr, ifindex, d)]
            if not left:
                with contextlib.suppress(Exception):
                    ipr.tc("del", "clsact", ifindex)
                    done.append(f"clsact qdisc on {ns or 'host'}/{dev}")
            else:
                # another run's filters of ours still there, running or killed: the qdisc
                # can go once they have (the record that says we added it stays until then)
                pending = spared or any((n := _name(f)) and n.startswith(MARK) and not _mine(n) for f in left)
    finally:
        ipr.close()
    return done, pending


def cleanup(extra_netns: list[str] | None = None, scan: bool = True) -> list[str]:
    """Remove every filter of ours whose owner is gone: those recorded in the state file (a
    killed run's), and, with `scan`, any other carrying our mark on every device of this
    namespace and of `extra_netns`. An owner is a pid and its start time: a filter or record
    of a podtrace process still running is left alone; one whose pid is dead, or now names
    another process, is removed."""
    removed: list[str] = []
    keep = []
    initial = _load_state()
    # Records of runs that added a clsact qdisc last: the filters of other dead runs on the
    # same device must be gone before the qdisc can go.
    for a in sorted(initial, key=lambda a: bool(a.get("qdisc_added"))):
        if _record_running(a):
            keep.append(a)
            continue
        where = _where(a)
        if where is _GONE:
            continue            # its namespace is gone, and the filters with its devices
        name = (filter_name(a["direction"], a["pid"], a["start"], a["qdisc_added"])
                if a.get("pid") and "start" in a else None)
        done, pending = _remove(where, a["dev"], a["direction"], a["prio"], a["qdisc_added"], name=name)
        removed += done
        if pending:
            keep.append(a)      # its qdisc goes once the other filters of ours are gone
    for ns in ([None, *(extra_netns or [])] if scan else []):
        if ns and not netns_mod.exists(ns):
            continue
        # Older filters name no owner: spare those on a device a running podtrace recorded
        # (re-read per namespace: a run that started meanwhile has recorded its devices).
        live = {(a["netns"], a["dev"]) for a in keep + _load_state() if _record_running(a)}
        ipr = _ipr(ns)
        try:
            devs = [(l.get_attr("IFLA_IFNAME"), l["index"]) for l in ipr.get_links()]
        finally:
            ipr.close()
        for dev, _ in devs:
            for direction in PARENT:
                removed += _remove(ns, dev, direction, None, False, spare_unowned=(ns, dev) in live)[0]
    # A dead run's record kept for its qdisc: the filters in its way may be gone by now
    # (a killed run's that the scan found, or one with no record here).
    for a in [a for a in keep if not _record_running(a)]:
        if (where := _where(a)) is not _GONE:
            done, pending = _remove(where, a["dev"], a["direction"], a["prio"], a["qdisc_added"])
            removed += done
            if pending:
                continue
        keep.remove(a)
    # the state file is shared by concurrent runs: drop only the records handled here
    handled = [a for a in initial if a not in keep]
    with _state_locked():
        _save_state([a for a in _load_state() if a not in handled])
    return sorted(set(removed))


_GONE = object()


def _where(a: dict):
    """The namespace a record's device is in, as `_remove` takes it: its name, None for this
    process's own, a /proc/PID/ns/net path for an unnamed one a process still holds (the
    record of an agent that ran inside a node's namespace, read from outside it), or _GONE."""
    if a.get("netns") is not None or a.get("netns_inode") is None:
        return a.get("netns")
    ino = a["netns_inode"]
    if ino == netns_inode(None):
        return None
    for name in netns_mod.list_names():
        with contextlib.suppress(OSError):
            if netns_mod.inode(name) == ino:
                return name
    for d in os.scandir("/proc"):
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{d.name}/ns/net").st_ino == ino:
                    return f"/proc/{d.name}/ns/net"
    return _GONE


def _record_running(a: dict) -> bool:
    """A state record of another podtrace process that is still running (the same process:
    same pid and, when recorded, the same start time)."""
    pid = a.get("pid")
    return bool(pid) and pid != os.getpid() and ownership.alive(pid, a.get("start"))


def forget_netns(names) -> int:
    """Drop the records of attachments in namespaces that are gone (`lab down`): nothing is
    left to remove there, whoever made them. Returns how many were dropped."""
    names = set(names)
    if not STATE_FILE.exists():
        return 0
    with _state_locked():
        items = _load_state()
        keep = [a for a in items if not (a.get("netns") in names and not netns_mod.exists(a["netns"]))]
        if len(keep) != len(items):
            _save_state(keep)
    return len(items) - len(keep)


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
