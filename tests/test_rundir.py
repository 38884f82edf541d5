import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.rundir import RunDir, atomic_path, sha256_file


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_record_and_skip(tmp_path):
    run = RunDir(tmp_path)
    inp = tmp_path / "input.bin"
    inp.write_bytes(b"abc")
    out = run.path("out.txt")
    out.write_text("result")
    key = run.stage_key("s", {"x": 1}, [inp])
    assert not run.is_current("s", key)
    run.record("s", key, {"x": 1}, [inp], ["out.txt"])

    manifest = json.loads(run.manifest_path.read_text())
    art = manifest["artifacts"]["out.txt"]
    assert art["sha256"] == hashlib.sha256(b"result").hexdigest() == sha256_file(out)
    assert art["size"] == 6 and art["config"] == {"x": 1} and "torch" in art["versions"]
    assert art["inputs"] == {"input.bin": hashlib.sha256(b"abc").hexdigest()}  # relative to the run directory
    assert run.is_current("s", key)

    assert not run.is_current("s", run.stage_key("s", {"x": 2}, [inp]))  # config changed
    inp.write_bytes(b"abd")
    assert not run.is_current("s", run.stage_key("s", {"x": 1}, [inp]))  # input changed
    inp.write_bytes(b"abc")
    out.write_text("tampered")
    assert not run.is_current("s", key)  # output changed since it was recorded
    out.unlink()
    assert not run.is_current("s", key)


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    run = RunDir(tmp_path)
    run.manifest_path.write_text("{not json")
    with pytest.raises(UserError, match="manifest.json is corrupt"):
        run.is_current("s", "k")


def test_mount_point_of_agrees_with_findmnt(tmp_path):
    from pipeline.rundir import mount_point_of

    findmnt = shutil.which("findmnt")
    if findmnt is None:
        pytest.skip("findmnt (util-linux) is not installed")
    for path in (tmp_path, Path("/proc/self"), Path("/")):
        target = subprocess.run([findmnt, "-n", "-o", "TARGET", "-T", str(path)], capture_output=True, text=True,
                                check=True).stdout.strip()
        assert mount_point_of(path) == Path(target), path
