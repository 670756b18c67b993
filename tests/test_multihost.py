"""Multi-host for real: 2 processes x 4 CPU devices through JAX's multi-controller runtime (gloo collectives),
against one process with 8 devices on the same global batches (tests/multihost_worker.py).

The subprocess tests (marker `multihost`) run in `make test-multihost`; the checks of the launch settings
need no second process and run in `make test`. Every subprocess has a timeout and is killed past it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from miss_jax import sharding as S
from miss_jax import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
EXAMPLE = os.path.join(ROOT, "examples", "train_sharded.py")
RUN_TIMEOUT = 240  # seconds any one subprocess may run


# --------------------------------------------------------------------------- launch settings (no second process)


@pytest.fixture
def no_jax_env(monkeypatch):
    for name in (S.COORDINATOR_ENV, S.NUM_PROCESSES_ENV, S.PROCESS_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_come_from_arguments_or_the_environment(no_jax_env):
    assert S.distributed_settings() is None  # nothing set: JAX's own cluster detection
    assert S.distributed_settings("10.0.0.1:1234", 4, 3) == ("10.0.0.1:1234", 4, 3)
    no_jax_env.setenv(S.COORDINATOR_ENV, "host-0:8476")
    no_jax_env.setenv(S.NUM_PROCESSES_ENV, "2")
    no_jax_env.setenv(S.PROCESS_ID_ENV, "1")
    assert S.distributed_settings() == ("host-0:8476", 2, 1)
    assert S.distributed_settings(process_id=0) == ("host-0:8476", 2, 0)  # an argument beats the variable


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(coordinator="127.0.0.1:1234", process_id=0), "JAX_NUM_PROCESSES (or --num-processes) not set"),
        (dict(coordinator="127.0.0.1:1234", num_processes=2), "JAX_PROCESS_ID (or --process-id) not set"),
        (dict(num_processes=2, process_id=0), "JAX_COORDINATOR_ADDRESS (or --coordinator) not set"),
        (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2), "out of range for 2 processes"),
        (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=-1), "distinct id in 0..1"),
        (dict(coordinator="127.0.0.1:1234", num_processes=0, process_id=0), "must be at least 1"),
        (dict(coordinator="127.0.0.1:1234", num_processes="two", process_id=0), "must be an integer, got 'two'"),
        (dict(coordinator="127.0.0.1", num_processes=2, process_id=0), "must be HOST:PORT"),
        (dict(coordinator="127.0.0.1:port", num_processes=2, process_id=0), "must be HOST:PORT"),
        (dict(coordinator="127.0.0.1:70000", num_processes=2, process_id=0), "must be HOST:PORT"),
    ],
)
def test_bad_settings_name_the_fix(no_jax_env, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        S.distributed_settings(**kwargs)


def test_an_unreachable_coordinator_is_an_error_in_bounded_time():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"No multi-host coordinator at 127\.0\.0\.1:\d+ after 1 s.*Start process 0"):
        S.wait_for_coordinator(f"127.0.0.1:{free_port()}", 1)
    assert time.monotonic() - start < 10


def test_joining_after_a_jax_computation_is_an_error_naming_the_order(no_jax_env):
    import jax.numpy as jnp

    float(jnp.ones(()))  # the backend is up: too late to join a multi-host run
    with pytest.raises(RuntimeError, match="no JAX computation ran before this call"):
        S.initialize_distributed(f"127.0.0.1:{free_port()}", 1, 0, timeout=5)


# --------------------------------------------------------------------------- subprocesses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(PYTHONPATH=ROOT, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", **extra)
    return env


def start(args: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen], logs: list[str], timeout: float = RUN_TIMEOUT) -> list[int]:
    """Exit codes of `procs`, each killed (SIGKILL: JAX catches SIGTERM) past `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            pytest.fail(f"multi-host run still going after {timeout} s: " + " | ".join(tail(log) for log in logs))
    return codes


def tail(log: str, lines: int = 15) -> str:
    with open(log) as f:
        return "\n".join(f.read().splitlines()[-lines:])


def two_process_envs(devices: int = 4) -> list[dict[str, str]]:
    address = f"127.0.0.1:{free_port()}"
    return [environment(devices, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
            for i in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker as 2 processes x 4 devices and as 1 process x 8 devices (run side by side)."""
    multi, single = tmp_path_factory.mktemp("two_hosts"), tmp_path_factory.mktemp("one_host")
    logs = [str(multi / "log_0"), str(multi / "log_1"), str(single / "log")]
    procs = [start([WORKER, "--distributed", "--out", str(multi)], env, log)
             for env, log in zip(two_process_envs(), logs)]
    procs.append(start([WORKER, "--out", str(single)], environment(8), logs[2]))
    codes = finish(procs, logs)
    assert codes == [0, 0, 0], " | ".join(tail(log) for log in logs)

    def read(folder, i):
        with open(folder / f"result_{i}.json") as f:
            return json.load(f), dict(np.load(folder / f"trained_{i}.npz", allow_pickle=False))

    return {"multi": [read(multi, i) for i in range(2)], "single": read(single, 0), "multi_dir": multi,
            "single_dir": single}


@pytest.mark.multihost
def test_two_processes_make_one_8_device_mesh_with_the_adapter_sharded_across_them(runs):
    for i, (result, _) in enumerate(runs["multi"]):
        assert (result["process_index"], result["process_count"]) == (i, 2)
        assert (result["device_count"], result["local_device_count"]) == (8, 4)
        assert result["adapter_sharded_over_hosts"]  # FSDP: no process holds the whole adapter
    single, _ = runs["single"]
    assert (single["process_count"], single["device_count"]) == (1, 8)


@pytest.mark.multihost
def test_the_sharded_step_equals_one_process_on_the_same_global_batches(runs):
    single, single_trained = runs["single"]
    for result, trained in runs["multi"]:
        np.testing.assert_allclose(result["losses"], single["losses"], atol=1e-5, rtol=0)
        assert trained.keys() == single_trained.keys() and len(trained) > 0
        for key in trained:
            np.testing.assert_allclose(trained[key], single_trained[key], atol=1e-5, rtol=0, err_msg=key)
    assert result["losses"][-1] < result["losses"][0]


@pytest.mark.multihost
def test_the_checkpoint_written_by_both_restores_in_both_and_resumes_exactly(runs):
    for result, _ in runs["multi"]:
        assert result["restored_step"] == 2 and result["restore_diff"] == 0.0 and result["restored_sharded_ok"]
        assert result["resume_diff"] == 0.0 and result["resumed_loss"] == result["losses"][2]
    folder = str(runs["multi_dir"] / "checkpoint")
    assert T.latest_step(folder) == 2
    assert sorted(os.listdir(folder)) == ["2"]  # no temporary folder left behind
    # the 2-process checkpoint restores in a plain process too: the trainables at step 2 of the 1-process run
    saved, _ = T.read_checkpoint(folder)
    single_saved, _ = T.read_checkpoint(str(runs["single_dir"] / "checkpoint"))
    for a, b in zip(jax_leaves(saved["trainable"]), jax_leaves(single_saved["trainable"])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def jax_leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.multihost
def test_save_pretrained_gathers_the_shards_and_process_0_writes_one_folder(runs):
    multi, single = runs["multi_dir"], runs["single_dir"]
    assert os.path.isdir(multi / "adapter_0") and not os.path.exists(multi / "adapter_1")
    assert sorted(os.listdir(multi / "adapter_0")) == sorted(os.listdir(single / "adapter_0"))
    configs = []
    for folder in (multi, single):
        with open(folder / "adapter_0" / "adapter_config.json") as f:
            configs.append(json.load(f))
    assert configs[0] == configs[1]
    got = load_file(str(multi / "adapter_0" / "adapter_model.safetensors"))
    want = load_file(str(single / "adapter_0" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and len(got) > 0
    for key in got:
        assert got[key].shape == want[key].shape
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.multihost
def test_merge_keeps_every_sharding_across_processes(runs):
    for result, _ in runs["multi"]:
        assert result["shardings_kept"] and result["merge_diff"] < 1e-4


@pytest.mark.multihost
def test_a_killed_process_makes_the_other_exit_with_a_clear_error(tmp_path):
    logs = [str(tmp_path / "log_0"), str(tmp_path / "log_1")]
    procs = [start([WORKER, "--mode", "die", "--distributed", "--out", str(tmp_path)], env, log)
             for env, log in zip(two_process_envs(), logs)]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while "step 1 done" not in open(logs[1]).read():
            assert procs[1].poll() is None and time.monotonic() < deadline, tail(logs[1])
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = finish(procs[:1], logs[:1], timeout=60)[0]
        elapsed = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    with open(logs[0]) as f:
        survivor = f.read()
    # Its collective fails first (gloo: "Connection reset by peer") or it waits for the coordination service to miss
    # the dead process's heartbeats; either way JAX ends it, naming the cause.
    assert code != 0, survivor[-3000:]
    assert elapsed < 60, survivor[-3000:]  # the worker's heartbeat timeout is 10 s
    assert "another task died" in survivor and "stopped sending heartbeats" in survivor, survivor[-3000:]


@pytest.mark.multihost
@pytest.mark.parametrize("save", ["checkpoint", "adapter"])
def test_a_process_dying_mid_save_leaves_no_half_written_checkpoint_or_folder(tmp_path, save):
    """Process 1 is killed just before the save; process 0, inside it (orbax's barriers, the adapter's gather),
    stops within the heartbeat timeout, and nothing readable is left half-written."""
    logs = [str(tmp_path / "log_0"), str(tmp_path / "log_1")]
    procs = [start([WORKER, "--distributed", "--crash-before", save, "--out", str(tmp_path)], env, log)
             for env, log in zip(two_process_envs(), logs)]
    codes = finish(procs, logs)
    assert codes[1] == -signal.SIGKILL and f"crashing before the {save} save" in tail(logs[1])
    with open(logs[0]) as f:
        assert codes[0] != 0 and "another task died" in f.read()
    checkpoints = str(tmp_path / "checkpoint")
    if save == "checkpoint":
        assert T.latest_step(checkpoints) is None
        with pytest.raises(FileNotFoundError, match="No checkpoint"):  # no folder, or no complete step in it
            T.read_checkpoint(checkpoints)
    else:
        assert T.latest_step(checkpoints) == 2  # the save before is whole
        assert not os.path.exists(tmp_path / "adapter_0")


@pytest.mark.multihost
def test_the_example_runs_as_documented_with_the_environment_or_the_flags(tmp_path):
    """Process 0 through the JAX_* variables, process 1 through --coordinator/--num-processes/--process-id."""
    args = ["--strategy", "fsdp", "--hidden", "32", "--layers", "1", "--seq", "16", "--batch", "8", "--r", "4",
            "--steps", "2", "--text", os.path.join(ROOT, "README.md"), "--out", str(tmp_path / "out"), "--distributed"]
    envs = two_process_envs()
    flags = ["--coordinator", envs[1]["JAX_COORDINATOR_ADDRESS"], "--num-processes", "2", "--process-id", "1"]
    env_1 = {k: v for k, v in envs[1].items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
    logs = [str(tmp_path / "log_0"), str(tmp_path / "log_1")]
    procs = [start([EXAMPLE, *args], envs[0], logs[0]), start([EXAMPLE, *args, *flags], env_1, logs[1])]
    assert finish(procs, logs) == [0, 0], " | ".join(tail(log) for log in logs)
    out = tail(logs[0], 40)
    assert "(2 host(s), 8 cpu devices)" in out and "every param kept its sharding: True" in out
    assert T.latest_step(str(tmp_path / "out" / "checkpoint")) == 2
    assert os.path.isfile(tmp_path / "out" / "adapter" / "adapter_model.safetensors")


@pytest.mark.multihost
def test_a_process_id_out_of_range_or_a_missing_coordinator_fails_fast(tmp_path):
    log = str(tmp_path / "log")
    bad_id = environment(4, JAX_COORDINATOR_ADDRESS="127.0.0.1:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="2")
    assert finish([start([EXAMPLE, "--distributed"], bad_id, log)], [log], timeout=60) == [1]
    assert "JAX_PROCESS_ID / --process-id 2 is out of range for 2 processes" in tail(log)
    flags = ["--distributed", "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "1",
             "--timeout", "3"]
    start_time = time.monotonic()
    assert finish([start([EXAMPLE, *flags], environment(4), log)], [log], timeout=60) == [1]
    assert time.monotonic() - start_time < 45
    assert "No multi-host coordinator at 127.0.0.1:" in tail(log)
