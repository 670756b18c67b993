"""Saves that never lose a file: only the adapter's own files are replaced, each by an atomic rename,
through symbolic links, in `.`, in read-only places, under SIGKILL at random moments and with two
savers at once (real processes); and no command overwrites its own input."""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

import tiny_models as tm
from interop import state_dict
from interop import safetensors_io as files
from interop.cli import main
from interop.folder_write import RESERVED_NAMES, write_adapter_folders
from interop_helpers import perturb_trainables
from miss_jax import MissConfig, MissModel, get_peft_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEMP = re.compile(r"\.(adapter_config\.json|adapter_model\.safetensors)\.([0-9a-f]{12})\.tmp")
ADAPTER_FILES = {files.CONFIG_NAME, files.WEIGHTS_NAME}
# Two adapters that differ in config and in tensor keys, so any mix of their files shows.
CONFIGS = {
    "A": MissConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj"]),
    "B": MissConfig(r=8, init_weights="bat", target_modules=["o_proj"]),
}
# A child process that saves the two adapters over and over (A at the root and B in `other/`, then the
# other way round) through the same call save_pretrained ends in, until it has saved `count` times.
SAVER = """
import json, os, sys, time
from safetensors.numpy import load_file
from interop import folder_write
target, count, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
refs = [(json.load(open(os.path.join(r, "adapter_config.json"))),
         load_file(os.path.join(r, "adapter_model.safetensors"))) for r in sys.argv[4:]]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
for i in range(count):
    folder_write.write_adapter_folders(target, {"": refs[i % 2], "other": refs[(i + 1) % 2]})
"""


@pytest.fixture(scope="module")
def models():
    """A tiny llama with adapter A, and one with adapter B (trained-looking: kaiming / bat init)."""
    return {name: get_peft_model(tm.flax_model("llama"), config) for name, config in CONFIGS.items()}


@pytest.fixture(scope="module")
def refs(models, tmp_path_factory):
    """`{name: folder}` of each adapter saved alone, and `{name: (config, tensors)}` as read back."""
    root = tmp_path_factory.mktemp("refs")
    folders = {}
    for name, model in models.items():
        model.save_pretrained(str(root / name))
        folders[name] = str(root / name)
    return folders


def _contents(folder: str) -> tuple[dict, dict]:
    with open(os.path.join(folder, files.CONFIG_NAME)) as f:
        config = json.load(f)
    return config, load_file(os.path.join(folder, files.WEIGHTS_NAME))


def _which(folder: str, refs: dict[str, str]) -> str:
    """The reference adapter `folder` holds, read with miss-jax's readers, exactly (config and every tensor)."""
    config, tensors = files.read_config(folder), files.read_tensors(folder)
    for name, ref in refs.items():
        ref_config, ref_tensors = _contents(ref)
        if config == ref_config and sorted(tensors) == sorted(ref_tensors):
            if all(np.array_equal(np.asarray(tensors[k]), ref_tensors[k]) for k in ref_tensors):
                return name
    raise AssertionError(f"{folder} holds neither adapter: a mix of two saves")


def _user_files(folder: pathlib.Path) -> dict[str, bytes]:
    """Puts a user's files in and around an adapter folder; returns them (relative path -> bytes)."""
    made = {
        "README.md": b"my model card",
        "notes.txt": b"lr 1e-3",
        "other/README.md": b"the other adapter's card",
        "other/eval.json": b"{}",
        "runs/1/log.txt": b"step 1",
    }
    for relative, data in made.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    return made


def _assert_user_files(folder: pathlib.Path, made: dict[str, bytes]) -> None:
    for relative, data in made.items():
        assert (folder / relative).read_bytes() == data, relative


def _entries(folder: pathlib.Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _save(models, name: str, folder, **kwargs) -> None:
    models[name].save_pretrained(str(folder), **kwargs)


# --------------------------------------------------------------------------- what a save touches


def test_resave_replaces_only_the_adapter_files(models, refs, tmp_path):
    """User files at the root and inside another adapter's sub-folder stay; the folder keeps its inode."""
    out = tmp_path / "out"
    _save(models, "A", out)
    made = _user_files(out)
    write_adapter_folders(str(out), {"other": _contents(refs["B"])})
    inode, before = out.stat().st_ino, _entries(out)
    _save(models, "B", out)
    assert out.stat().st_ino == inode and _entries(out) == before
    _assert_user_files(out, made)
    assert _which(str(out), refs) == "B" and _which(str(out / "other"), refs) == "B"
    assert not [p for p in out.rglob(".*")]  # no temporary file left


@pytest.mark.parametrize("where", ["same file system", "other file system"])
def test_save_through_a_symlink_writes_into_its_target(models, refs, tmp_path, where):
    base = pathlib.Path("/dev/shm") if where == "other file system" else tmp_path
    if where == "other file system" and (not base.is_dir() or base.stat().st_dev == tmp_path.stat().st_dev):
        pytest.skip("no second file system (/dev/shm) here")
    real = pathlib.Path(base) / f"miss-jax-real-{os.getpid()}-{tmp_path.name}"
    try:
        _save(models, "A", real)
        made = _user_files(real)
        (tmp_path / "links").mkdir()
        link = tmp_path / "links" / "link"
        link.symlink_to(real, target_is_directory=True)
        _save(models, "B", link)
        assert link.is_symlink() and os.readlink(link) == str(real)
        assert _which(str(real), refs) == "B"
        _assert_user_files(real, made)
        assert os.listdir(tmp_path / "links") == ["link"] and not list(real.rglob(".*"))
        loaded = MissModel.from_pretrained(tm.flax_model("llama"), str(link))
        assert loaded.peft_config["default"].variant == "bat"
    finally:
        shutil.rmtree(real, ignore_errors=True)


def test_save_into_the_working_directory(models, refs, tmp_path, monkeypatch):
    """`save_pretrained(".")` writes into the working directory, which stays (same inode)."""
    monkeypatch.chdir(tmp_path)
    made = _user_files(tmp_path)
    inode = os.stat(".").st_ino
    _save(models, "A", ".")
    _save(models, "B", ".")
    assert os.stat(os.getcwd()).st_ino == inode and _which(".", refs) == "B"
    _assert_user_files(tmp_path, made)


@pytest.fixture
def read_only(tmp_path):
    """Makes paths mode 555 (restored afterwards, so that tmp_path can be cleaned up)."""
    paths = []

    def make(path: pathlib.Path) -> None:
        path.chmod(0o555)
        paths.append(path)

    yield make
    for path in paths:
        path.chmod(0o755)


def test_read_only_target_is_never_replaced(models, refs, tmp_path, read_only):
    """PEFT writes into a 555 folder only where it may (root may; others get PermissionError): so does
    miss-jax, and the folder itself, its mode and its files stay either way."""
    out = tmp_path / "out"
    _save(models, "A", out)
    made = _user_files(out)
    read_only(out)
    inode = out.stat().st_ino
    if os.geteuid() == 0:  # root writes anywhere, as with PEFT
        _save(models, "B", out)
        assert _which(str(out), refs) == "B"
    else:
        with pytest.raises(PermissionError, match="not writable"):
            _save(models, "B", out)
        assert _which(str(out), refs) == "A"
    assert out.stat().st_ino == inode and stat.S_IMODE(out.stat().st_mode) == 0o555
    _assert_user_files(out, made)
    assert sorted(os.listdir(tmp_path)) == ["out"] and not list(out.rglob(".*"))


def test_writable_target_in_a_read_only_parent(models, refs, tmp_path, read_only):
    parent = tmp_path / "parent"
    _save(models, "A", parent / "out")
    read_only(parent)
    _save(models, "B", parent / "out")
    assert _which(str(parent / "out"), refs) == "B" and os.listdir(parent) == ["out"]


def test_reserved_and_path_like_adapter_names_are_refused(models, refs, tmp_path):
    """An adapter whose sub-folder would take the name of a file of the folder (or leave it) is refused
    before anything is written."""
    out = tmp_path / "out"
    _save(models, "A", out)
    before = {p: p.read_bytes() for p in out.iterdir()}
    for name in [*sorted(RESERVED_NAMES), "..", "a/b"]:
        with pytest.raises(ValueError, match="cannot be saved.*Rename the adapter"):
            write_adapter_folders(str(out), {"": _contents(refs["B"]), name: _contents(refs["B"])})
    assert {p: p.read_bytes() for p in out.iterdir()} == before
    model = get_peft_model(tm.flax_model("llama"), CONFIGS["A"])
    with pytest.raises(ValueError, match="'adapter_model.safetensors'"):  # at add_adapter or at the save
        model.add_adapter("adapter_model.safetensors", CONFIGS["B"])
        model.save_pretrained(str(out))
    assert {p: p.read_bytes() for p in out.iterdir()} == before


# --------------------------------------------------------------------------- interruptions


def _interrupt_at_rename(monkeypatch, n: int) -> None:
    """Makes the n-th `os.replace` from now raise KeyboardInterrupt (a signal between two renames)."""
    real, calls = os.replace, []

    def replace(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == n:
            raise KeyboardInterrupt("between the renames")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_interrupted_between_the_two_renames(models, refs, tmp_path, monkeypatch):
    """New weights with the old config: refused by the loaders with the `mv` that finishes the save;
    the next save finishes it too. Equal configs (re-saving the same adapter) load as they are."""
    out = tmp_path / "out"
    _save(models, "A", out)
    with monkeypatch.context() as m:
        _interrupt_at_rename(m, 2)  # the weights are renamed, the config is not
        with pytest.raises(KeyboardInterrupt):
            _save(models, "B", out)
    pending = [p for p in out.iterdir() if TEMP.fullmatch(p.name)]
    assert [p.name.split(".")[1] for p in pending] == ["adapter_config"]
    with pytest.raises(ValueError, match=rf"interrupted .* mv {re.escape(str(pending[0]))} "):
        MissModel.from_pretrained(tm.flax_model("llama"), str(out))
    assert main(["inspect", str(out)]) == 2
    os.replace(pending[0], out / files.CONFIG_NAME)  # the fix the message gives
    assert _which(str(out), refs) == "B"

    with monkeypatch.context() as m:
        _interrupt_at_rename(m, 2)
        with pytest.raises(KeyboardInterrupt):
            _save(models, "A", out)
    _save(models, "B", out)  # tidies first: finishes the rename, then saves
    assert _which(str(out), refs) == "B" and not [p for p in out.iterdir() if p.name.startswith(".")]

    model = get_peft_model(tm.flax_model("llama"), CONFIGS["B"])
    perturb_trainables(model, 3)  # the folder's config, other weights: as when re-saving during training
    with monkeypatch.context() as m:
        _interrupt_at_rename(m, 2)
        with pytest.raises(KeyboardInterrupt):
            model.save_pretrained(str(out))
    loaded = MissModel.from_pretrained(tm.flax_model("llama"), str(out))
    got, want = (state_dict.get_peft_model_state_dict(m) for m in (loaded, model))
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_a_later_save_removes_only_temporary_files_it_recognises(models, refs, tmp_path):
    out = tmp_path / "out"
    _save(models, "A", out)
    stale = [".adapter_model.safetensors.0123456789ab.tmp", ".adapter_config.json.0123456789ab.tmp"]
    kept = [".adapter_model.safetensors.0123456789ab.tmp.bak", ".adapter_model.safetensors.backup",
            ".notes.0123456789ab.tmp", "adapter_model.safetensors.0123456789ab.tmp"]
    for name in stale + kept:
        (out / name).write_bytes(b"x")
    _save(models, "B", out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*ADAPTER_FILES, *kept, "README.md"])  # + the model card


def _start_saver(target: pathlib.Path, count: int, go: pathlib.Path, refs: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target), str(count), str(go), *refs],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _check_after_kill(out: pathlib.Path, made: dict[str, bytes], refs: dict[str, str]) -> list[str]:
    """Each adapter folder holds adapter A or B exactly, or refuses with the interrupted-save fix; user
    files are in place; the only other entries are one killed save's recognisable temporary files."""
    outcomes = []
    for folder, user in ((out, {p.split("/")[0] for p in made}),
                         (out / "other", {p.split("/")[1] for p in made if p.startswith("other/")})):
        extra = set(os.listdir(folder)) - ADAPTER_FILES - user
        tokens = {TEMP.fullmatch(n).group(2) for n in extra if TEMP.fullmatch(n)}
        assert all(TEMP.fullmatch(n) for n in extra) and len(tokens) <= 1, extra
        try:
            outcomes.append(_which(str(folder), refs))
        except ValueError as e:
            assert "interrupted" in str(e) and " mv " in str(e), e
            outcomes.append("interrupted")
    _assert_user_files(out, made)
    assert sorted(os.listdir(out.parent)) == ["go", "out"]
    return outcomes


def test_sigkill_at_random_moments_loses_nothing(models, refs, tmp_path):
    """20 saver processes killed (SIGKILL) at seeded random moments of their saves."""
    out = tmp_path / "out"
    _save(models, "A", out)
    write_adapter_folders(str(out), {"other": _contents(refs["B"])})
    made = _user_files(out)
    go = tmp_path / "go"
    go.touch()
    rng = random.Random(0)
    seen = []
    for _ in range(20):
        proc = _start_saver(out, 10_000, go, [refs["A"], refs["B"]])
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        seen += _check_after_kill(out, made, refs)
    assert {"A", "B"} <= set(seen)  # the kills did land after saves completed, in both orders
    proc = _start_saver(out, 1, go, [refs["A"], refs["B"]])  # a save after all that: clean and complete
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert _which(str(out), refs) == "A" and _which(str(out / "other"), refs) == "B"
    assert not [p for p in out.rglob(".*")]
    _assert_user_files(out, made)
    loaded = MissModel.from_pretrained(tm.flax_model("llama"), str(out))
    loaded.load_adapter(str(out), "other", subfolder="other")


def test_two_savers_at_once(models, refs, tmp_path):
    """Two processes saving into the same folders at the same time: they take turns (a lock per folder),
    so each folder ends with one complete adapter, user files in place, no temporary file left."""
    out = tmp_path / "out"
    _save(models, "B", out)
    made = _user_files(out)
    go = tmp_path / "go"
    savers = [_start_saver(out, 12, go, order) for order in ([refs["A"], refs["B"]], [refs["B"], refs["A"]])]
    go.touch()
    for proc in savers:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert {_which(str(out), refs), _which(str(out / "other"), refs)} == {"A", "B"}
    _assert_user_files(out, made)
    assert not [p for p in out.rglob(".*")]
    assert sorted(os.listdir(tmp_path)) == ["go", "out"]


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("option", ["SRC", "--base"])
def test_convert_never_overwrites_its_inputs(models, tmp_path, capsys, option):
    """`miss-jax convert SRC --to lora --out SRC` (or --out the base folder) is refused, nothing written."""
    src, base = tmp_path / "src", tmp_path / "base"
    _save(models, "A", src)
    tm.flax_model("llama").save_pretrained(str(base))
    before = {p: p.read_bytes() for p in (*src.rglob("*"), *base.rglob("*")) if p.is_file()}
    out = src if option == "SRC" else base
    code = main(["convert", str(src), "--to", "lora", "--base", str(base), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"which is {option}" in err and "never overwrites its own input" in err, err
    assert {p: p.read_bytes() for p in (*src.rglob("*"), *base.rglob("*")) if p.is_file()} == before
