"""Compile once per kernel: the BPF bytecode BCC made, kept for the next run on this machine.

BCC compiles the C source with clang in every process (1.5–2 s, most of a `flow`'s start-up,
and three times over when three lab agents start at once). The bytecode depends only on the
source, the compile flags (the kernel's structure offsets among them), the kernel and the
BCC version; the maps it refers to are file descriptors of the compiling process. So a run
that compiled writes, under the state directory (a tmpfs: gone with the boot, so with the
kernel), each program's instructions with every map reference turned into the map's name,
and each map's kind, sizes and key/leaf types. A later run with the same key creates the
same maps itself (libbcc's map-creation call: no clang at all; BCC's tables are built on
them with the recorded types), puts their descriptors back into the instructions, and loads
the programs: the kernel's verifier checks them as always. Where this BCC lacks those calls,
the maps come from a declarations-only source instead (0.2–0.3 s of clang start-up).
Anything unexpected (another BCC, a file that does not match, a map that comes out
different) falls back to compiling.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import platform
import re
import struct
from pathlib import Path

from tracer import settings

FORMAT = 1
LD_IMM64 = 0x18
PSEUDO_MAP_FD = 1
PAGE = 4096
# BPF map type → how the declarations-only source declares it (BCC's table kinds)
KINDS = {1: "hash", 2: "array", 3: "prog", 6: "percpu_array", 9: "lru_hash", 11: "lpm_trie", 27: "ringbuf"}
_DECL = re.compile(r"BPF_(?:RINGBUF_OUTPUT|HASH|PERCPU_ARRAY|ARRAY|LPM_TRIE|PROG_ARRAY|PERCPU_HASH)\(\s*(\w+)"
                   r"|BPF_(?:F_)?TABLE\(\s*\"[^\"]+\"\s*,[^,]+,[^,]+,\s*(\w+)")


def directory() -> Path:
    return settings.state_dir() / "bpf-cache"


def key(bcc, text: bytes, flags: list[str]) -> str:
    h = hashlib.sha256()
    for part in (str(FORMAT), getattr(bcc, "__version__", "?"), _bcc_lib(bcc), platform.release(), _boot_id()):
        h.update(part.encode() + b"\0")
    h.update(text + b"\0" + "\0".join(flags).encode())
    return h.hexdigest()[:32]


def _bcc_lib(bcc) -> str:
    try:
        return os.path.realpath(bcc.libbcc.lib._name) + f":{os.stat(bcc.libbcc.lib._name).st_mtime_ns}"
    except (AttributeError, OSError):
        return "?"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "?"


@contextlib.contextmanager
def compiling(path: Path):
    """Held while one process compiles the program cached at `path` (an flock, released
    when the process ends however it ends); without a usable state directory, no lock."""
    fd = None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        if fd is not None:
            os.close(fd)
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def table_names(text: bytes) -> list[str]:
    return sorted({a or b for a, b in _DECL.findall(text.decode(errors="replace"))})


def _fdinfo(fd: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        k, _, v = line.partition(":")
        v = v.strip()
        if re.fullmatch(r"0x[0-9a-f]+", v):
            out[k.strip()] = int(v, 16)
        elif re.fullmatch(r"-?\d+", v):        # "flags" is octal with a leading 0; map fields are decimal
            out[k.strip()] = int(v, 8) if v.startswith("0") and len(v) > 1 else int(v)
    return out


def save(bcc, b, text: bytes, path: Path) -> None:
    """Write what `b` (just compiled from `text`) needs to be loaded again without clang."""
    lib = bcc.libbcc.lib
    by_fd: dict[int, str] = {}
    tables = {}
    for name in table_names(text):
        fd = lib.bpf_table_fd(b.module, name.encode())
        if fd < 0:
            continue
        info = _fdinfo(fd)
        by_fd[fd] = name
        tables[name] = {"type": info["map_type"], "key_size": info["key_size"], "value_size": info["value_size"],
                        "max_entries": info["max_entries"], "flags": info.get("map_flags", 0),
                        "key_desc": lib.bpf_table_key_desc(b.module, name.encode()).decode(),
                        "leaf_desc": lib.bpf_table_leaf_desc(b.module, name.encode()).decode()}
        if tables[name]["type"] not in KINDS:
            return                      # a kind the declarations-only source cannot make
    funcs = {}
    for i in range(lib.bpf_num_functions(b.module)):
        fname = lib.bpf_function_name(b.module, i)
        start, size = lib.bpf_function_start(b.module, fname), lib.bpf_function_size(b.module, fname)
        insns = bytearray(ctypes.string_at(start, size))
        relocs = []
        for at in range(0, len(insns) - 15, 8):
            if insns[at] == LD_IMM64 and insns[at + 1] >> 4:
                if insns[at + 1] >> 4 != PSEUDO_MAP_FD:
                    return              # a reference we do not know how to move: compile every time
                fd = struct.unpack_from("<i", insns, at + 4)[0]
                if fd not in by_fd:
                    return
                relocs.append([at, by_fd[fd]])
                struct.pack_into("<i", insns, at + 4, 0)
        funcs[fname.decode()] = {"insns": base64.b64encode(bytes(insns)).decode(), "maps": relocs}
    doc = {"format": FORMAT, "license": lib.bpf_module_license(b.module).decode(),
           "kern_version": int(lib.bpf_module_kern_version(b.module)), "tables": tables, "funcs": funcs}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


class _Maps:
    """Stands in for BCC's module handle when the maps were made here, from the cache file,
    without clang: what BCC's tables ask the module (a map's kind, flags and size) is answered
    from the recorded description."""

    def __init__(self):
        self.names: list[str] = []
        self.fds: dict[str, int] = {}
        self.info: dict[str, dict] = {}

    def add(self, name: str, fd: int, t: dict) -> None:
        self.names.append(name)
        self.fds[name] = fd
        self.info[name] = t

    def by_id(self, map_id: int) -> dict:
        return self.info[self.names[map_id]]

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


class _TableLib:
    """bcc.table's C library, with the three questions tables ask the module at creation
    answered for maps made here (a `_Maps` module); everything else goes to BCC as before."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def bpf_table_type_id(self, module, map_id):
        if isinstance(module, _Maps):
            return module.by_id(map_id)["type"]
        return self._real.bpf_table_type_id(module, map_id)

    def bpf_table_flags_id(self, module, map_id):
        if isinstance(module, _Maps):
            return module.by_id(map_id)["flags"]
        return self._real.bpf_table_flags_id(module, map_id)

    def bpf_table_max_entries_id(self, module, map_id):
        if isinstance(module, _Maps):
            return module.by_id(map_id)["max_entries"]
        return self._real.bpf_table_max_entries_id(module, map_id)


def _direct_lib(bcc):
    """libbcc with the map-creation and program-load calls declared (BCC's own Python binding
    does not declare them), and bcc.table asking `_TableLib`; None where this BCC lacks them."""
    lib = bcc.libbcc.lib
    try:
        create, prog_load = lib.bcc_create_map, lib.bcc_prog_load
    except AttributeError:
        return None
    if not hasattr(bcc, "table") or not hasattr(bcc.table, "lib") or not hasattr(bcc.table, "Table"):
        return None
    create.restype = ctypes.c_int
    create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    prog_load.restype = ctypes.c_int
    prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if not isinstance(bcc.table.lib, _TableLib):
        bcc.table.lib = _TableLib(bcc.table.lib)
    return lib


def _fits(fd: int, t: dict) -> bool:
    """The map behind `fd` is the recorded one (kind and sizes)."""
    info = _fdinfo(fd)
    return [info.get(k) for k in ("map_type", "key_size", "value_size", "max_entries")] == \
        [t["type"], t["key_size"], t["value_size"], t["max_entries"]]


def _make_maps(lib, tables: dict) -> _Maps:
    maps = _Maps()
    try:
        for name, t in sorted(tables.items()):
            fd = lib.bcc_create_map(t["type"], name.encode(), t["key_size"], t["value_size"], t["max_entries"],
                                    t["flags"])
            if fd < 0:
                raise OSError(ctypes.get_errno(), f"cannot create map {name}")
            maps.add(name, fd, t)
            if not _fits(fd, t):
                raise OSError(0, f"map {name} came out different")
    except BaseException:
        maps.close()
        raise
    return maps


def declarations(tables: dict) -> str:
    """A source that makes exactly these maps (sizes as byte arrays; the Python types of keys
    and leaves come from the recorded descriptions)."""
    out = []
    for name, t in sorted(tables.items()):
        kind = KINDS[t["type"]]
        if kind == "ringbuf":
            out.append(f"BPF_RINGBUF_OUTPUT({name}, {t['max_entries'] // PAGE});")
            continue
        if kind == "prog":
            out.append(f"BPF_PROG_ARRAY({name}, {t['max_entries']});")
            continue
        ktype = "u32" if kind in ("array", "percpu_array") else f"struct {{ unsigned char b[{t['key_size']}]; }}"
        out.append(f"typedef {ktype} pt_k_{name};")
        out.append(f"typedef struct {{ unsigned char b[{t['value_size']}]; }} pt_v_{name};")
        out.append(f'BPF_F_TABLE("{kind}", pt_k_{name}, pt_v_{name}, {name}, {t["max_entries"]}, {t["flags"]});')
    return "\n".join(out) + "\n"


def load(bcc, path: Path):
    """A BPF object made from the cache file, or None when there is none that fits."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    if any(f not in t for t in doc.get("tables", {}).values()
           for f in ("type", "key_size", "value_size", "max_entries", "flags")):
        return None
    if (lib := _direct_lib(bcc)) is not None:
        try:
            maps = _make_maps(lib, doc["tables"])
        except (OSError, KeyError, TypeError, ValueError):
            maps = None
        if maps is not None:
            if any(t not in maps.fds for f in doc["funcs"].values() for _, t in f["maps"]):
                maps.close()
                return None
            b = _cached_class(bcc)(direct=maps)
            b.pt_cached = {"license": doc["license"].encode(), "kern_version": doc["kern_version"],
                           "tables": doc["tables"], "funcs": doc["funcs"], "fds": maps.fds}
            return b
    try:
        b = _cached_class(bcc)(text=declarations(doc["tables"]).encode())
    except Exception:  # noqa: BLE001 (BCC raises bare Exception): compile instead
        return None
    lib = bcc.libbcc.lib
    fds = {}
    for name, t in doc["tables"].items():
        fd = lib.bpf_table_fd(b.module, name.encode())
        if fd < 0 or not _fits(fd, t):
            b.cleanup()
            return None
        fds[name] = fd
    if any(t not in fds for f in doc["funcs"].values() for _, t in f["maps"]):
        b.cleanup()
        return None
    b.pt_cached = {"license": doc["license"].encode(), "kern_version": doc["kern_version"],
                   "tables": doc["tables"], "funcs": doc["funcs"], "fds": fds}
    return b


_CLASS = {}


def _cached_class(bcc):
    """bcc.BPF whose programs come from the cache and whose tables have the recorded types."""
    if "cls" in _CLASS:
        return _CLASS["cls"]

    class CachedBPF(bcc.BPF):
        def __init__(self, text=None, direct=None):
            if direct is None:
                super().__init__(text=text)
                return
            # What bcc.BPF.__init__ sets, without a module: `direct` holds the maps.
            self.kprobe_fds, self.uprobe_fds, self.tracepoint_fds, self.raw_tracepoint_fds = {}, {}, {}, {}
            self.kfunc_entry_fds, self.kfunc_exit_fds, self.lsm_fds = {}, {}, {}
            self.perf_buffers, self.open_perf_events = {}, {}
            self._ringbuf_manager = None
            self.tracefile = None
            self.debug = 0
            self.funcs, self.tables = {}, {}
            self.module = direct
            atexit.register(self.cleanup)

        def close(self):
            if not isinstance(self.module, _Maps):
                return super().close()
            for name, fn in list(self.funcs.items()):
                os.close(fn.fd)
                del self.funcs[name]
            self.module.close()
            self.module = None

        def load_func(self, func_name, prog_type, device=None, attach_type=-1):
            name = func_name if isinstance(func_name, bytes) else func_name.encode()
            if name in self.funcs:
                return self.funcs[name]
            buf, insns = self._insns(name)
            lib = bcc.libbcc.lib
            if isinstance(self.module, _Maps):
                if device is not None or attach_type != -1:
                    raise Exception(f"Failed to load BPF program {name.decode()}: not from the cache")
                fd = lib.bcc_prog_load(prog_type, name, ctypes.cast(buf, ctypes.c_void_p), len(insns),
                                       self.pt_cached["license"], self.pt_cached["kern_version"], 0, None, 0)
            else:
                fd = lib.bcc_func_load(self.module, prog_type, name, ctypes.cast(buf, ctypes.c_void_p), len(insns),
                                       self.pt_cached["license"], self.pt_cached["kern_version"], 0, None, 0,
                                       device, attach_type)
            if fd < 0:
                raise Exception(f"Failed to load BPF program {name.decode()}: {os.strerror(ctypes.get_errno())}")
            fn = bcc.BPF.Function(self, name, fd)
            self.funcs[name] = fn
            return fn

        def _insns(self, name: bytes):
            """The program's instructions with this process's map descriptors in them."""
            f = self.pt_cached["funcs"].get(name.decode())
            if f is None:
                raise Exception(f"Unknown program {name.decode()}")
            insns = bytearray(base64.b64decode(f["insns"]))
            for at, table in f["maps"]:
                insns[at + 1] = (insns[at + 1] & 0x0F) | (PSEUDO_MAP_FD << 4)
                struct.pack_into("<i", insns, at + 4, self.pt_cached["fds"][table])
            return ctypes.create_string_buffer(bytes(insns), len(insns)), insns

        def verifier_stats(self, func_name, prog_type) -> dict:
            """Load the program once more, apart, with the verifier's statistics (log level 4):
            its instructions, the instructions the verifier walked, its states and its own
            time in ms. What every process that traces pays at start, for benchmarks and tests."""
            name = func_name if isinstance(func_name, bytes) else func_name.encode()
            buf, insns = self._insns(name)
            log = ctypes.create_string_buffer(1 << 16)
            fd = bcc.libbcc.lib.bcc_prog_load(prog_type, name, ctypes.cast(buf, ctypes.c_void_p), len(insns),
                                              self.pt_cached["license"], self.pt_cached["kern_version"], 4, log,
                                              len(log))
            text = log.value.decode(errors="replace")
            if fd < 0:
                raise Exception(f"Failed to load BPF program {name.decode()}: {text.strip().splitlines()[-1:]}")
            os.close(fd)
            m = re.search(r"processed (\d+) insns .*? total_states (\d+) peak_states (\d+)", text)
            t = re.search(r"verification time (\d+) usec", text)
            return {"insns": len(insns) // 8, "processed": int(m.group(1)) if m else None,
                    "states": int(m.group(2)) if m else None, "peak_states": int(m.group(3)) if m else None,
                    "verifier_ms": int(t.group(1)) / 1000 if t else None}

        def get_table(self, name, keytype=None, leaftype=None, reducer=None):
            sname = name.decode() if isinstance(name, bytes) else name
            t = self.pt_cached["tables"].get(sname)
            if t is not None:
                if keytype is None and t["type"] != 27:
                    keytype = bcc.BPF._decode_table_type(json.loads(t["key_desc"]))
                if leaftype is None:
                    leaftype = bcc.BPF._decode_table_type(json.loads(t["leaf_desc"]))
            if not isinstance(self.module, _Maps):
                return super().get_table(name, keytype, leaftype, reducer)
            if t is None:
                raise KeyError(name)
            if keytype is None:          # a ring buffer: BCC decodes its (unused) key type too
                keytype = ctypes.c_int
            return bcc.table.Table(self, self.module.names.index(sname), self.module.fds[sname], keytype,
                                   leaftype, sname.encode(), reducer=reducer)

    _CLASS["cls"] = CachedBPF
    return CachedBPF
