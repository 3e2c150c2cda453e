"""Multiple-choice evaluation: HellaSwag and the user's own jsonl, scored as lm-evaluation-harness
scores them, so a figure here sits beside published tables.

Each choice is the continuation `" " + choice` of the item's context. Its score is the model's
summed log-probability of the continuation's tokens given the context. `acc`: the choice with the
highest sum is right; `acc_norm`: the highest sum per character of the choice (the harness's
length normalization, which stops short endings winning by being short).

Tokenization is the harness's too: trailing spaces of the context move to the continuation, the
whole text is encoded and the continuation is what follows the context's own tokens (so a word
split across the boundary scores as GPT-2 would read it), and a context longer than the model's
window is cut from the left. Plain PyTorch: `raygpt eval` and the training loop share it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raygpt import storage
from raygpt.config import EVAL_TASKS as TASKS
from raygpt.errors import UserError
from raygpt.tokenizer import EOT_ID, gpt2_encoding

TARGET_DELIMITER = " "  # between context and choice, as the harness's default target_delimiter


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    label: int


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's `hellaswag` preprocessing: WikiHow's bracketed headers removed
    (`[title]` becomes a sentence end) and each double space made single, once."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: dict[str, Any]) -> Item:
    """One row of HellaSwag's published jsonl (`activity_label`, `ctx_a`, `ctx_b`, `endings`,
    `label`) as the harness builds it: `activity_label: ctx_a Ctx_b`, endings preprocessed."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return Item(hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                tuple(hellaswag_preprocess(e) for e in doc["endings"]), int(doc["label"]))


def generic_item(doc: dict[str, Any]) -> Item:
    """One row of the generic format: `{"context": str, "choices": [str, ...], "label": int}`."""
    return Item(doc["context"], tuple(doc["choices"]), doc["label"])


# task -> (keys every row must have, row -> Item)
READERS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], Item]]] = {
    "hellaswag": (("activity_label", "ctx_a", "ctx_b", "endings", "label"), hellaswag_item),
    "multiple_choice": (("context", "choices", "label"), generic_item),
}


def check_task(task: str, where: str = "task") -> None:
    if task not in TASKS:
        raise UserError(f"{where} must be one of {', '.join(TASKS)}, got {task!r}")


def read_items(path: str, task: str, limit: int | None = None) -> list[Item]:
    """The items of a jsonl file (a path or storage URI), the first `limit` of them when given
    (the harness's --limit). A bad row is refused in one line naming the file and the line."""
    check_task(task)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1, got {limit}")
    try:
        raw = storage.read_bytes(storage.resolve_storage(path))
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"cannot read eval data {path}: {e}") from None
    keys, make = READERS[task]
    items: list[Item] = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if limit is not None and len(items) >= limit:
            break
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(doc, dict) or any(k not in doc for k in keys):
            raise UserError(f"{where}: a {task} row needs the keys {', '.join(keys)}")
        try:
            item = make(doc)
        except (TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{where}: {task} row with a wrong type ({e})") from None
        _check_item(item, where)
        items.append(item)
    if not items:
        raise UserError(f"{path}: no {task} rows")
    return items


def _check_item(item: Item, where: str) -> None:
    if not isinstance(item.context, str) or not all(isinstance(c, str) for c in item.choices):
        raise UserError(f"{where}: the context and every choice must be strings")
    if len(item.choices) < 2:
        raise UserError(f"{where}: needs at least 2 choices, got {len(item.choices)}")
    if any(not c for c in item.choices):
        raise UserError(f"{where}: a choice is empty")
    if isinstance(item.label, bool) or not isinstance(item.label, int) or not 0 <= item.label < len(item.choices):
        raise UserError(f"{where}: label must be an index into the {len(item.choices)} choices, got {item.label!r}")


def encode_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness's causal-model `_encode_pair`; an empty
    context conditions on <|endoftext|>, as the harness's prefix token."""
    enc = gpt2_encoding()
    if not context:
        cont = enc.encode_ordinary(continuation)
        return ([EOT_ID], cont) if cont[:1] != [EOT_ID] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = enc.encode_ordinary(context + continuation)
    context_ids = enc.encode_ordinary(context)
    return context_ids, whole[len(context_ids):]


def item_requests(item: Item, context_len: int, where: str = "item") -> list[tuple[list[int], list[int]]]:
    """One (context ids, continuation ids) request per choice."""
    out = [encode_pair(item.context, TARGET_DELIMITER + choice) for choice in item.choices]
    for i, (_, cont) in enumerate(out):
        if not cont or len(cont) > context_len:
            raise UserError(f"{where}: choice {i} is {len(cont)} tokens; a choice must be 1 to model.context_len "
                            f"({context_len}) tokens")
    return out


def requests_of(items: Sequence[Item], context_len: int, where: str = "item",
                numbers: Sequence[int] | None = None) -> list[tuple[list[int], list[int]]]:
    """Every choice's request of `items`, in item order; a refused choice names `where item N`
    (N from `numbers`: the items' places in their file, default 0, 1, ...)."""
    numbers = range(len(items)) if numbers is None else numbers
    return [r for n, item in zip(numbers, items) for r in item_requests(item, context_len, f"{where} {n}")]


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]], context_len: int,
                   device: torch.device, batch_size: int = 16,
                   autocast: Callable[[], Any] | None = None, forwards: int = 0) -> list[float]:
    """The summed log-probability of each request's continuation given its context, in float64.
    Inputs are the last context_len tokens of context+continuation minus the final one, right
    padded in batches of similar length (longest first, as the harness orders them). `forwards`:
    run at least this many forward passes, the extra ones on a throwaway input (a sharded model's
    forward is a collective: every rank must run as many)."""
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    for start in range(0, max(len(order), forwards * batch_size), batch_size):
        chunk = order[start:start + batch_size]
        if not chunk:
            with autocast() if autocast else contextlib.nullcontext():
                model(torch.full((1, 1), EOT_ID, dtype=torch.long, device=device))
            continue
        inputs = [(requests[i][0] + requests[i][1])[-(context_len + 1):][:-1] for i in chunk]
        width = max(len(x) for x in inputs)
        x = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(inputs):
            x[row, :len(ids)] = torch.tensor(ids)
        with autocast() if autocast else contextlib.nullcontext():
            logits = model(x.to(device))
        for row, i in enumerate(chunk):
            cont = requests[i][1]
            end = len(inputs[row])
            picked = logits[row, end - len(cont):end].float().log_softmax(dim=-1)
            target = torch.tensor(cont, device=picked.device)
            out[i] = picked.gather(1, target[:, None]).double().sum().item()
    model.train(was_training)
    return out


def item_scores(items: Sequence[Item], lls: Sequence[float]) -> tuple[float, float]:
    """(items right by acc, items right by acc_norm), given every item's choices' log-likelihoods
    in item order. Ties go to the first choice, as numpy's argmax in the harness."""
    acc = acc_norm = 0.0
    pos = 0
    for item in items:
        scores = lls[pos:pos + len(item.choices)]
        pos += len(item.choices)
        normed = [s / len(c) for s, c in zip(scores, item.choices)]
        acc += float(max(range(len(scores)), key=lambda i: (scores[i], -i)) == item.label)
        acc_norm += float(max(range(len(normed)), key=lambda i: (normed[i], -i)) == item.label)
    return acc, acc_norm


def score_items(model: torch.nn.Module, items: Sequence[Item], context_len: int, device: torch.device,
                batch_size: int = 16, autocast: Callable[[], Any] | None = None) -> dict[str, float]:
    """acc and acc_norm over `items` (and their count), on one process."""
    requests = requests_of(items, context_len)
    lls = loglikelihoods(model, requests, context_len, device, batch_size, autocast)
    acc, acc_norm = item_scores(items, lls)
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "items": len(items)}


def evaluate_checkpoint(checkpoint: str, task: str, data: str, limit: int | None = None, batch_size: int = 16,
                        out: str | None = None) -> dict[str, Any]:
    """`raygpt eval`: a checkpoint (folder, run folder or URI) scored on a jsonl file; the scores
    are written as JSON to `out` (a path or URI) when given."""
    import time

    from raygpt.generate import load_model

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    items = read_items(data, task, limit)
    model, state = load_model(checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    scores = score_items(model.to(device), items, model.cfg.context_len, device, batch_size)
    result = {"task": task, "data": data, "checkpoint": checkpoint, "step": state.get("step"), **scores,
              "seconds": time.perf_counter() - t0}
    if out:
        storage.write_text(storage.resolve_storage(out), json.dumps(result, indent=1) + "\n")
    return result


def check_eval_data(evals: list[dict[str, Any]], context_len: int, total_steps: int | None = None,
                    tokens_per_step: int | None = None) -> list[str]:
    """train.evals' files read and every choice tokenized before a launch (a bad row or an
    over-long choice is refused here, in one line, not in a worker); one line of cost per eval:
    items, choices, the tokens one scoring reads and, given the run's steps, what all its scorings
    cost beside training (a forward pass is a third of a training step's compute per token)."""
    lines = []
    for spec in evals:
        items = read_items(spec["data"], spec["task"], spec["limit"])
        requests = requests_of(items, context_len, f"{spec['data']} item")
        tokens = sum(min(len(ctx) + len(cont) - 1, context_len) for ctx, cont in requests)
        line = (f"eval {spec['name']} ({spec['task']}, every {spec['every']} steps): {len(items):,} items, "
                f"{len(requests):,} choices, {tokens:,} tokens forward per scoring")
        if total_steps and tokens_per_step:
            scorings = 1 + total_steps // spec["every"] + (total_steps % spec["every"] != 0)
            line += (f"; {scorings:,} scorings: {scorings * tokens / (3 * total_steps * tokens_per_step):.2%} of the "
                     f"training's compute")
        lines.append(line)
    return lines
