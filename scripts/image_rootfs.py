#!/usr/bin/env python3
"""Build the agent image's root filesystem without Docker, by interpreting manifests/Dockerfile,
and run a command in it the way manifests/daemonset.yaml runs the container.

    image_rootfs.py check [--dockerfile F] [--context DIR]       parse only (no root needed)
    image_rootfs.py build [--dockerfile F] [--context DIR] ROOTFS
    image_rootfs.py run [--all-caps] [--rw] ROOTFS -- CMD [ARG...]

Normally called through scripts/image-rootfs.sh. Only the standard library: runs with the
system python3, not the project's venv.

build: FROM debian:12-slim is `debootstrap --variant=minbase bookworm` (cached) plus what
the official slim image adds (the dpkg path excludes of debuerreotype's --slim, the
docker-* apt settings, no apt lists, deb822 sources). ENV is exported into later RUN steps,
WORKDIR is their cwd (created), COPY copies from the build context (honouring
.dockerignore), RUN runs `/bin/sh -c` in a chroot with /proc, /dev and /sys mounted and the
host's resolv.conf. USER must be root; ENTRYPOINT/CMD are recorded in ROOTFS.image.json.
Anything else is refused with one line. The rootfs after each RUN step is cached by a hash
of everything before it, like Docker's layer cache, so a rebuild reruns only what changed.

Every mount is made in a private mount namespace (the script re-executes itself under
`unshare --mount`), so none can outlive the process; they are also unmounted explicitly.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "manifests" / "Dockerfile"
DAEMONSET = REPO / "manifests" / "daemonset.yaml"
CACHE = Path(os.environ.get("PODTRACE_IMAGE_CACHE", "/var/tmp/podtrace-image/cache"))
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASES = {"debian:12-slim": "bookworm", "debian:bookworm-slim": "bookworm"}
KNOWN = {"FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "ENTRYPOINT", "CMD", "LABEL"}
_NS_MARK = "PODTRACE_IMAGE_ROOTFS_NS"


class Refused(Exception):
    """A Dockerfile this interpreter cannot follow faithfully: one line, exit 2."""


# ---------------------------------------------------------------- parsing


@dataclass
class Instr:
    line: int           # 1-based line of the instruction's first line
    op: str             # upper case
    args: str           # continuation lines joined, comment lines dropped
    text: str = ""      # the original text, for error messages


def parse(text: str, name: str = "Dockerfile") -> list[Instr]:
    lines = text.splitlines()
    for ln in lines:    # parser directives come first; escape= would change what `\` means
        s = ln.strip()
        if not s.startswith("#"):
            break
        if re.match(r"#\s*escape\s*=", s, re.I):
            raise Refused(f"{name}: the `# escape=` parser directive is not supported")
    out: list[Instr] = []
    buf: list[str] = []
    start = 0
    for i, raw in enumerate(lines, 1):
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and (s.startswith("#") or not s):     # comments and blank lines inside a continuation
            continue
        if not buf:
            start = i
        cont = raw.rstrip().endswith("\\")
        buf.append(raw.rstrip()[:-1] if cont else raw)
        if not cont:
            out.append(_instr(start, "".join(buf), name))
            buf = []
    if buf:
        raise Refused(f"{name}:{start}: the file ends inside a `\\` continuation")
    return out


def _instr(line: int, joined: str, name: str) -> Instr:
    parts = joined.strip().split(None, 1)
    op = parts[0].upper()
    args = parts[1].strip() if len(parts) > 1 else ""
    ins = Instr(line, op, args, joined.strip())
    if op not in KNOWN:
        raise Refused(f"{name}:{line}: instruction {parts[0]} is not understood by scripts/image_rootfs.py "
                      f"(it knows {', '.join(sorted(KNOWN))}); teach it before using it")
    if re.search(r"<<-?\s*['\"]?[A-Za-z_]", args) and op in ("RUN", "COPY"):
        raise Refused(f"{name}:{line}: heredocs (<<WORD) in {op} are not supported")
    if op in ("COPY", "ADD", "RUN") and re.match(r"--\w", args):
        raise Refused(f"{name}:{line}: {op} flags ({args.split()[0]}) are not supported")
    if op not in ("RUN", "CMD", "ENTRYPOINT") and "$" in args:
        raise Refused(f"{name}:{line}: variable substitution in {op} is not supported")
    return ins


def _json_form(args: str) -> list[str] | None:
    if not args.startswith("["):
        return None
    try:
        v = json.loads(args)
    except json.JSONDecodeError:
        return None          # Docker then takes it as the shell form
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    return None


def parse_env(args: str, ins: Instr) -> list[tuple[str, str]]:
    words = shlex.split(args, posix=True)
    if words and "=" not in words[0]:       # legacy `ENV KEY value with spaces`
        if len(words) < 2:
            raise Refused(f"line {ins.line}: ENV without a value")
        return [(words[0], args.split(None, 1)[1].strip())]
    pairs = []
    for w in words:
        if "=" not in w:
            raise Refused(f"line {ins.line}: ENV word {w!r} is not KEY=VALUE")
        k, v = w.split("=", 1)
        pairs.append((k, v))
    return pairs


# ---------------------------------------------------------------- .dockerignore


def _pattern_re(p: str) -> re.Pattern:
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif p.startswith("**", i):
            out += ".*"
            i += 2
        elif p[i] == "*":
            out += "[^/]*"
            i += 1
        elif p[i] == "?":
            out += "[^/]"
            i += 1
        elif p[i] == "[":
            j = p.find("]", i)
            if j < 0:
                raise Refused(f".dockerignore: unbalanced [ in {p!r}")
            out += p[i:j + 1].replace("[!", "[^")
            i = j + 1
        else:
            out += re.escape(p[i])
            i += 1
    return re.compile(out + r"\Z")


class Ignore:
    """.dockerignore: Go filepath.Match patterns with `**`, `!` exceptions, last match wins;
    a path is excluded when it or one of its parent directories is."""

    def __init__(self, context: Path):
        self.rules: list[tuple[bool, re.Pattern]] = []
        f = context / ".dockerignore"
        if f.exists():
            for ln in f.read_text().splitlines():
                ln = ln.strip()
                if not ln or ln.startswith("#"):
                    continue
                neg = ln.startswith("!")
                pat = os.path.normpath(ln[1:].strip() if neg else ln).lstrip("/")
                self.rules.append((neg, _pattern_re(pat)))

    def ignored(self, rel: str) -> bool:
        parts = rel.split("/")
        for n in range(1, len(parts) + 1):
            sub = "/".join(parts[:n])
            hit = False
            for neg, rx in self.rules:
                if rx.match(sub):
                    hit = not neg
            if hit:
                return True
        return False


# ---------------------------------------------------------------- COPY


def copy_sources(ins: Instr, context: Path, ignore: Ignore) -> tuple[list[Path], str]:
    words = _json_form(ins.args) or shlex.split(ins.args)
    if len(words) < 2:
        raise Refused(f"line {ins.line}: COPY needs a source and a destination")
    *srcs, dst = words
    paths: list[Path] = []
    for s in srcs:
        if os.path.isabs(s) or ".." in Path(s).parts:
            raise Refused(f"line {ins.line}: COPY source {s!r} is outside the build context")
        hits = sorted(context.glob(s)) if any(c in s for c in "*?[") else [context / s]
        hits = [h for h in hits if h.exists() and not ignore.ignored(h.relative_to(context).as_posix())]
        if not hits:
            raise Refused(f"line {ins.line}: COPY source {s!r} does not exist in the build context {context}"
                          + (" (or .dockerignore excludes it)" if (context / s).exists() else ""))
        paths += hits
    return paths, dst


def _files(context: Path, src: Path, ignore: Ignore):
    if src.is_dir() and not src.is_symlink():
        for dirpath, dirnames, filenames in os.walk(src):
            d = Path(dirpath)
            dirnames[:] = sorted(n for n in dirnames if not ignore.ignored((d / n).relative_to(context).as_posix()))
            yield d
            for n in sorted(filenames):
                p = d / n
                if not ignore.ignored(p.relative_to(context).as_posix()):
                    yield p
    else:
        yield src


def content_hash(context: Path, srcs: list[Path], ignore: Ignore) -> str:
    h = hashlib.sha256()
    for s in srcs:
        for p in _files(context, s, ignore):
            st = p.lstat()
            h.update(f"{p.relative_to(context).as_posix()}\0{st.st_mode:o}\0".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def do_copy(root: Path, workdir: str, context: Path, ignore: Ignore, srcs: list[Path], dst: str) -> None:
    dst_abs = dst if dst.startswith("/") else os.path.join(workdir, dst)
    as_dir = dst.endswith("/") or dst in (".", "./") or len(srcs) > 1
    target = root / dst_abs.lstrip("/")
    for s in srcs:
        if s.is_dir():
            base = target       # a directory's contents go into the destination
            for p in _files(context, s, ignore):
                out = base / p.relative_to(s)
                _copy_one(p, out)
        else:
            out = target / s.name if (as_dir or target.is_dir()) else target
            _copy_one(s, out)


def _copy_one(p: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if p.is_symlink():
        if out.is_symlink() or out.exists():
            out.unlink()
        os.symlink(os.readlink(p), out)
    elif p.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copystat(p, out)
    else:
        shutil.copy2(p, out)
    os.lchown(out, 0, 0)        # COPY without --chown: owned by root


# ---------------------------------------------------------------- mounts


class Mounts:
    def __init__(self):
        self.done: list[Path] = []

    def mount(self, *argv: str, target: Path) -> None:
        subprocess.run(["mount", *argv, str(target)], check=True)
        self.done.append(target)

    def bind(self, src: str, target: Path, ro: bool = False, recursive: bool = False) -> None:
        self.mount("--rbind" if recursive else "--bind", src, target=target)
        if recursive:   # never propagate an unmount back to the host's copy
            subprocess.run(["mount", "--make-rslave", str(target)], check=True)
        if ro:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)

    def close(self) -> None:
        for t in reversed(self.done):
            r = subprocess.run(["umount", "-R", str(t)], capture_output=True)
            if r.returncode:
                subprocess.run(["umount", "-R", "-l", str(t)], capture_output=True)
        self.done.clear()


def in_private_namespace() -> None:
    """Re-execute under `unshare --mount` so every mount dies with this process."""
    if os.environ.get(_NS_MARK) == "1":
        return
    if os.geteuid() != 0:
        sys.exit("image_rootfs: must run as root (debootstrap, chroot, mounts)")
    env = dict(os.environ, **{_NS_MARK: "1"})
    os.execvpe("unshare", ["unshare", "--mount", "--propagation", "slave", sys.executable,
                           os.path.abspath(__file__), *sys.argv[1:]], env)


def _no_mounts_under(root: Path) -> None:
    r = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True)
    under = [t for t in r.stdout.split() if t == str(root) or t.startswith(str(root) + "/")]
    if under:
        raise SystemExit(f"image_rootfs: refusing to touch {root}: mounts under it: {' '.join(under)}")


# ---------------------------------------------------------------- FROM


def host_mirrors() -> tuple[str, str]:
    """(debian mirror, security mirror) of this machine's apt sources."""
    mirror = security = None
    files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for f in files:
        if not f.is_file() or f.suffix not in (".list", ".sources"):
            continue
        entries: list[tuple[list[str], list[str], bool]] = []   # (uris, suites, enabled)
        if f.suffix == ".list":
            for ln in f.read_text().splitlines():
                w = re.sub(r"\[[^]]*\]", "", ln.split("#", 1)[0]).split()
                if len(w) >= 3 and w[0] == "deb":
                    entries.append(([w[1]], [w[2]], True))
        else:
            for stanza in re.split(r"\n\s*\n", f.read_text()):
                kv = {}
                for ln in stanza.splitlines():
                    if ln.startswith("#") or ":" not in ln:
                        continue
                    k, v = ln.split(":", 1)
                    kv[k.strip().lower()] = v.split()
                types = kv.get("types", [])
                enabled = kv.get("enabled", ["yes"])[0].lower() != "no"
                if "deb" in types:
                    entries.append((kv.get("uris", []), kv.get("suites", []), enabled))
        for uris, suites, enabled in entries:
            if not enabled or not uris:
                continue
            if "bookworm" in suites and mirror is None:
                mirror = uris[0]
            if "bookworm-security" in suites and security is None:
                security = uris[0]
    return (mirror or "http://deb.debian.org/debian").rstrip("/"), \
        (security or "http://deb.debian.org/debian-security").rstrip("/")


# What the official debian:*-slim image adds on top of a minbase debootstrap
# (debuerreotype: --slim dpkg excludes, and the docker-* apt settings).
SLIM_DPKG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
"""
APT_CONF = {
    "docker-clean": 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                    '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
                    'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                    '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
                    'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n',
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true";\nAcquire::CompressionTypes::Order:: "gz";\n',
    "docker-no-languages": 'Acquire::Languages "none";\n',
}


def base_key(suite: str) -> str:
    mirror, security = host_mirrors()
    return hashlib.sha256(f"{suite}\0minbase\0{mirror}\0{security}\0{SLIM_DPKG}\0{APT_CONF}".encode()).hexdigest()[:16]


def ensure_base(suite: str, log) -> Path:
    mirror, security = host_mirrors()
    key = base_key(suite)
    base = CACHE / f"base-{suite}-{key}"
    if (base / ".podtrace-base-complete").exists():
        log(f"FROM: cached debootstrap {base}")
        return base
    tmp = CACHE / f"base-{suite}-{key}.tmp"
    _no_mounts_under(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    log(f"FROM: debootstrap --variant=minbase {suite} from {mirror} (once; cached in {base})")
    t = time.monotonic()
    subprocess.run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}", suite, str(tmp), mirror],
                   check=True, stdout=subprocess.DEVNULL)
    (tmp / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (tmp / "etc/dpkg/dpkg.cfg.d/docker").write_text(SLIM_DPKG)
    for n, body in APT_CONF.items():
        (tmp / "etc/apt/apt.conf.d" / n).write_text(body)
    for f in (tmp / "etc/apt/sources.list",):
        f.unlink(missing_ok=True)
    (tmp / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {mirror}\nSuites: {suite} {suite}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {suite}-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    # What --slim excludes, removed from what debootstrap already unpacked.
    for d in ("usr/share/groff", "usr/share/info", "usr/share/linda", "usr/share/lintian", "usr/share/man"):
        for p in (tmp / d).glob("*"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in (tmp / "usr/share/locale").glob("*"):
        if p.name != "locale.alias":
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in (tmp / "usr/share/doc").glob("*"):
        if p.is_dir() and not p.is_symlink():
            for q in p.iterdir():
                if q.name != "copyright":
                    shutil.rmtree(q) if q.is_dir() and not q.is_symlink() else q.unlink()
    shutil.rmtree(tmp / "var/lib/apt/lists", ignore_errors=True)
    (tmp / "var/lib/apt/lists/partial").mkdir(parents=True)
    subprocess.run(["chroot", str(tmp), "apt-get", "clean"], check=True)
    (tmp / "etc/resolv.conf").unlink(missing_ok=True)
    (tmp / "etc/hostname").unlink(missing_ok=True)
    (tmp / ".podtrace-base-complete").write_text(f"{suite} {mirror} {time.ctime()}\n")
    tmp.rename(base)
    log(f"FROM: base ready in {time.monotonic() - t:.0f}s")
    return base


# ---------------------------------------------------------------- build


@dataclass
class State:
    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    workdir: str = "/"
    user: str = "root"
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    suite: str | None = None


def plan(dockerfile: Path, context: Path) -> list[tuple[Instr, str]]:
    """Every instruction with its cumulative cache key (raises Refused)."""
    ins = parse(dockerfile.read_text(), str(dockerfile))
    if not ins or ins[0].op != "FROM":
        raise Refused(f"{dockerfile}: the first instruction must be FROM")
    ignore = Ignore(context)
    out = []
    h = hashlib.sha256()
    for i in ins:
        if i.op == "FROM":
            if i is not ins[0]:
                raise Refused(f"{dockerfile}:{i.line}: multi-stage builds (a second FROM) are not supported")
            w = i.args.split()
            if len(w) != 1 or w[0] not in BASES:
                raise Refused(f"{dockerfile}:{i.line}: FROM {i.args}: only {', '.join(BASES)} can be built "
                              "(as a debootstrap minbase)")
            h.update(base_key(BASES[w[0]]).encode())
        elif i.op == "COPY":
            srcs, _ = copy_sources(i, context, ignore)
            h.update(content_hash(context, srcs, ignore).encode())
        elif i.op == "ENV":
            parse_env(i.args, i)
        elif i.op == "USER":
            if i.args not in ("0", "root", "0:0", "root:root"):
                raise Refused(f"{dockerfile}:{i.line}: USER {i.args}: only root can be built and run here")
        elif i.op in ("CMD", "ENTRYPOINT"):
            if _json_form(i.args) is None:
                raise Refused(f"{dockerfile}:{i.line}: {i.op} in shell form is not supported; use the JSON form")
        h.update(f"{i.op}\0{i.args}\0".encode())
        out.append((i, h.hexdigest()[:20]))
    return out


HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA = "/run/podtrace-build-ca.crt"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


def _run_env(st: State, ca: bool) -> dict[str, str]:
    # Like Docker's predefined proxy ARGs: the host's proxy settings reach RUN steps, not the image.
    env = {"HOME": "/root", "HOSTNAME": "podtrace-image-build",
           **{k: v for k, v in os.environ.items() if k in PROXY_VARS}, **st.env}
    if ca:    # the host's CA bundle, for networks that intercept TLS (see use_host_ca)
        env.update(SSL_CERT_FILE=BUILD_CA, PIP_CERT=BUILD_CA, REQUESTS_CA_BUNDLE=BUILD_CA, CURL_CA_BUNDLE=BUILD_CA)
    return env


def use_host_ca() -> bool:
    """On a network whose proxy intercepts TLS, the host trusts an extra CA that the image does
    not; `docker build` there needs the same (a BuildKit secret mount, or the proxy's CA).
    RUN steps get the host's bundle bind-mounted at BUILD_CA with SSL_CERT_FILE/PIP_CERT
    pointing at it: nothing of it stays in the image. PODTRACE_IMAGE_HOST_CA=0 turns it off."""
    return os.environ.get("PODTRACE_IMAGE_HOST_CA", "1") != "0" and HOST_CA.is_file()


def run_step(root: Path, st: State, i: Instr) -> None:
    argv = _json_form(i.args) or ["/bin/sh", "-c", i.args]
    m = Mounts()
    created_resolv = False
    try:
        m.mount("-t", "proc", "proc", target=root / "proc")
        m.bind("/dev", root / "dev")
        m.mount("-t", "sysfs", "sysfs", target=root / "sys")
        resolv = root / "etc/resolv.conf"
        if not resolv.exists() and not resolv.is_symlink():
            resolv.touch()
            created_resolv = True
        m.bind("/etc/resolv.conf", resolv)
        ca = use_host_ca()
        if ca:
            (root / BUILD_CA.lstrip("/")).touch()
            m.bind(str(HOST_CA), root / BUILD_CA.lstrip("/"), ro=True)
        wd = st.workdir

        def enter():
            os.chroot(root)
            os.chdir(wd)

        r = subprocess.run(argv, preexec_fn=enter, env=_run_env(st, ca))
        if r.returncode:
            raise SystemExit(f"image_rootfs: line {i.line}: RUN failed with exit {r.returncode}")
    finally:
        m.close()
        if created_resolv:
            resolv.unlink(missing_ok=True)
        (root / BUILD_CA.lstrip("/")).unlink(missing_ok=True)


def _cp_tree(src: Path, dst: Path) -> None:
    _no_mounts_under(dst)
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dst)], check=True)


def build(dockerfile: Path, context: Path, root: Path) -> dict:
    t0 = time.monotonic()
    log = lambda s: print(f"image_rootfs: {s}", file=sys.stderr, flush=True)  # noqa: E731
    steps = plan(dockerfile, context)
    final = steps[-1][1]
    meta_file = Path(str(root) + ".image.json")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("key") == final and (root / "etc/debian_version").exists():
        log(f"{root} is up to date with {dockerfile} (key {final}); nothing to do")
        return meta
    _no_mounts_under(root)
    layers = CACHE / "layers"
    keys = [k for _, k in steps]
    resume = max((n for n, (i, k) in enumerate(steps) if i.op == "RUN" and (layers / k).exists()), default=-1)
    meta_file.unlink(missing_ok=True)
    ignore = Ignore(context)
    st = State()
    for n, (i, key) in enumerate(steps):
        skip = n <= resume
        tag = f"step {n + 1}/{len(steps)} (line {i.line}) {i.op}"
        if i.op == "FROM":
            st.suite = BASES[i.args.split()[0]]
            if resume < 0:
                base = ensure_base(st.suite, log)
                log(f"{tag}: copying the base into {root}")
                _cp_tree(base, root)
        elif i.op == "ENV":
            st.env.update(parse_env(i.args, i))
        elif i.op == "WORKDIR":
            st.workdir = os.path.normpath(os.path.join(st.workdir, i.args))
            if not skip:
                (root / st.workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif i.op == "COPY":
            if not skip:
                srcs, dst = copy_sources(i, context, ignore)
                do_copy(root, st.workdir, context, ignore, srcs, dst)
                log(f"{tag} {i.args}")
        elif i.op == "RUN":
            if n == resume:
                log(f"{tag}: cached layer {key}")
                _cp_tree(layers / key, root)
            elif not skip:
                log(f"{tag}: {i.args[:100]}{'…' if len(i.args) > 100 else ''}")
                t = time.monotonic()
                run_step(root, st, i)
                log(f"{tag}: done in {time.monotonic() - t:.0f}s; caching the layer")
                _cp_tree(root, layers / key)
        elif i.op == "USER":
            st.user = i.args
        elif i.op == "ENTRYPOINT":
            st.entrypoint = _json_form(i.args)
        elif i.op == "CMD":
            st.cmd = _json_form(i.args)
        # LABEL: metadata only
    if layers.exists():     # keep only this build's chain
        for d in layers.iterdir():
            if d.name not in keys:
                shutil.rmtree(d, ignore_errors=True)
    meta = {"key": final, "dockerfile": str(dockerfile), "env": st.env, "workdir": st.workdir,
            "user": st.user, "entrypoint": st.entrypoint or [], "cmd": st.cmd or [],
            "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.monotonic() - t0, 1)}
    meta_file.write_text(json.dumps(meta, indent=1) + "\n")
    log(f"built {root} in {meta['seconds']}s")
    return meta


# ---------------------------------------------------------------- run like the DaemonSet


CAPS = {"NET_ADMIN": 12, "NET_RAW": 13, "SYS_ADMIN": 21, "SYS_RESOURCE": 24, "PERFMON": 38, "BPF": 39}
PR_CAPBSET_DROP = 24


def daemonset_container() -> dict:
    """What run needs from manifests/daemonset.yaml, read with a minimal YAML subset reader
    would be fragile: use PyYAML when present, else the values this script was written for."""
    try:
        import yaml  # type: ignore
    except ImportError:
        return {}
    for d in yaml.safe_load_all(DAEMONSET.read_text()):
        if d and d.get("kind") == "DaemonSet":
            spec = d["spec"]["template"]["spec"]
            return {"container": spec["containers"][0], "volumes": spec["volumes"]}
    return {}


FALLBACK_MOUNTS = [  # (host path, container path, read-only, propagation)
    ("/sys/kernel/debug", "/sys/kernel/debug", True), ("/sys/kernel/tracing", "/sys/kernel/tracing", True),
    ("/sys/fs/bpf", "/sys/fs/bpf", True), ("/lib/modules", "/lib/modules", True),
    ("/usr/src", "/usr/src", True), ("/run/netns", "/run/netns", True), ("/proc", "/host/proc", True),
]
FALLBACK_EMPTYDIRS = [("/tmp", "64m"), ("/run/podtrace", "16m")]
FALLBACK_ENV = {"PODTRACE_HOST_PROC": "/host/proc", "PODTRACE_STATE_DIR": "/run/podtrace"}


def daemonset_shape() -> tuple[list, list, dict, list[str]]:
    ds = daemonset_container()
    if not ds:
        return FALLBACK_MOUNTS, FALLBACK_EMPTYDIRS, dict(FALLBACK_ENV, NODE_NAME=os.uname().nodename,
                                                          POD_NAMESPACE="podtrace"), sorted(CAPS)
    c, vols = ds["container"], {v["name"]: v for v in ds["volumes"]}
    host, empty = [], []
    for m in c.get("volumeMounts", []):
        v = vols[m["name"]]
        if "hostPath" in v:
            host.append((v["hostPath"]["path"], m["mountPath"], bool(m.get("readOnly"))))
        elif "emptyDir" in v:
            empty.append((m["mountPath"], str(v["emptyDir"].get("sizeLimit", "64Mi")).replace("Mi", "m")))
        else:
            raise SystemExit(f"image_rootfs: volume {m['name']} is neither hostPath nor emptyDir")
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[e["name"]] = os.uname().nodename
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[e["name"]] = "podtrace"
    caps = c.get("securityContext", {}).get("capabilities", {}).get("add", [])
    return host, empty, env, caps


def run_in(root: Path, argv: list[str], all_caps: bool, rw: bool) -> int:
    meta = json.loads(Path(str(root) + ".image.json").read_text())
    host, empty, ds_env, caps = daemonset_shape()
    unknown = [c for c in caps if c not in CAPS]
    if unknown and not all_caps:
        raise SystemExit(f"image_rootfs: capability numbers unknown for {unknown}")
    m = Mounts()
    try:
        m.bind(str(root), root)          # so the root can be made read-only below
        for _, dst, _ in host:          # mount points, as the runtime creates them (sysfs has its own)
            if not dst.startswith("/sys/"):
                (root / dst.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for dst, _ in empty:
            (root / dst.lstrip("/")).mkdir(parents=True, exist_ok=True)
        m.mount("-t", "proc", "proc", target=root / "proc")
        m.bind("/dev", root / "dev")
        # A container without `privileged` gets /sys read-only.
        m.mount("-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", target=root / "sys")
        for src, dst, ro in host:
            if not os.path.exists(src):
                os.makedirs(src)         # hostPath type DirectoryOrCreate
            m.bind(src, root / dst.lstrip("/"), ro=ro, recursive=True)
        for dst, size in empty:
            m.mount("-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", target=root / dst.lstrip("/"))
        if os.path.exists(root / "etc/resolv.conf"):
            m.bind("/etc/resolv.conf", root / "etc/resolv.conf", ro=True)
        if not rw:                       # readOnlyRootFilesystem: true
            subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True)
        env = {"HOSTNAME": os.uname().nodename, "HOME": "/root", **meta["env"], **ds_env}
        drop = [] if all_caps else [n for n in range(int(Path("/proc/sys/kernel/cap_last_cap").read_text()) + 1)
                                    if n not in {CAPS[c] for c in caps}]
        wd = meta.get("workdir") or "/"
        libc = ctypes.CDLL(None, use_errno=True)

        def enter():
            os.chroot(root)
            os.chdir(wd)
            for n in drop:   # capabilities: drop ALL, add the DaemonSet's (root: permitted = bounding)
                if libc.prctl(PR_CAPBSET_DROP, n, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), f"PR_CAPBSET_DROP {n}")

        signal.signal(signal.SIGINT, signal.SIG_IGN)   # the child gets it; we clean up after
        r = subprocess.run(argv or (meta["entrypoint"] + meta["cmd"]), preexec_fn=enter, env=env)
        return r.returncode
    finally:
        m.close()


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("check", "build"):
        p = sub.add_parser(name)
        p.add_argument("--dockerfile", type=Path, default=DOCKERFILE)
        p.add_argument("--context", type=Path, default=REPO)
        if name == "build":
            p.add_argument("rootfs", type=Path)
    p = sub.add_parser("run")
    p.add_argument("--all-caps", action="store_true", help="keep every capability (default: the DaemonSet's)")
    p.add_argument("--rw", action="store_true", help="a writable root (default: read-only, like the DaemonSet)")
    p.add_argument("rootfs", type=Path)
    p.add_argument("argv", nargs="*")
    a = ap.parse_args()
    try:
        if a.what == "check":
            for i, key in plan(a.dockerfile.resolve(), a.context.resolve()):
                print(f"ok  line {i.line:3d}  {i.op:10s} {i.args[:90]}{'…' if len(i.args) > 90 else ''}")
            return 0
        in_private_namespace()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
        if a.what == "build":
            build(a.dockerfile.resolve(), a.context.resolve(), a.rootfs.resolve())
            return 0
        return run_in(a.rootfs.resolve(), a.argv, a.all_caps, a.rw)
    except Refused as exc:
        print(f"image_rootfs: refused: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
