"""Faults during an export: a killed process, a full disk, an input that changes underneath.

The promise under test: the target folder holds either the complete previous
output (byte for byte) or the complete new one (or nothing, when there was
nothing before), never a partial folder; what a killed export leaves behind is
only hidden `.alloy-staging-*` folders, which `clean_stale_staging` clears.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from merging import export
from merging.checkpoint import open_checkpoint
from merging.cli import main as cli_main
from merging.errors import ExportError
from merging.executor import run_merge
from merging.export import STAGING_PREFIX, StagedFolder, clean_stale_staging, export_checkpoint
from merging.formats import safetensors_writer
from merging.formats.safetensors_writer import PlannedTensor, ShardedSafetensorsWriter
from merging.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")


# -- helpers ----------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str] | None:
    """Relative path -> sha256 of every file; None when the folder is absent."""
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path, target: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p != target)


def make_family(folder: Path, *, tensors: int, numel: int, models: int = 2) -> Path:
    """A base and fine-tunes written with the streaming writer (never a whole model in memory)."""
    g = torch.Generator().manual_seed(0)
    row = torch.randn(numel, generator=g)
    planned = [PlannedTensor(f"layers.{i}.weight", (numel,), torch.float32) for i in range(tensors)]
    planned.append(PlannedTensor("layers.num_batches_tracked", (), torch.int64))
    for m in range(models + 1):
        name = "base" if m == 0 else f"ft{m - 1}"
        (folder / name).mkdir(parents=True)
        writer = ShardedSafetensorsWriter(folder / name, planned)
        for i in range(tensors):
            writer.write(f"layers.{i}.weight", row + 0.01 * m * (i + 1))
        writer.write("layers.num_batches_tracked", torch.tensor(3))
        writer.close()
        (folder / name / "config.json").write_text(json.dumps({"architectures": ["Synthetic"], "model_type": "synthetic"}))
    return folder


def write_recipe(folder: Path, name: str, *, lam: float, models: int = 2) -> Path:
    path = folder / name
    listed = ", ".join(f"ft{i}" for i in range(models))
    path.write_text(f"merge_method: task_arithmetic\nbase_model: base\nmodels: [{listed}]\nparameters: {{lambda: {lam}}}\n")
    return path


# -- 1. SIGKILL at every step of the final commit (deterministic, exhaustive) -------------------


def _kill_at_line(n: int, watched: tuple[str, ...]) -> None:
    """Trace this process and SIGKILL it just before the n-th line run in a watched file."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
            if count == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return local

    def tracer(frame, event, arg):
        return local(frame, event, arg) if frame.f_code.co_filename in watched else None

    sys.settrace(tracer)


def _commit_in_child(staged: StagedFolder, kill_at: int, exchange: bool) -> bool:
    """Fork; the child commits and is SIGKILLed at line `kill_at`. True when the kill happened."""
    pid = os.fork()
    if pid == 0:  # child: file operations only, then the kill or a quiet exit
        try:
            if not exchange:
                export._exchange = lambda a, b: False
            os.fsync = lambda fd: None  # durability is not under test (a killed process loses no page cache)
            _kill_at_line(kill_at, (export.__file__,))
            staged.commit()
            sys.settrace(None)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the committing child hung")
        time.sleep(0.001)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _exchange_works(folder: Path) -> bool:
    a, b = folder / "swap-a", folder / "swap-b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    try:
        ok = export._exchange(a, b)
    except OSError:
        ok = False
    result = ok and (b / "x").is_file()
    shutil.rmtree(a)
    shutil.rmtree(b)
    return result


@needs_fork
@pytest.mark.parametrize("previous", [True, False], ids=["replace", "fresh"])
@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_sigkill_at_every_line_of_commit_never_loses_the_output(tmp_path: Path, previous: bool, exchange: bool) -> None:
    """Kill the process before each line of export.py the commit runs, one kill per run.

    With an atomic exchange the target is old or new at every instant. Without one (systems
    that lack it), a kill between the two renames leaves the target absent for a moment, and
    `clean_stale_staging` must put the previous output back rather than delete it.
    """
    if exchange and not _exchange_works(tmp_path):
        pytest.skip("this system or file system has no atomic directory exchange")
    old_files = {"model.safetensors": b"old" * 3000, "README.md": b"old card", "sub/tokenizer.json": b"{}"}
    new_files = {"model.safetensors": b"new" * 5000, "alloy_recipe.yaml": b"merge_method: linear\n"}
    outcomes: dict[str, int] = {}
    kill_at = 1
    while True:
        assert kill_at < 2000, "the commit never finished"
        parent = tmp_path / f"run-{kill_at}"
        parent.mkdir()
        target = parent / "merged"
        if previous:
            for rel, data in old_files.items():
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                (target / rel).write_bytes(data)
        old = snapshot(target)
        staged = StagedFolder(target, overwrite=True).__enter__()
        assert staged.path is not None
        for rel, data in new_files.items():
            (staged.path / rel).write_bytes(data)
        new = snapshot(staged.path)

        killed = _commit_in_child(staged, kill_at, exchange)
        state = snapshot(target)
        stray = [n for n in leftovers(parent, target) if not n.startswith(STAGING_PREFIX)]
        assert not stray, f"kill at line {kill_at}: non-staging leftovers {stray}"
        if exchange or not previous:
            allowed = [old, new] if previous else [None, new]
            assert state in allowed, f"kill at line {kill_at}: the target is partial or missing"
        clean_stale_staging(parent)
        after = snapshot(target)
        assert leftovers(parent, target) == [], f"kill at line {kill_at}: clean_stale_staging left {leftovers(parent, target)}"
        assert after in ([old, new] if previous else [None, new]), f"kill at line {kill_at}: the output was lost"
        if exchange or state is not None:
            assert after == state, "cleaning changed a complete target"
        label = "old" if (previous and after == old) else "new" if after == new else "nothing"
        if previous and state is None:
            label = "restored"  # killed between the two renames: put back by clean_stale_staging
        outcomes[label] = outcomes.get(label, 0) + 1
        shutil.rmtree(parent)
        if not killed:
            assert after == new
            break
        kill_at += 1
    assert kill_at > 5, "the trace saw too few lines to mean anything"
    assert outcomes.get("new", 0) >= 1 and outcomes.get("old" if previous else "nothing", 0) >= 1
    if exchange or not previous:
        assert outcomes.get("restored", 0) == 0
    else:
        assert outcomes.get("restored", 0) >= 1  # the kills between the two renames were seen and repaired


def test_clean_stale_staging_restores_a_parked_output_only_when_the_target_is_gone(tmp_path: Path) -> None:
    parked = tmp_path / f"{STAGING_PREFIX}my-model-1a2b3c4d{export.REPLACED_SUFFIX}"
    parked.mkdir()
    (parked / "model.safetensors").write_bytes(b"previous")
    partial = tmp_path / f"{STAGING_PREFIX}my-model-k3j_x9q2"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    removed = clean_stale_staging(tmp_path)
    assert removed == [partial]
    assert (tmp_path / "my-model" / "model.safetensors").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-model", "notes"]

    parked.mkdir()
    (parked / "model.safetensors").write_bytes(b"older")
    assert clean_stale_staging(tmp_path) == [parked]
    assert (tmp_path / "my-model" / "model.safetensors").read_bytes() == b"previous"


# -- 2. SIGKILL at random points of a whole `alloy merge` ------------------------------------

_FORK_SERVER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)  # no OpenMP pool in the parent: forked children may use torch freely
    from merging.cli import main
    from merging.formats.safetensors_file import SafetensorsFile

    def change_input_after_get(victim, when, how):
        # Alter `victim` right after `when` was read (by get or read_into), before the merge has used its bytes.
        victim = Path(victim)
        original_get = SafetensorsFile.get
        original_read_into = SafetensorsFile.read_into

        def change():
            if how == "truncate":
                os.truncate(victim, 1000)
            else:  # rewritten in place with the same size, as a re-save of the same model would be
                data = bytearray(victim.read_bytes())
                data[-4:] = bytes(4)
                st = victim.stat()
                victim.write_bytes(bytes(data))
                os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

        def get(self, name):
            tensor = original_get(self, name)
            if self.path == victim and name == when:
                change()
            return tensor

        def read_into(self, name, out):
            original_read_into(self, name, out)
            if self.path == victim and name == when:
                change()

        SafetensorsFile.get = get
        SafetensorsFile.read_into = read_into

    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the merges print goes to stderr, not into the replies
    warm = json.loads(sys.stdin.readline())
    main(warm["argv"])  # imports and first-use costs are paid here, once, not in each child
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            log = os.open(cmd.get("log") or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            try:
                if cmd.get("change"):
                    change_input_after_get(**cmd["change"])
                code = main(cmd["argv"])
            except BaseException:
                code = 99
            os._exit(code)
        killed = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if cmd.get("delay") is not None and time.perf_counter() - start >= cmd["delay"]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                killed = True
                break
            time.sleep(0.0005)
        rc = None if killed else os.waitstatus_to_exitcode(status)
        print(json.dumps({"killed": killed, "rc": rc, "seconds": time.perf_counter() - start}), file=reply, flush=True)
    """
)


class ForkServer:
    """A process that imported Alloy once and forks one `alloy` command per request.

    Each request runs `merging.cli.main(argv)` in a fresh child, optionally SIGKILLed after
    `delay` seconds; a negative `rc` is a child killed by a signal it did not expect (a crash).
    """

    def __init__(self, warm_argv: list[str]):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )
        assert self.request({"argv": warm_argv}) == {"ready": True}

    def request(self, cmd: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the fork server died (rc {self.proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory: pytest.TempPathFactory):
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork (POSIX)")
    warm = make_family(tmp_path_factory.mktemp("warm"), tensors=2, numel=10)
    recipe = write_recipe(warm, "r.yaml", lam=1.0)
    server = ForkServer(["merge", str(recipe), "-o", str(warm / "out"), "-q"])
    yield server
    server.close()


def test_sigkill_at_random_points_of_a_merge_leaves_old_or_new_never_partial(tmp_path: Path, fork_server: ForkServer) -> None:
    models = make_family(tmp_path / "models", tensors=12, numel=1_000_000)
    new_recipe = write_recipe(models, "new.yaml", lam=1.0)
    old_recipe = write_recipe(models, "old.yaml", lam=0.5)
    parent = tmp_path / "outputs"
    parent.mkdir()
    target = parent / "merged"
    argv = ["merge", str(new_recipe), "-o", str(target), "--force", "--shard-size", "15MB", "-q"]

    # The previous output, and a timed run that makes the complete new one.
    run_merge(load_recipe(old_recipe), tmp_path / "pristine-old", shard_size=15_000_000)
    timed = [fork_server.request({"argv": argv}) for _ in range(2)]  # the second replaces the first
    assert [t["rc"] for t in timed] == [0, 0]
    duration = min(t["seconds"] for t in timed)
    target.rename(tmp_path / "pristine-new")
    old, new = snapshot(tmp_path / "pristine-old"), snapshot(tmp_path / "pristine-new")
    assert old != new and len(new) >= 5  # shards + index + recipe + card + config
    reference = open_checkpoint(tmp_path / "pristine-new")
    expected = {name: reference.get(name).clone() for name in reference.names()}
    reference.close()

    rng = random.Random(1234)
    points = 10
    outcomes: dict[tuple[bool, str], int] = {}
    for previous in (True, False):
        for k in range(points):  # stratified: one kill in each tenth of the run, the last ones past its end
            if previous:
                shutil.copytree(tmp_path / "pristine-old", target)
            delay = (k + rng.random()) / points * duration * 1.25
            result = fork_server.request({"argv": argv, "delay": delay})
            assert result["killed"] or result["rc"] == 0, result
            if not result["killed"]:  # a busy machine makes runs slower or faster: keep the kills inside them
                duration = min(duration, result["seconds"])
            state = snapshot(target)
            stray = [n for n in leftovers(parent, target) if not n.startswith(STAGING_PREFIX)]
            assert not stray, f"kill after {delay:.3f} s left {stray}"
            assert state in ([old, new] if previous else [None, new]), f"kill after {delay:.3f} s: partial target"
            if state == new:
                got = open_checkpoint(target)
                assert got.names() == list(expected)
                for name, tensor in expected.items():
                    assert torch.equal(got.get(name), tensor), name
                got.close()
            clean_stale_staging(parent)
            assert leftovers(parent, target) == [] and snapshot(target) == state
            label = "new" if state == new else "old" if state is not None else "nothing"
            outcomes[(previous, label)] = outcomes.get((previous, label), 0) + 1
            if target.exists():
                shutil.rmtree(target)
    print(f"merge {duration:.2f} s; outcomes {outcomes}")
    # Kills landed inside the run, and the previous output (or nothing) survived them.
    assert outcomes.get((True, "old"), 0) >= 3
    assert outcomes.get((False, "nothing"), 0) >= 3


# -- 3. Disk full -----------------------------------------------------------------------------


class _FillingFile:
    """A real file that raises ENOSPC once `room` bytes were written, as a full disk does."""

    def __init__(self, fh, room: list[int]):
        self._fh = fh
        self._room = room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self._room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._fh.name)
        self._room[0] -= size
        return self._fh.write(data)

    def __getattr__(self, name: str):
        return getattr(self._fh, name)


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    shared = [room]
    monkeypatch.setattr(safetensors_writer, "open", lambda path, mode="r", *a, **k: _FillingFile(open(path, mode, *a, **k), shared), raising=False)


@pytest.fixture()
def small_family(tmp_path: Path) -> Path:
    models = make_family(tmp_path / "models", tensors=6, numel=50_000)
    write_recipe(models, "r.yaml", lam=0.7)
    return models


@pytest.mark.parametrize("previous", [True, False], ids=["replace", "fresh"])
@pytest.mark.parametrize("room", [0, 100, 700_000], ids=["at-header", "in-header", "in-data"])
def test_disk_full_during_merge_is_one_clear_error_and_cleans_up(
    small_family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, previous: bool, room: int
) -> None:
    parent = tmp_path / "outputs"
    parent.mkdir()
    target = parent / "merged"
    if previous:
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"previous weights")
    before = snapshot(target)
    fill_disk_after(monkeypatch, room)
    with pytest.raises(ExportError) as info:
        run_merge(load_recipe(small_family / "r.yaml"), target, overwrite=True, shard_size=400_000)
    message = str(info.value)
    assert "disk is full" in message and str(target) in message and "\n" not in message
    assert snapshot(target) == before
    assert leftovers(parent, target) == []


def test_disk_full_through_the_cli_is_one_line_exit_1(small_family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    fill_disk_after(monkeypatch, 300_000)
    rc = cli_main(["merge", str(small_family / "r.yaml"), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("alloy: error: ") and err.count("\n") == 1 and "disk is full" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_disk_full_during_export_checkpoint(small_family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fill_disk_after(monkeypatch, 200_000)
    source = open_checkpoint(small_family / "ft0")
    with pytest.raises(ExportError, match="disk is full"):
        export_checkpoint(source, tmp_path / "exported", dtype=torch.float16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


@pytest.fixture()
def tiny_tmpfs(tmp_path: Path):
    """A 1 MiB tmpfs: a real file system that fills up. Skips where mounting is not permitted."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if shutil.which("mount") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


@pytest.mark.parametrize("previous", [True, False], ids=["replace", "fresh"])
def test_real_full_disk_leaves_the_target_and_the_space_as_they_were(small_family: Path, tiny_tmpfs: Path, previous: bool) -> None:
    target = tiny_tmpfs / "merged"
    if previous:
        target.mkdir()
        (target / "model.safetensors").write_bytes(os.urandom(100_000))
    before, used = snapshot(target), shutil.disk_usage(tiny_tmpfs).used
    # Six float32 tensors of 50 000 values: 1.2 MB of weights for a 1 MiB disk.
    with pytest.raises(ExportError) as info:
        run_merge(load_recipe(small_family / "r.yaml"), target, overwrite=True)
    assert "disk is full" in str(info.value) and str(target) in str(info.value)
    assert snapshot(target) == before
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == (["merged"] if previous else [])
    assert shutil.disk_usage(tiny_tmpfs).used == used


# -- 4. An input that changes on disk during the merge -----------------------------------------

def _merge_while_changing(server: ForkServer, models: Path, tmp_path: Path, how: str) -> tuple[dict, str]:
    victim = models / "ft1" / "model.safetensors"
    log = tmp_path / "merge.log"
    argv = ["merge", str(models / "r.yaml"), "-o", str(tmp_path / "out"), "-q"]
    result = server.request({"argv": argv, "log": str(log), "change": {"victim": str(victim), "when": "layers.2.weight", "how": how}})
    return result, log.read_text()


def test_input_rewritten_in_place_during_merge_is_detected(small_family: Path, tmp_path: Path, fork_server: ForkServer) -> None:
    result, err = _merge_while_changing(fork_server, small_family, tmp_path, "rewrite")
    victim = small_family / "ft1" / "model.safetensors"
    assert result["rc"] == 1, err
    assert err.startswith("alloy: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "changed on disk during the merge" in err and str(victim) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.log", "models"]


def test_input_truncated_during_merge_is_an_error_not_a_crash(small_family: Path, tmp_path: Path, fork_server: ForkServer) -> None:
    result, err = _merge_while_changing(fork_server, small_family, tmp_path, "truncate")
    assert result["rc"] == 1, f"rc {result['rc']} (negative: killed by signal {-(result['rc'] or 0)})"
    assert "changed on disk" in err and "ft1" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.log", "models"]
