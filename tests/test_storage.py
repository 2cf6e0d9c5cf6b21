"""The one write path (edlm_dist/storage): atomic files, crash-safe appends, swaps, the output lock.

Faults are real where the kernel allows it (a SIGKILLed holder of the lock, a file-size limit that
makes ``write`` fail with EFBIG half-way, a file where a folder belongs); ``ENOSPC``/``EROFS`` cannot be
produced without root-only mounts, so those are injected at the ``os.write`` / ``os.replace`` call
they would come from. The last test is the structural guarantee: no module outside edlm_dist/storage
writes a file in place.
"""

from __future__ import annotations

import ast
import errno
import json
import multiprocessing
import os
import resource
import signal
import time
from pathlib import Path

import pytest

from edlm_dist.errors import DataError, OutputError
from edlm_dist.storage import files, outputs
from edlm_dist.storage.files import append_line, read_json, read_jsonl, swap_in, swap_in_entries, write_atomic
from edlm_dist.storage.outputs import LOCK_FILE, OutputLock, check_output_folder, claim_output

PACKAGE = Path(__file__).resolve().parents[1] / "edlm_dist"


# ------------------------------------------------------------------------------------ atomic files
def test_failed_atomic_write_keeps_the_old_file_and_says_why(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    write_atomic(path, "old\n")

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "replace", no_space)
    with pytest.raises(OutputError) as caught:
        write_atomic(path, "new\n")
    message = str(caught.value)
    assert "\n" not in message and "No space left on device" in message and "free disk space" in message
    assert path.read_text() == "old\n" and not (tmp_path / "meta.json.tmp").exists()


# ------------------------------------------------------------------------------------ appends
def test_append_after_a_torn_line_drops_the_fragment(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"step": 1}))
    with open(path, "ab") as handle:  # a writer killed half-way through its row
        handle.write(b'{"step": 2, "lo')
    assert read_jsonl(path, fix="x") == [{"step": 1}]  # the reader skips the torn tail
    append_line(path, json.dumps({"step": 2}))
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_malformed_middle_line_is_one_error_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl line 2 is not valid JSON .*; delete it"):
        read_jsonl(path, fix="delete it")


def _append_under_file_size_limit(path: str, limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        append_line(path, json.dumps({"step": 2, "loss": 1.5, "pad": "x" * 200}))
    except OutputError as exc:  # the message cannot be written to a file past the limit: exit 7 says it
        os._exit(7 if "File too large" in str(exc) and "\n" not in str(exc) else 8)
    os._exit(0)


def test_append_cut_by_a_real_file_size_limit_leaves_no_half_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"step": 1}))
    size = path.stat().st_size
    child = multiprocessing.get_context("fork").Process(target=_append_under_file_size_limit,
                                                        args=(str(path), size + 50))
    child.start()
    child.join(30)
    assert child.exitcode == 7  # one OutputError line naming EFBIG
    assert path.read_text() == '{"step": 1}\n'  # the 50 bytes that fitted were cut back
    assert read_jsonl(path, fix="x") == [{"step": 1}]


def test_append_that_fails_mid_write_is_cut_back(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"step": 1}))
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 4:
            return real_write(fd, data[:4])  # a short write ...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ... then the disk is full

    monkeypatch.setattr(files.os, "write", half_then_full)
    with pytest.raises(OutputError, match="could not append to .*No space left on device"):
        append_line(path, json.dumps({"step": 2}))
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n'


# ------------------------------------------------------------------------------------ JSON readers
@pytest.mark.parametrize("content, problem", [
    (None, "is missing"), ('{"a": 1', "is not valid JSON"), ("[1, 2]", "is not a JSON object"),
    ('{"a": {"c": 1}}', "lacks the key 'a.b'"),
])
def test_json_reader_turns_every_defect_into_one_line(tmp_path, content, problem):
    path = tmp_path / "meta.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as caught:
        read_json(path, what="metadata", fix="rewrite it", required=["a.b"])
    assert problem in str(caught.value) and str(caught.value).endswith("rewrite it")
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------ swaps
def test_swap_in_replaces_a_folder_whole(tmp_path):
    target, built = tmp_path / "weights", tmp_path / ".weights.new"
    target.mkdir()
    (target / "model.bin").write_text("old")
    built.mkdir()
    (built / "model.bin").write_text("new")
    swap_in(built, target)
    assert (target / "model.bin").read_text() == "new" and not built.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]


def test_failed_swap_of_entries_leaves_the_marker_out_and_names_the_old_contents(tmp_path, monkeypatch):
    target, built = tmp_path / "data", tmp_path / "data" / ".building"
    (target / "train").mkdir(parents=True)
    (target / "manifest.json").write_text("old")
    (built / "train").mkdir(parents=True)
    (built / "manifest.json").write_text("new")
    real_replace = os.replace

    def fail_moving_in(src, dst):
        if Path(src).parent == built:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", fail_moving_in)
    with pytest.raises(OutputError, match=r"Read-only file system.*previous contents are in .*\.replaced"):
        swap_in_entries(built, target, ["train"], marker="manifest.json")
    assert not (target / "manifest.json").exists()  # an incomplete folder never looks finished
    assert (target / ".replaced" / "manifest.json").read_text() == "old"


# ------------------------------------------------------------------------------------ output folder
def test_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match=r"--out .*out is a file, not a folder; choose a folder path"):
        check_output_folder(tmp_path / "out")
    with pytest.raises(OutputError, match=r"cannot be created: .*out is a file"):
        check_output_folder(tmp_path / "out" / "run")


def _hold_lock(folder: str, ready) -> None:
    OutputLock(folder, "edlm train other.yaml").acquire()
    ready.set()
    signal.pause()


def test_second_claim_names_the_holder_and_a_killed_holder_leaves_a_stale_lock(tmp_path, caplog):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(OutputError) as caught:
            with claim_output(tmp_path, "edlm train mine.yaml"):
                pass
        assert f"pid {holder.pid}" in str(caught.value) and "edlm train other.yaml" in str(caught.value)
        with pytest.raises(OutputError, match="is inside .* which is in use by"):
            with claim_output(tmp_path / "nested", "edlm sample"):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    assert (tmp_path / LOCK_FILE).is_file()  # SIGKILL: no chance to clean up
    with caplog.at_level("WARNING", logger="edlm"):
        with claim_output(tmp_path, "edlm train mine.yaml"):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and str(holder.pid) in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()  # released on a clean exit


# ------------------------------------------------------------------------------------ structure
WRITERS = {"write_text", "write_bytes", "savefig", "save_file", "save_pretrained", "dump", "save", "replace",
           "rename", "symlink", "ftruncate"}
ON_MODULE = {"save": "torch", "replace": "os", "rename": "os", "dump": "json"}  # str.replace etc. are not writes
# Writes outside storage/, each into a folder that is built aside and swapped in whole by storage.files:
BUILT_ASIDE = {
    ("artifacts/checkpoint.py", "save"),  # rank states and EMA shards into .partial-step_N
    ("artifacts/weights.py", "save_file"),  # into the .weights.tmp folder
    ("artifacts/hf_export.py", "save_file"), ("artifacts/hf_export.py", "save_pretrained"),  # export folder aside
    ("artifacts/zero_to_fp32.py", "symlink"),  # a temporary view of a checkpoint, read only
    ("data/tokenizers.py", "save_pretrained"),  # the tokenizer folder inside prepare-data's .building
}


def test_no_module_outside_storage_writes_in_place():
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("storage/"):
            continue
        tree = ast.parse(path.read_text())
        through_storage = {id(inner) for call in ast.walk(tree) if isinstance(call, ast.Call)
                           and getattr(call.func, "id", getattr(call.func, "attr", "")) == "write_with"
                           for arg in call.args[1:] for inner in ast.walk(arg)}  # write_with(path, lambda tmp: ...)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and id(node) not in through_storage:
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                owner = ast.unparse(node.func.value) if isinstance(node.func, ast.Attribute) else ""
                if name in WRITERS and owner == ON_MODULE.get(name, owner):
                    found.add((rel, name))
                if name == "open" and any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                                          and set(a.value) & set("wax+") for a in node.args[1:2]):
                    found.add((rel, "open"))
    assert found - BUILT_ASIDE - {("data/prepare.py", "open")} == set()  # prepare's spill file is scratch
    assert BUILT_ASIDE <= found  # the scan sees the writes it is told about (it is not vacuous)


def test_a_refused_command_leaves_no_output_folder_behind(tmp_path):
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new" / "run", tmp_path / "kept"):
        with pytest.raises(DataError):
            with claim_output(out, "edlm eval"):
                raise DataError("refused input")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def _running(pid: int) -> bool:
    """The process exists and has not exited (an exited orphan may linger as a zombie until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _hold_lock_with_an_orphan(folder: str, ready, orphan_pid) -> None:
    OutputLock(folder, "edlm train with-workers.yaml").acquire()
    orphan = os.fork()  # like a data-loader worker: inherits the flock and outlives a SIGKILL of its parent
    if orphan == 0:
        time.sleep(2.0)
        os._exit(0)
    orphan_pid.value = orphan
    ready.set()
    signal.pause()


def _killed_holder_with_an_orphan(folder: Path) -> tuple[int, int]:
    """(holder pid, orphan pid): the lock's holder SIGKILLed while its forked child still runs."""
    ctx = multiprocessing.get_context("fork")
    ready, orphan_pid = ctx.Event(), ctx.Value("i", 0)
    holder = ctx.Process(target=_hold_lock_with_an_orphan, args=(str(folder), ready, orphan_pid))
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    return holder.pid, orphan_pid.value


def test_a_killed_holders_orphans_are_waited_for_then_the_stale_lock_is_taken_over(tmp_path, caplog):
    holder_pid, orphan_pid = _killed_holder_with_an_orphan(tmp_path)
    assert _running(orphan_pid)  # the orphan still holds the flock of the dead holder
    with caplog.at_level("WARNING", logger="edlm"):
        with claim_output(tmp_path, "edlm train mine.yaml"):  # waits for the orphan instead of refusing
            assert not _running(orphan_pid)  # taken only once the orphan had let go
    assert "stale lock" in caplog.text and str(holder_pid) in caplog.text


def test_orphans_that_outlive_the_wait_are_named_in_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "ORPHAN_WAIT_S", 0.5)
    _killed_holder_with_an_orphan(tmp_path)
    with pytest.raises(OutputError, match="locked by processes left over from .*edlm train with-workers.yaml"):
        with claim_output(tmp_path, "edlm train mine.yaml"):
            pass
