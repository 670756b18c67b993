"""`interop.gguf` and `miss-jax gguf`: a GGUF checkpoint as a cached transformers folder; bad input refused
with the fix named, nothing written half."""

from __future__ import annotations

import json
import os

import pytest

from interop import gguf
from interop.cli import main as cli_main
from real_checkpoint import smollm2_folder


def test_the_cached_folder_is_an_ordinary_transformers_folder_with_the_models_special_tokens() -> None:
    folder = smollm2_folder()
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert (config["model_type"], config["num_hidden_layers"], config["rope_theta"]) == ("llama", 30, 100000.0)
    assert config["tie_word_embeddings"] is True and config["eos_token_id"] == 2
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 2  # the GGUF's tokenizer says eos 1, no pad
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert gguf.cached_folder() == folder  # the second call reuses the cache


def test_cli_prints_the_cached_folder(capsys) -> None:
    assert cli_main(["gguf"]) == 0
    assert capsys.readouterr().out.strip() == smollm2_folder()


@pytest.mark.parametrize("content, message", [
    (None, "No GGUF file"),
    (b"PK\x03\x04 not a gguf", "not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00" + b"\x00" * 40, "could not be read as a GGUF model"),  # truncated after the magic
])
def test_missing_or_corrupt_gguf_is_refused_and_nothing_is_written(tmp_path, capsys, content, message) -> None:
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises((OSError, ValueError), match=message):
        gguf.convert_gguf(str(path), str(out))
    assert cli_main(["gguf", str(path), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == (["model.gguf"] if content is not None else [])  # no folder, no temp


def test_an_existing_out_folder_is_refused(tmp_path) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="exists"):
        gguf.convert_gguf(gguf.smollm2_gguf(), str(tmp_path))
    assert os.listdir(tmp_path) == ["mine.txt"]
