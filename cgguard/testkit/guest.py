"""A throwaway pure cgroup-v2 guest for tests: build it, boot it, run one command in it.

The host is hybrid (cgroup v1 controllers, an empty cgroup2), so whatever needs ``pids.*``,
``cgroup.kill`` on a controller-enabled tree or a real fork bomb runs in a QEMU guest instead:
Debian's generic kernel booted with ``cgroup_no_v1=all``, a busybox initramfs (``init.sh``) that
mounts the host's ``/`` read-only over 9p and a second, writable 9p share for the results. The
job therefore sees the repository and the Python environment at the same absolute paths as the
host.

KVM is unusable here, so the guest runs under TCG (software emulation) on q35 (microvm hung on
boot too often). Booting the uncompressed kernel takes 2-6 s here (vmlinuz: 7-10 s); emulation
is 2-5x slower on other machines and follows the host's load, so nothing inside the guest may
depend on timing. The job sees the host's tree read-only except /tmp, /var/tmp, /run and
/dev/shm (the guest's own tmpfs) and GUEST_RESULTS (shared back).

Time budget. Every wait inside the guest is on a condition, so a timeout only ever ends a hang
and a generous one costs a passing run nothing. The budgets are therefore fixed and large
rather than scaled by a speed measured at boot: a calibration loop measures one moment of a host
whose load changes over the run, and a budget scaled from it fails the way a tight fixed one
does. A pytest job reports its plan as it goes (``GUEST_RESULTS/report.jsonl``, written by the
pytest plugin in this module): qemu gets BOOT_BUDGET_S to boot and collect, then, once the job
has said how many tests it runs, ``guest_budget(n)`` in all: PER_TEST_BUDGET_S per test (the
slowest takes ~20 s here) plus one TEST_TIMEOUT_S, so that even a run in which one test hangs
until pytest-timeout stops it ends with pytest's report, not with qemu killed. The same report
keeps the results of the tests that finished if qemu is killed all the same.

Environment: CGGUARD_GUEST_TIMEOUT (fixed seconds before qemu is killed, instead of the derived
budget), CGGUARD_GUEST_CACHE (see below).

Build products are cached under ``$CGGUARD_GUEST_CACHE`` (default /var/tmp/cgguard-guest), keyed
by the kernel and busybox package versions and the initramfs inputs, so a rerun only boots.

CLI for developers::

    python -m cgguard.testkit.guest                       # the guest tests, as tests/guest/test_guest.py runs them
    python -m cgguard.testkit.guest -- pytest tests/guest/inside -q -k bomb
    python -m cgguard.testkit.guest --build-only          # fetch and build, print the image paths
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INIT_SH = Path(__file__).with_name("guest_init.sh")
CACHE = Path(os.environ.get("CGGUARD_GUEST_CACHE", "/var/tmp/cgguard-guest"))
QEMU = "qemu-system-x86_64"

# Where the writable results share is mounted inside the guest (init.sh mounts it there).
GUEST_RESULTS = "/run/guest-results"
# init.sh prints this once the guest is up and the job starts: the end of the boot.
START_MARKER = "cgguard-guest: starting job"

KERNEL_META = "linux-image-amd64"  # the generic flavour: the -cloud- one lacks 9p
BUSYBOX = "busybox-static"
QEMU_PACKAGE = "qemu-system-x86"
# Modules the initramfs loads (their dependencies are added from their .modinfo).
ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
# Bump when the image layout changes in a way the cache key does not see.
IMAGE_FORMAT = 1

CMDLINE = "console=ttyS0 quiet panic=-1 cgroup_no_v1=all"

# Budgets, in seconds (see the module's doc); hang guards, not expectations. Measured on the
# 2-core development host: boot 3-10 s, pytest start and collection 10-20 s, the slowest passing
# guest test 20 s when the host is quiet and 55-80 s with its load average above 80, the whole
# guest stage (15 tests) ~150 s quiet and ~350 s loaded. 3x slower than loaded is ~1050 s of the
# 1740 s budget, and the slowest test ~240 s of its 600.
BOOT_BUDGET_S = 240.0  # qemu start until the job has reported its plan
PER_TEST_BUDGET_S = 60.0  # added per test the job runs
TEST_TIMEOUT_S = 600  # pytest-timeout of one test inside the guest
_fixed = os.environ.get("CGGUARD_GUEST_TIMEOUT")
FIXED_TIMEOUT: float | None = float(_fixed) if _fixed else None


def guest_budget(tests: int) -> float:
    """Seconds a guest that runs ``tests`` tests may take from qemu's start to its power-off."""
    if FIXED_TIMEOUT is not None:
        return FIXED_TIMEOUT
    return BOOT_BUDGET_S + tests * PER_TEST_BUDGET_S + TEST_TIMEOUT_S

# Host variables passed on to the job; the guest's own identity (CGGUARD_IN_GUEST=1,
# PYTHONDONTWRITEBYTECODE=1) is set by init.sh.
PASS_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "PYENV_ROOT", "PYENV_VERSION")


class GuestUnavailable(Exception):
    """The guest cannot be had on this machine; the message says why."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # an uncompressed PVH vmlinux (boots ~4 s faster under TCG) or the vmlinuz
    initrd: Path
    release: str  # e.g. 6.1.0-56-amd64


@dataclass(frozen=True)
class GuestResult:
    status: str  # "ok" (the job ran to the end), "timeout", "panic" or "no-result"
    exit_code: int | None
    stdout: str
    stderr: str
    console_tail: str
    boot_seconds: float | None  # qemu start until init.sh started the job
    elapsed_seconds: float
    results_dir: Path  # the host side of the results share (files the job wrote there)
    budget_seconds: float = 0.0  # when qemu would have been (or was) killed
    report: GuestReport | None = None  # what a pytest job reported, test by test

    def describe(self) -> str:
        """A multi-line account for a failure message."""
        boot = f"{self.boot_seconds:.1f} s" if self.boot_seconds is not None else "never"
        parts = [f"guest status {self.status}, exit code {self.exit_code}, booted: {boot}, "
                 f"total {self.elapsed_seconds:.1f} s of a {self.budget_seconds:.0f} s budget"]
        if self.report is not None and self.report.running:
            parts.append(f"running when the guest stopped: {self.report.running}")
        shown = [("stdout", self.stdout), ("stderr", self.stderr)]
        if self.status != "ok":  # otherwise the console only repeats stdout (init.sh tees it there)
            shown.append(("console", self.console_tail))
        for title, text in shown:
            if text.strip():
                parts.append(f"--- {title} (tail) ---\n{_tail(text, 60)}")
        return "\n".join(parts)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


# -- packages --------------------------------------------------------------------------------


def _apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _apt_update() -> bool:
    """Refresh the package lists (root only); True if that worked."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    return _run(["apt-get", "update", "-q"], env=_apt_env(), timeout=300).returncode == 0


def _ensure_qemu() -> str:
    path = shutil.which(QEMU)
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise GuestUnavailable(f"{QEMU} is not installed (apt-get install {QEMU_PACKAGE} as root)")
    # --no-install-recommends: the GUI, UEFI firmware and block extras are not needed.
    # Wait for a concurrent apt/dpkg rather than failing on its lock.
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300",
               QEMU_PACKAGE]
    r = _run(install, env=_apt_env(), timeout=900)
    if r.returncode != 0:  # stale or missing package lists on a fresh machine
        _apt_update()
        r = _run(install, env=_apt_env(), timeout=900)
    path = shutil.which(QEMU)
    if not path:
        raise GuestUnavailable(f"installing {QEMU_PACKAGE} failed: {_tail(r.stdout + r.stderr, 5)}")
    return path


def _apt_version(package: str) -> str:
    r = _run(["apt-cache", "show", "--no-all-versions", package], timeout=60)
    m = re.search(r"^Version: (\S+)", r.stdout, re.M)
    if not m:
        raise GuestUnavailable(f"apt knows no package {package}")
    return m.group(1)


def _resolve_packages() -> dict[str, str]:
    """{package: version} of the kernel and busybox to use: the current Debian candidates."""
    for tool in ("apt-cache", "apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            raise GuestUnavailable(f"building the guest needs Debian's {tool}")
    r = _run(["apt-cache", "depends", KERNEL_META], timeout=60)
    m = re.search(r"Depends: (linux-image-\S+)", r.stdout)
    if not m:
        raise GuestUnavailable(f"apt cannot resolve {KERNEL_META} (no package lists? run apt-get update)")
    kernel = m.group(1)
    return {kernel: _apt_version(kernel), BUSYBOX: _apt_version(BUSYBOX)}


def _download(package: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{package}_*.deb"))
    want = version.replace(":", "%3a")
    for deb in found:
        if deb.name.startswith(f"{package}_{want}_"):
            return deb
    argv = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        # apt drops to the _apt user for downloads, which cannot write into a root-owned dir.
        argv += ["-o", "APT::Sandbox::User=root"]
    r = _run([*argv, f"{package}={version}"], cwd=dest, timeout=600)
    for deb in dest.glob(f"{package}_{want}_*.deb"):
        for old in found:
            old.unlink(missing_ok=True)
        return deb
    raise GuestUnavailable(f"apt-get download {package}={version} failed: {_tail(r.stdout + r.stderr, 5)}")


# -- kernel modules --------------------------------------------------------------------------


def _modinfo(ko: bytes) -> dict[str, str]:
    """The key=value pairs of a module's .modinfo ELF section (ELF64 little-endian)."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise ValueError("not an ELF64 object")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if ko[strtab + name : ko.index(b"\0", strtab + name)] == b".modinfo":
            info = {}
            for entry in ko[offset : offset + size].split(b"\0"):
                key, sep, value = entry.partition(b"=")
                if sep:
                    info.setdefault(key.decode(), value.decode(errors="replace"))
            return info
    return {}


def _read_module(path: Path) -> bytes:
    """A module's plain ELF bytes: busybox insmod cannot load compressed ones."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        r = subprocess.run(["zstd", "-dcq", str(path)], capture_output=True, check=True)
        return r.stdout
    return data


def _module_name(path: Path) -> str:
    return re.sub(r"\.ko(\.\w+)?$", "", path.name).replace("-", "_")


def _collect_modules(moddir: Path) -> list[tuple[str, bytes]]:
    """The ROOT_MODULES that are not built in, with their dependencies, in load order."""
    files = {_module_name(p): p for p in moddir.rglob("*.ko*")}
    builtin_text = (moddir / "modules.builtin").read_text() if (moddir / "modules.builtin").exists() else ""
    builtin = {_module_name(Path(line.strip())) for line in builtin_text.splitlines() if line.strip()}
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in files:
            raise GuestUnavailable(f"kernel module {name} is neither built in nor shipped in {moddir}")
        data = _read_module(files[name])
        for dep in filter(None, _modinfo(data).get("depends", "").split(",")):
            visit(dep)
        ordered.append((name, data))  # after its dependencies

    for root in ROOT_MODULES:
        visit(root)
    return ordered


# -- kernel image ----------------------------------------------------------------------------


def _uncompressed_kernel(vmlinuz: Path, config: Path) -> bytes | None:
    """The ELF vmlinux inside an xz bzImage, if the kernel can boot it directly (PVH entry).

    Like the kernel's scripts/extract-vmlinux: try every xz stream magic until one decodes
    to an ELF. Returns None when that is not possible; the caller then boots vmlinuz.
    """
    if "CONFIG_PVH=y" not in config.read_text(errors="replace").splitlines():
        return None
    blob = vmlinuz.read_bytes()
    start = blob.find(b"\xfd7zXZ\x00")
    while start != -1:
        try:
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob[start:])
            if out[:4] == b"\x7fELF":
                return out
        except lzma.LZMAError:
            pass
        start = blob.find(b"\xfd7zXZ\x00", start + 1)
    return None


# -- initramfs -------------------------------------------------------------------------------


def _cpio(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive of (name, mode, data, rdev) entries, as the kernel unpacks it."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, rdev: int, ino: int) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev), len(encoded), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        add(name, mode, data, rdev, ino)
    add("TRAILER!!!", 0, b"", 0, 0)
    return bytes(out)


def _initramfs(busybox: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    d, f, x = 0o040755, 0o100644, 0o100755
    entries = [(name, d, b"", 0) for name in ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules")]
    # The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    entries.append(("dev/console", 0o020600, b"", os.makedev(5, 1)))
    entries.append(("bin/busybox", x, busybox, 0))
    entries.append(("init", x, INIT_SH.read_bytes(), 0))
    entries += [(f"lib/modules/{name}.ko", f, data, 0) for name, data in modules]
    entries.append(("modules.load", f, "".join(f"{name}\n" for name, _ in modules).encode(), 0))
    return _cpio(entries)


# -- the image -------------------------------------------------------------------------------


def _image_key(packages: dict[str, str]) -> str:
    h = hashlib.sha256(INIT_SH.read_bytes())
    h.update(repr((IMAGE_FORMAT, ROOT_MODULES)).encode())
    # Kernel first: the offline fallback in ensure_image() looks for "linux-image-*".
    pkgs = "+".join(f"{p}_{v}" for p, v in sorted(packages.items(), key=lambda pv: not pv[0].startswith("linux-")))
    return re.sub(r"[^\w.+-]", "_", pkgs) + "-" + h.hexdigest()[:12]


def _load_image(d: Path) -> GuestImage | None:
    try:
        info = json.loads((d / "image.json").read_text())
        image = GuestImage(d / info["kernel"], d / info["initrd"], info["release"])
    except (OSError, ValueError, KeyError):
        return None
    return image if image.kernel.exists() and image.initrd.exists() else None


def _build(packages: dict[str, str], dest: Path, log) -> GuestImage:
    kernel_pkg = next(p for p in packages if p.startswith("linux-image-"))
    debs = {p: _download(p, v, CACHE / "debs") for p, v in packages.items()}
    log(f"building the guest image in {dest}")
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="build-") as tmp:
        work = Path(tmp)
        # The whole package (400 MB unpacked, ~3 s) rather than a guessed subset: module
        # dependencies are only known after reading the modules.
        for pkg, deb in debs.items():
            target = work / pkg
            target.mkdir()
            r = subprocess.run(
                f"dpkg-deb --fsys-tarfile {shlex.quote(str(deb))} | tar -x -C {shlex.quote(str(target))}",
                shell=True, capture_output=True, text=True,
            )
            if r.returncode != 0:
                raise GuestUnavailable(f"unpacking {deb.name} failed: {_tail(r.stderr, 5)}")
        kroot = work / kernel_pkg
        vmlinuz = next((kroot / "boot").glob("vmlinuz-*"), None)
        if vmlinuz is None:
            raise GuestUnavailable(f"{kernel_pkg} ships no /boot/vmlinuz-*")
        release = vmlinuz.name.removeprefix("vmlinuz-")
        moddir = next((p for p in (kroot / "lib/modules" / release, kroot / "usr/lib/modules" / release)
                       if p.is_dir()), None)
        if moddir is None:
            raise GuestUnavailable(f"{kernel_pkg} ships no modules for {release}")
        busybox = (work / BUSYBOX / "bin/busybox").read_bytes()

        stage = work / "image"
        stage.mkdir()
        vmlinux = _uncompressed_kernel(vmlinuz, kroot / "boot" / f"config-{release}")
        if vmlinux is not None:
            (stage / "vmlinux").write_bytes(vmlinux)
            kernel = "vmlinux"
        else:
            shutil.copy(vmlinuz, stage / "vmlinuz")
            kernel = "vmlinuz"
        modules = _collect_modules(moddir)
        # Uncompressed: unpacking a compressed initramfs costs more under emulation than it saves.
        (stage / "initrd.cpio").write_bytes(_initramfs(busybox, modules))
        info = {"kernel": kernel, "initrd": "initrd.cpio", "release": release, "packages": packages,
                "modules": [name for name, _ in modules]}
        (stage / "image.json").write_text(json.dumps(info, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        stage.rename(dest)  # atomic: a half-built image is never seen as cached
    image = _load_image(dest)
    assert image is not None
    # Images of older kernels are dead weight (~70 MB each) once a newer one is built.
    for old in CACHE.glob("linux-image-*"):
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return image


@contextlib.contextmanager
def _cache_lock():
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # parallel sessions build once, not over each other
        yield


def _current_image(log) -> GuestImage:
    packages = _resolve_packages()
    dest = CACHE / _image_key(packages)
    return _load_image(dest) or _build(packages, dest, log)


def ensure_image(log=lambda msg: None) -> GuestImage:
    """The cached image for the current Debian kernel, built if needed. Raises GuestUnavailable."""
    with _cache_lock():
        for stale in CACHE.glob("build-*"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        try:
            try:
                return _current_image(log)
            except GuestUnavailable:
                # Missing or stale package lists (a fresh machine, a kernel the mirror has
                # replaced): refresh them once and try again.
                if not _apt_update():
                    raise
                return _current_image(log)
        except GuestUnavailable as e:
            # Offline or apt broken: an image built before still does the job.
            built = [i for d in sorted(CACHE.glob("linux-image-*"), key=os.path.getmtime, reverse=True)
                     if (i := _load_image(d))]
            if not built:
                raise
            log(f"using the cached {built[0].release} image: {e}")
            return built[0]


def _check_qemu(qemu: str) -> None:
    r = _run([qemu, "-device", "virtio-9p-pci,help"], timeout=60)
    if r.returncode != 0:
        raise GuestUnavailable(f"{qemu} has no virtio-9p (virtfs) support: {_tail(r.stdout + r.stderr, 3)}")


_ready: tuple[str, GuestImage] | None = None


def prepare(log=lambda msg: None) -> tuple[str, GuestImage]:
    """(qemu binary, image), installing and building what is missing. Raises GuestUnavailable."""
    global _ready
    if _ready is None:
        if os.environ.get("CGGUARD_IN_GUEST") == "1":
            raise GuestUnavailable("already inside the test guest (no nested guests)")
        if sys.platform != "linux" or os.uname().machine != "x86_64":
            raise GuestUnavailable("the test guest needs an x86_64 Linux host")
        qemu = _ensure_qemu()
        _check_qemu(qemu)
        _ready = (qemu, ensure_image(log))
    return _ready


def guest_unavailable_reason(log=lambda msg: None) -> str | None:
    """None if the guest can be booted (after installing/building what it needs), else why not."""
    try:
        prepare(log)
    except GuestUnavailable as e:
        return str(e)
    except (OSError, subprocess.SubprocessError) as e:
        return f"preparing the test guest failed: {e}"
    return None


# -- running ---------------------------------------------------------------------------------


# Looked up once here: the child between fork and exec should do as little as possible.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    # If the test process is killed outright, qemu must not live on (PR_SET_PDEATHSIG = 1).
    _prctl(1, signal.SIGKILL, 0, 0, 0)


def _job_script(argv: list[str], cwd: str, env: dict[str, str]) -> str:
    lines = ["# written by cgguard/testkit/guest.py; run by the guest's init.sh in the host's root",
             f"cd {shlex.quote(cwd)} || exit 125"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


# Guest mounts that hide the host's tree at these places (init.sh).
_GUEST_TMPFS = ("/run", "/tmp", "/var/tmp", "/dev/shm")
_GUEST_PSEUDO = ("/proc", "/sys", "/dev")


def _hidden_paths(paths: list[str]) -> list[str]:
    """Those of ``paths`` that the guest's own tmpfs mounts would hide, outermost only."""
    def under(p: str, top: str) -> bool:
        return p == top or p.startswith(top + "/")

    hidden: list[str] = []
    for p in sorted({os.path.realpath(p) for p in paths}):
        if any(under(p, top) for top in _GUEST_TMPFS):
            if not any(under(p, h) for h in hidden):
                hidden.append(p)
        elif any(under(p, top) for top in _GUEST_PSEUDO):
            raise ValueError(f"{p} cannot be shared with the guest")
    return hidden


def qemu_argv(qemu: str, image: GuestImage, results: Path, binds: list[str] = ()) -> list[str]:
    extra = []
    for i, path in enumerate(binds):
        extra += ["-virtfs", f"local,path={path},mount_tag=bind{i},security_model=none,readonly=on,multidevs=remap"]
    return [
        qemu, "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "1G",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", CMDLINE,
        # multidevs=remap: / spans several host filesystems, whose inode numbers may collide.
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none,multidevs=remap",
        *extra,
    ]


class _Console:
    """Reads qemu's serial console (and its own stderr) into a log file and a bounded tail."""

    def __init__(self, stream, log_path: Path, started: float):
        self.tail: collections.deque[str] = collections.deque(maxlen=80)
        self.marker_at: float | None = None
        self.panicked = False
        self._stream, self._log_path, self._started = stream, log_path, started
        self._thread = threading.Thread(target=self._pump, name="guest-console", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        with open(self._log_path, "w", encoding="utf-8", errors="replace") as log:
            for raw in iter(self._stream.readline, b""):
                line = raw.decode("utf-8", "replace").replace("\r", "")
                log.write(line)
                log.flush()
                self.tail.append(line)
                if self.marker_at is None and START_MARKER in line:
                    self.marker_at = time.monotonic() - self._started
                if "Kernel panic" in line:
                    self.panicked = True

    def join(self) -> None:
        self._thread.join(timeout=10)


def _planned_tests(report: Path) -> int | None:
    """How many tests the job said it runs, once it has (the plugin's "collected" line)."""
    try:
        text = report.read_text(errors="replace")
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if '"collected"' in line:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # being written: read again on the next poll
            if rec.get("event") == "collected" and isinstance(rec.get("count"), int):
                return rec["count"]
    return None


def _precompile(root: Path) -> None:
    """Write the bytecode of the Python sources under ``root`` (the job's checkout) on the host.

    The guest's root is read-only and init.sh sets PYTHONDONTWRITEBYTECODE: without .pyc files
    every Python start in the guest compiles the project anew, which under emulation made each
    agent start take 20-30 s instead of 5. Best effort: a read-only checkout is left as it is.
    """
    import compileall

    if not os.access(root, os.W_OK):
        return
    prefix, sys.pycache_prefix = sys.pycache_prefix, None  # where the guest will look for them
    try:
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and child.name not in ("build", "dist", "results"):
                with contextlib.redirect_stdout(None):
                    compileall.compile_dir(child, quiet=2, workers=1)
    except OSError:
        pass
    finally:
        sys.pycache_prefix = prefix


def run_in_guest(
    argv: list[str],
    timeout: float | None = None,
    *,
    cwd: str | os.PathLike = REPO,
    env: dict[str, str] | None = None,
    results_dir: str | os.PathLike | None = None,
) -> GuestResult:
    """Boot the guest, run ``argv`` in ``cwd`` there, power off; never leaves qemu running.

    ``timeout``: seconds before qemu is killed. None derives it (see the module's doc): a pytest
    job run with :func:`guest_pytest_argv` gets ``guest_budget(n)`` once it has reported its n
    tests, any other job BOOT_BUDGET_S, unless CGGUARD_GUEST_TIMEOUT fixes it. Files the job
    writes under GUEST_RESULTS land in ``results_dir`` (a fresh temporary directory when None;
    it is kept, its path is in the result). Raises GuestUnavailable if the guest cannot be
    prepared.
    """
    qemu, image = prepare()
    results = Path(results_dir) if results_dir is not None else Path(tempfile.mkdtemp(prefix="cgguard-guest-"))
    results.mkdir(parents=True, exist_ok=True)
    for stale in ("exit_code", "exit_code.tmp", "stdout", "stderr", REPORT):
        (results / stale).unlink(missing_ok=True)
    job_env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    job_env[REPORT_ENV] = f"{GUEST_RESULTS}/{REPORT}"
    job_env.update(env or {})
    (results / "job.sh").write_text(_job_script([str(a) for a in argv], os.fspath(cwd), job_env))
    binds = _hidden_paths([os.fspath(cwd), sys.prefix, sys.base_prefix])
    _precompile(Path(cwd))
    (results / "binds").write_text("".join(f"bind{i} {p}\n" for i, p in enumerate(binds)))

    if timeout is None and FIXED_TIMEOUT is not None:
        timeout = FIXED_TIMEOUT
    budget = timeout if timeout is not None else BOOT_BUDGET_S
    planned = False
    started = time.monotonic()
    proc = subprocess.Popen(
        qemu_argv(qemu, image, results, binds), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
    )
    console = _Console(proc.stdout, results / "console.log", started)
    timed_out = False
    try:
        while True:
            left = started + budget - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            try:
                proc.wait(timeout=min(left, 1.0))
                break
            except subprocess.TimeoutExpired:
                pass
            if timeout is None and not planned:
                n = _planned_tests(results / REPORT)
                if n is not None:
                    planned, budget = True, guest_budget(n)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: this reaches only qemu
            proc.wait()
        console.join()
        proc.stdout.close()
    elapsed = time.monotonic() - started

    def read(name: str) -> str:
        try:
            return (results / name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    code_text = read("exit_code").strip()
    exit_code = int(code_text) if code_text.lstrip("-").isdigit() else None
    if exit_code is not None:
        status = "ok"
    elif timed_out:
        status = "timeout"
    elif console.panicked:
        status = "panic"
    else:
        status = "no-result"
    return GuestResult(
        status=status, exit_code=exit_code, stdout=read("stdout"), stderr=read("stderr"),
        console_tail="".join(console.tail), boot_seconds=console.marker_at,
        elapsed_seconds=elapsed, results_dir=results, budget_seconds=budget,
        report=read_report(results / REPORT),
    )


# -- the pytest report -----------------------------------------------------------------------
# A pytest job in the guest reports as it goes, one JSON object a line, into the results share:
# its plan ({"event": "collected", "count": n}), each test's start and result, collection
# errors and its end. The host sets the guest's time budget from the plan, and a guest killed
# on a hang still has the results of every test that finished and names the one that ran.

REPORT = "report.jsonl"
REPORT_ENV = "CGGUARD_GUEST_REPORT"  # where the plugin writes (set by run_in_guest)
_DETAILS_MAX = 20_000


@dataclass(frozen=True)
class Case:
    outcome: str  # passed, failed, error, skipped
    message: str
    details: str
    duration: float = 0.0


@dataclass(frozen=True)
class GuestReport:
    planned: int | None  # tests the job said it runs
    cases: dict[str, Case]  # by node id
    running: str | None  # started but without a result: the guest stopped during it
    collect_errors: dict[str, str]  # node id -> details
    exitstatus: int | None  # pytest's exit status; None: it did not finish
    unreadable: int  # lines that did not parse (a guest killed mid-write leaves one)


def read_report(path: Path) -> GuestReport | None:
    """The report a pytest job left in the results share, or None if it wrote none."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    planned = exitstatus = running = None
    cases: dict[str, Case] = {}
    errors: dict[str, str] = {}
    unreadable = 0
    for line in lines:
        try:
            rec = json.loads(line)
            event = rec["event"]
        except (ValueError, TypeError, KeyError):
            unreadable += 1
            continue
        if event == "collected":
            planned = rec.get("count")
        elif event == "start":
            running = rec.get("nodeid")
        elif event == "result":
            cases[rec["nodeid"]] = Case(rec["outcome"], rec.get("message", ""), rec.get("details", ""),
                                        float(rec.get("duration", 0.0)))
            if running == rec["nodeid"]:
                running = None
        elif event == "collect-error":
            errors[rec.get("nodeid", "")] = rec.get("details", "")
        elif event == "finished":
            exitstatus = rec.get("exitstatus")
    return GuestReport(planned, cases, running, errors, exitstatus, unreadable)


def _outcome(reports: list) -> tuple[str, str, str, float]:
    """One test's (outcome, message, details, duration) from its setup/call/teardown reports,
    as junit XML would: a failing call is "failed", a failing setup or teardown "error"."""
    outcome, message, details = "passed", "", ""
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    sections: list[str] = []
    for r in reports:
        if r.failed:
            this = "failed" if r.when == "call" else "error"
        elif r.skipped:
            this = "skipped"
        else:
            this = "passed"
        if rank[this] > rank[outcome]:
            outcome, details = this, r.longreprtext
            crash = getattr(r.longrepr, "reprcrash", None)
            if this == "skipped" and isinstance(r.longrepr, tuple):
                message = str(r.longrepr[2])
            elif crash is not None:
                message = crash.message
            else:
                message = details.strip().splitlines()[-1] if details.strip() else this
        if r.when == "teardown":
            sections = [f"--- {name} ---\n{text}" for name, text in r.sections if text.strip()]
    if outcome in ("failed", "error") and sections:
        details = details + "\n\n" + "\n".join(sections)
    return outcome, message, details[-_DETAILS_MAX:], sum(r.duration for r in reports)


class _ReportPlugin:
    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")
        self._reports: dict[str, list] = {}

    def _emit(self, **rec) -> None:
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()  # over 9p: on the host as soon as it is written

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self._emit(event="collect-error", nodeid=report.nodeid, details=str(report.longrepr)[-_DETAILS_MAX:])

    def pytest_collection_finish(self, session) -> None:
        self._emit(event="collected", count=len(session.items))

    def pytest_runtest_logstart(self, nodeid, location) -> None:
        self._emit(event="start", nodeid=nodeid)

    def pytest_runtest_logreport(self, report) -> None:
        self._reports.setdefault(report.nodeid, []).append(report)

    def pytest_runtest_logfinish(self, nodeid, location) -> None:
        outcome, message, details, duration = _outcome(self._reports.pop(nodeid, []))
        self._emit(event="result", nodeid=nodeid, outcome=outcome, message=message, details=details,
                   duration=round(duration, 3))

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        self._emit(event="finished", exitstatus=int(exitstatus))
        self._file.close()


def pytest_configure(config) -> None:
    """This module is a pytest plugin in the guest (``-p cgguard.testkit.guest``): it writes the
    report where run_in_guest asked for it."""
    path = os.environ.get(REPORT_ENV)
    if path:
        config.pluginmanager.register(_ReportPlugin(path), "cgguard-guest-report")


# How the guest tests are run: -v puts each test's name on the console before it runs, so
# the console tail of a hung guest names the culprit; pytest-timeout fails a single hung test
# with its traceback well before the whole guest is killed; a broken test file does not hide
# the results of the others.
GUEST_PYTEST_ARGS = ("-v", f"--timeout={TEST_TIMEOUT_S}", "--continue-on-collection-errors")


def guest_pytest_argv(*args: str) -> list[str]:
    """The pytest command line for the guest: no cache writes on the read-only root, and the
    report plugin (this module)."""
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "cgguard.testkit.guest", *args]


# -- CLI -------------------------------------------------------------------------------------


def _host_command(cmd: list[str]) -> list[str]:
    # "python"/"pytest" mean this interpreter: pyenv shims need a writable HOME and PATH games.
    if cmd and cmd[0] in ("python", "python3"):
        return [sys.executable, *cmd[1:]]
    if cmd and cmd[0] == "pytest":
        return guest_pytest_argv(*cmd[1:])
    return cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cgguard.testkit.guest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=FIXED_TIMEOUT,
                    help="seconds before qemu is killed (default: derived from the tests the job runs)")
    ap.add_argument("--results", help="host directory for the results share (default: a new temp dir)")
    ap.add_argument("--build-only", action="store_true", help="prepare qemu and the image, then stop")
    ap.add_argument("command", nargs="*", help="command to run in the guest (after --)")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[guest] {msg}", file=sys.stderr, flush=True)

    reason = guest_unavailable_reason(log)
    if reason:
        log(f"unavailable: {reason}")
        return 77
    qemu, image = prepare()
    if args.build_only:
        print(f"qemu:   {qemu}\nkernel: {image.kernel} ({image.release})\ninitrd: {image.initrd}")
        return 0
    cmd = _host_command(args.command) or guest_pytest_argv("tests/guest/inside", *GUEST_PYTEST_ARGS)
    log(f"booting {image.release}: {shlex.join(cmd)}")
    res = run_in_guest(cmd, args.timeout, cwd=os.getcwd(), results_dir=args.results)
    for stream, text in ((sys.stdout, res.stdout), (sys.stderr, res.stderr)):
        # A job stopped mid-line (a hang) must not swallow the first line of the account below.
        stream.write(text if not text or text.endswith("\n") else text + "\n")
        stream.flush()
    boot = f"{res.boot_seconds:.1f} s" if res.boot_seconds is not None else "-"
    log(f"status {res.status}, exit code {res.exit_code}, boot {boot}, total {res.elapsed_seconds:.1f} s "
        f"(budget {res.budget_seconds:.0f} s), results in {res.results_dir}")
    if res.report is not None and res.report.cases:
        slowest = max(res.report.cases.items(), key=lambda kv: kv[1].duration)
        log(f"{len(res.report.cases)} tests reported, slowest {slowest[1].duration:.1f} s: {slowest[0]}")
    if res.status != "ok":
        if res.report is not None and res.report.running:
            log(f"running when the guest stopped: {res.report.running}")
        log(f"console tail:\n{res.console_tail}")
        return 124 if res.status == "timeout" else 125
    return res.exit_code or 0


if __name__ == "__main__":
    sys.exit(main())
