"""The incident log is written as root into a state dir someone else may have prepared.

Before the fix, IncidentLog followed a symlink at ``<state-dir>/incidents.jsonl`` (and a state
dir that is itself a symlink) and appended to whatever it pointed at, accepted a state dir that
others can write to, and hung on a FIFO planted in place of the log.
"""

import hashlib
import os
import stat

import pytest
from conftest import run_cli

from cgguard.sinks.incidents import (
    FILENAME,
    Incident,
    IncidentLog,
    IncidentLogError,
    read,
)

NOBODY = 65534


def _inc(cg="a/b"):
    return Incident(cgroup=cg, action="report", reasons=[{"rule": "r", "detail": "d"}], tasks_at_detection=1,
                    detector="growth")


def _digest(path) -> tuple[str, int, int]:
    st = os.lstat(path)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), st.st_mode, st.st_size


@pytest.fixture
def precious(tmp_path):
    """A root-owned file outside the state dir, without a trailing newline (the torn-tail repair
    would add one) that an attacker wants the agent to write into."""
    p = tmp_path / "elsewhere" / "shadow"
    p.parent.mkdir(mode=0o755)
    p.write_bytes(b"root:$6$secret:19000:0:99999:7:::")
    os.chmod(p, 0o600)
    assert os.stat(p).st_uid == 0
    return p


def _state(tmp_path, mode=0o700):
    d = tmp_path / "state"
    d.mkdir()
    os.chmod(d, mode)
    return d


def _refused(state_dir: str, needle: str) -> str:
    log = IncidentLog(state_dir)
    with pytest.raises(IncidentLogError) as e:
        log.open()
        log.append(_inc())  # in case open() let it through
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    return msg


def _run_refuses(state_dir: str, needle: str) -> None:
    r = run_cli("run", "--watch", "nothing-here/**", "--state-dir", state_dir, "--listen", "",
                "--control-socket", "", "--no-lineage", timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("cgguard: ") and needle in last and "Traceback" not in r.stderr, r.stderr


def test_symlinked_log_file_is_refused_and_target_untouched(tmp_path, precious):
    d = _state(tmp_path)
    os.symlink(precious, d / FILENAME)
    before = _digest(precious)
    _refused(str(d), "symlink")
    _run_refuses(str(d), "symlink")
    assert _digest(precious) == before
    assert os.path.islink(d / FILENAME)  # not replaced either: the operator sees what was planted


def test_dangling_symlink_is_not_followed_to_create_a_file(tmp_path):
    d = _state(tmp_path)
    target = tmp_path / "etc-cron.d-evil"
    os.symlink(target, d / FILENAME)
    _refused(str(d), "symlink")
    assert not target.exists()


def test_hard_link_to_a_root_file_is_refused(tmp_path, precious):
    d = _state(tmp_path)
    os.link(precious, d / FILENAME)
    before = _digest(precious)
    _refused(str(d), "link")
    assert _digest(precious) == before


def test_log_file_owned_by_someone_else_is_refused(tmp_path):
    d = _state(tmp_path)
    f = d / FILENAME
    f.write_bytes(b"")
    os.chown(f, NOBODY, NOBODY)
    _refused(str(d), "owned by uid 65534")
    assert f.read_bytes() == b""


def test_fifo_in_place_of_the_log_is_refused_without_hanging(tmp_path):
    d = _state(tmp_path)
    os.mkfifo(d / FILENAME)
    _refused(str(d), "not a regular file")
    _run_refuses(str(d), "not a regular file")
    r = run_cli("incidents", "--state-dir", str(d), timeout=20)
    assert r.returncode == 2 and "not a regular file" in r.stderr, r.stderr


def test_symlinked_state_dir_is_refused(tmp_path, precious):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "state"
    os.symlink(real, link)
    _refused(str(link), "symlink")
    _refused(str(link) + "/", "symlink")  # a trailing slash must not make the kernel follow it
    _run_refuses(str(link), "symlink")
    assert os.listdir(real) == []
    # A link to a directory holding a root file: nothing may be written through it.
    os.unlink(link)
    os.symlink(precious.parent, link)
    before = _digest(precious)
    _refused(str(link), "symlink")
    assert _digest(precious) == before and sorted(os.listdir(precious.parent)) == ["shadow"]


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o720, 0o702, 0o1777], ids=oct)
def test_state_dir_writable_by_others_is_refused(tmp_path, mode):
    d = _state(tmp_path, mode)
    msg = _refused(str(d), "writable by group or others")
    assert oct(mode)[-3:] in msg
    assert os.listdir(d) == []
    if mode == 0o777:
        _run_refuses(str(d), "writable by group or others")


def test_state_dir_owned_by_someone_else_is_refused(tmp_path):
    d = _state(tmp_path, 0o755)
    os.chown(d, NOBODY, NOBODY)
    _refused(str(d), "owned by uid 65534")
    assert os.listdir(d) == []


def test_state_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "state"
    f.write_text("x")
    _refused(str(f), "not a directory")
    assert f.read_text() == "x"


def test_normal_state_dir_works(tmp_path):
    d = _state(tmp_path, 0o750)
    log = IncidentLog(str(d))
    log.open()
    log.append(_inc("one"))
    assert [i["cgroup"] for i in read(str(d)).incidents] == ["one"]
    st = os.lstat(d / FILENAME)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022
    log.close()


def test_missing_state_dir_is_created_private_with_traversable_parents(tmp_path):
    d = tmp_path / "new" / "lib" / "state"
    old = os.umask(0)  # a careless umask must not make any of them writable by others
    try:
        log = IncidentLog(str(d))
        log.open()
        log.append(_inc("one"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(d.parent).st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(d.parent.parent).st_mode) == 0o755
    assert not os.lstat(d / FILENAME).st_mode & 0o022
    assert [i["cgroup"] for i in read(str(d)).incidents] == ["one"]


def test_group_writable_log_file_of_ours_is_tightened(tmp_path):
    d = _state(tmp_path)
    f = d / FILENAME
    f.write_bytes(b"")
    os.chmod(f, 0o666)
    log = IncidentLog(str(d))
    log.open()
    log.append(_inc("one"))
    assert stat.S_IMODE(os.lstat(f).st_mode) == 0o644  # only the group/other write bits dropped


def test_swapping_the_file_for_a_symlink_after_open_is_refused_at_append(tmp_path, precious):
    d = _state(tmp_path)
    log = IncidentLog(str(d))
    log.open()
    log.append(_inc("one"))
    os.rename(d / FILENAME, d / "moved")
    os.symlink(precious, d / FILENAME)
    before = _digest(precious)
    with pytest.raises(IncidentLogError):
        log.append(_inc("two"))
    assert _digest(precious) == before
