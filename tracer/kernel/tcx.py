"""tcx: tc programs attached through BPF links (Linux 6.6 and later), without a qdisc.

Adding a `clsact` qdisc to a device, and removing it, makes the kernel deactivate the
device's transmit queues for a moment (qdisc_graft → dev_deactivate): what the device
sends meanwhile is dropped (QDISC_DROP). A tcx link needs no qdisc, so attaching and
detaching drops nothing, and the link goes with the file descriptor that holds it: a
killed podtrace leaves nothing on the device. tcx programs run before any classic tc
filter of the same hook; ours return TC_ACT_UNSPEC (TCX_NEXT), so whatever follows decides.

BCC has no call for BPF links; the two bpf(2) commands are made here with ctypes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
ATTACH_TYPE = {"ingress": 46, "egress": 47}      # BPF_TCX_INGRESS, BPF_TCX_EGRESS
BPF_F_BEFORE = 1 << 3
BPF_F_AFTER = 1 << 4

# the process's own symbols, libc's among them: no `ldconfig -p` child (find_library runs
# one), which an agent killed while importing would leave behind
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: bytearray) -> int:
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    ret = _libc.syscall(_NR_BPF, cmd, buf, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def link(prog_fd: int, ifindex: int, direction: str, flags: int = 0, relative_fd: int = 0) -> int:
    """Attach `prog_fd` to the device `ifindex` of this thread's network namespace; returns
    the link's file descriptor (closing it detaches the program). Without flags the program
    goes last; BPF_F_BEFORE / BPF_F_AFTER place it before or after `relative_fd`'s program
    (or first / last when `relative_fd` is 0)."""
    attr = bytearray(64)
    struct.pack_into("=IIII", attr, 0, prog_fd, ifindex, ATTACH_TYPE[direction], flags)
    struct.pack_into("=I", attr, 16, relative_fd)       # link_create.tcx.relative_fd
    return _bpf(BPF_LINK_CREATE, attr)


def count(ifindex: int, direction: str) -> int:
    """How many tcx programs the device's hook runs now (this thread's namespace)."""
    attr = bytearray(64)
    struct.pack_into("=II", attr, 0, ifindex, ATTACH_TYPE[direction])
    _bpf(BPF_PROG_QUERY, attr)
    return struct.unpack_from("=I", attr, 24)[0]          # query.prog_cnt


def programs(ifindex: int, direction: str) -> list[str]:
    """The names of the programs the device's tcx hook runs, in order (this thread's
    namespace); a program gone meanwhile is left out."""
    n = count(ifindex, direction)
    if not n:
        return []
    ids = (ctypes.c_uint32 * (n + 8))()
    attr = bytearray(64)
    struct.pack_into("=II", attr, 0, ifindex, ATTACH_TYPE[direction])
    struct.pack_into("=QI", attr, 16, ctypes.addressof(ids), n + 8)    # query.prog_ids, prog_cnt
    _bpf(BPF_PROG_QUERY, attr)
    names = []
    for pid in list(ids)[:struct.unpack_from("=I", attr, 24)[0]]:
        try:
            names.append(prog_name(pid))
        except OSError:
            pass
    return names


def prog_name(prog_id: int) -> str:
    """A loaded program's name (the kernel keeps its first 15 characters)."""
    attr = bytearray(64)
    struct.pack_into("=I", attr, 0, prog_id)
    fd = _bpf(BPF_PROG_GET_FD_BY_ID, attr)
    try:
        info = (ctypes.c_char * 256)()
        attr = bytearray(64)
        struct.pack_into("=IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
        return bytes(info[64:80]).split(b"\0", 1)[0].decode(errors="replace")   # bpf_prog_info.name
    finally:
        os.close(fd)


_supported: bool | None = None


def supported() -> bool:
    """This kernel attaches tc programs by tcx (6.6 and later): a tcx query of the loopback
    device (ifindex 1 in every namespace) works; older kernels refuse the attach type."""
    global _supported
    if _supported is None:
        try:
            count(1, "ingress")
            _supported = True
        except OSError:
            _supported = False
    return _supported
