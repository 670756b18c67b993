"""`make demo-llm`'s pieces that run in seconds: the shipped data is what its seeded script writes, the held-out
prompts are not trained on, the train batches supervise the answer only, and a tokenizer without a chat
template is refused. (The job itself, ~15 minutes on 2 cores, is `make demo-llm`; its parts are tested on
the real checkpoint in tests/test_real_checkpoint.py.)"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

from real_checkpoint import smollm2_folder
from test_examples import EXAMPLES, load_example


@pytest.fixture(scope="module")
def demo():
    return load_example("finetune_llm")


def test_the_shipped_data_is_what_the_seeded_script_writes(tmp_path) -> None:
    out = tmp_path / "word_pick.jsonl"
    subprocess.run([sys.executable, os.path.join(EXAMPLES, "data", "make_word_pick.py"), "--out", str(out)],
                   check=True, capture_output=True, timeout=60)
    with open(os.path.join(EXAMPLES, "data", "word_pick.jsonl"), encoding="utf-8") as f:
        assert out.read_text(encoding="utf-8") == f.read()


def test_held_out_prompts_are_not_trained_on_and_answers_are_in_the_prompt(demo) -> None:
    train, test = demo.load_rows(demo.DATA)
    assert len(test) == 100 and len(train) > 1000
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}
    assert all(r["answer"] in r["prompt"] for r in train + test)


def test_train_batches_supervise_the_answer_and_its_end_token_only(demo) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_folder())
    train, _ = demo.load_rows(demo.DATA)
    args = argparse.Namespace(steps=2, batch_size=3, seq_len=48, seed=0)
    batches = demo.train_batches(tokenizer, train, args)
    assert len(batches) == 2
    b = batches[0]
    for ids, labels, mask in zip(b["input_ids"], b["labels"], b["attention_mask"]):
        supervised = ids[labels != demo.IGNORE]
        assert tokenizer.decode(supervised[:-1]).strip() in {r["answer"] for r in train}
        assert supervised[-1] == tokenizer.eos_token_id == 2  # <|im_end|>, the model's eos
        assert mask.sum() == np.nonzero(labels != demo.IGNORE)[0].max() + 1  # right padding after the answer


def test_a_tokenizer_without_chat_template_is_refused(demo) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_folder())
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        demo.chat(tokenizer, "Which word is first in: a, b?")
    with open(os.path.join(EXAMPLES, "data", "README.md"), encoding="utf-8") as f:
        assert "word_pick.jsonl" in f.read()
