"""Multiple-choice evaluation: HellaSwag's preprocessing and the harness's tokenization, scoring,
bad files, `raygpt eval`, and (slow) exact agreement with lm-evaluation-harness on an export."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import own_text_items

from raygpt.errors import UserError
from raygpt.model import GPTModel
from raygpt.multiple_choice import (
    Item,
    encode_pair,
    hellaswag_item,
    hellaswag_preprocess,
    item_requests,
    item_scores,
    loglikelihoods,
    read_items,
    score_items,
)
from raygpt.tokenizer import EOT_ID, gpt2_encoding

# Rows in HellaSwag's published schema: WikiHow rows carry bracketed headers ([header], [title],
# [step], [substeps]) and double spaces that the harness's preprocessing removes; ActivityNet rows
# do not. ctx_b starts lower case ("capitalize" is part of the preprocessing).
HELLASWAG_ROWS = [
    {"ind": 4, "activity_label": "Removing ice from car",
     "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes "
              "smiles.", "ctx_b": "then", "ctx": "Then, the man ... smiles. then",
     "endings": [", the man adds wax to the windshield and cuts it.",
                 ", a person board a ski lift, while two men supporting the head of the person wearing winter "
                 "clothes snow as the we girls sled.",
                 ", the man puts on a christmas coat, knitted with netting.",
                 ", the man continues removing the snow on his car."],
     "source_id": "activitynet~v_-1IBHYS3L-Y", "split": "val", "split_type": "zeroshot", "label": 3},
    {"ind": 103, "activity_label": "Personal Care and Style",
     "ctx_a": "[header] How to  dye your hair with tea [title] Brew a strong pot of tea.",
     "ctx_b": "[step] Use  black tea for dark hair and chamomile for LIGHT hair.",
     "ctx": "...", "endings": ["[substeps] Let the tea  cool before you use it.",
                               "[title] Pour the tea into a spray bottle.  [step] Spray it on.",
                               "Drink the whole pot at once.", "[step] Wash the pot [title] twice."],
     "source_id": "wikihow~172", "split": "val", "split_type": "indomain", "label": "0"},
]


def test_hellaswag_preprocessing_is_the_harnesss():
    # Pinned: a change to these strings is a drift from lm-evaluation-harness's `hellaswag` task.
    assert hellaswag_preprocess(" [header] How to  dye hair [title] Brew tea.  [step] Use  it. ") == \
        " How to dye hair. Brew tea.  Use it."  # the header leaves its space: the harness keeps it
    item = hellaswag_item(HELLASWAG_ROWS[1])
    assert item.context == ("Personal Care and Style: How to dye your hair with tea. Brew a strong pot of tea. "
                            "use black tea for dark hair and chamomile for light hair.")
    # A leading header leaves its space (scored as the continuation "  Let ..."), a "  [step]" three
    # spaces that one pass makes two: the harness's quirks, kept so the figures compare.
    assert item.choices == (" Let the tea cool before you use it.", " Pour the tea into a spray bottle.  Spray it on.",
                            "Drink the whole pot at once.", " Wash the pot. twice.")
    assert item.label == 0 and hellaswag_item(HELLASWAG_ROWS[0]).context.startswith(
        "Removing ice from car: Then, the man writes")


def test_hellaswag_items_equal_the_harnesss_own_processing():
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    import datasets

    docs = utils.process_docs(datasets.Dataset.from_list(
        [{**row, "label": str(row["label"])} for row in HELLASWAG_ROWS]))
    for doc, row in zip(docs, HELLASWAG_ROWS):
        item = hellaswag_item(row)
        assert (item.context, list(item.choices), item.label) == (doc["query"], doc["choices"], doc["gold"])


def test_a_trailing_space_moves_to_the_continuation_and_the_split_follows_the_whole_text():
    enc = gpt2_encoding()
    ctx, cont = encode_pair("The cat sat on the ", "mat")
    assert ctx == enc.encode_ordinary("The cat sat on the")
    assert ctx + cont == enc.encode_ordinary("The cat sat on the mat")
    assert cont == enc.encode_ordinary(" mat")
    ctx, cont = encode_pair("", " hello")  # no context: conditioned on <|endoftext|>, as the harness
    assert ctx == [EOT_ID] and cont == enc.encode_ordinary(" hello")


def test_scores_pick_the_highest_sum_and_the_highest_per_character_first_on_ties():
    items = [Item("c", ("a", "bbbb"), 1), Item("c", ("xx", "y", "zz"), 0)]
    # item 0: sums -2 vs -4 -> acc picks 0 (wrong); per character -2 vs -1 -> acc_norm picks 1 (right)
    # item 1: ties (-2, -2, -2) go to the first choice for acc; per character -1, -2, -1 -> choice 0
    assert item_scores(items, [-2.0, -4.0, -2.0, -2.0, -2.0]) == (1.0, 2.0)


def _tiny_model(seed: int = 0, context_len: int = 32) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(vocabulary_size=50257, context_len=context_len, embedding_dim=32, num_heads=2, num_layers=2,
                    dropout=0.0).eval()


def test_loglikelihoods_are_exact_per_request_and_the_same_in_any_batching():
    model = _tiny_model()
    reqs = [encode_pair("def add(a, b):", " return a + b"), encode_pair("x", " = 1"),
            encode_pair("A much longer context that runs past the model's window of thirty-two tokens for sure, "
                        "many words later", " still scored")]
    one = loglikelihoods(model, reqs, 32, torch.device("cpu"), batch_size=1)
    assert loglikelihoods(model, reqs, 32, torch.device("cpu"), batch_size=3) == pytest.approx(one, abs=1e-5)
    for (ctx, cont), got in zip(reqs, one):  # by hand: the last 33 tokens, minus the last one, scored
        ids = (ctx + cont)[-33:]
        logp = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
        want = sum(logp[len(ids) - 1 - len(cont) + j, t].item() for j, t in enumerate(cont))
        assert got == pytest.approx(want, abs=1e-4)


def test_a_choice_longer_than_the_window_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"item 3: choice 1 is \d+ tokens; a choice must be 1 to model.context_len"):
        item_requests(Item("ctx", ("ok", "word " * 40), 0), 32, "item 3")


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not JSON"),
    ('{"context": "a", "choices": ["x", "y"]}', "line 2: a multiple_choice row needs the keys context, choices, label"),
    ('{"context": "a", "choices": ["x", "y"], "label": 2}', "line 2: label must be an index into the 2 choices"),
    ('{"context": "a", "choices": ["x", "y"], "label": true}', "line 2: label must be an index"),
    ('{"context": "a", "choices": ["x"], "label": 0}', "line 2: needs at least 2 choices"),
    ('{"context": "a", "choices": ["x", 3], "label": 0}', "line 2: the context and every choice must be strings"),
    ('{"context": "a", "choices": ["x", ""], "label": 0}', "line 2: a choice is empty"),
])
def test_a_bad_row_is_refused_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "evals.jsonl"
    path.write_text('{"context": "a", "choices": ["x", "y"], "label": 1}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        read_items(str(path), "multiple_choice")


def test_limit_takes_the_first_items_and_bad_arguments_are_refused(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG_ROWS))
    assert [i.label for i in read_items(str(path), "hellaswag", limit=1)] == [3]
    assert len(read_items(str(path), "hellaswag")) == 2
    with pytest.raises(UserError, match="task must be one of hellaswag, multiple_choice"):
        read_items(str(path), "mmlu")
    with pytest.raises(UserError, match="no multiple_choice rows"):
        (tmp_path / "empty.jsonl").write_text("\n")
        read_items(str(tmp_path / "empty.jsonl"), "multiple_choice")
    with pytest.raises(UserError, match="cannot read eval data"):
        read_items(str(tmp_path / "missing.jsonl"), "hellaswag")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny model (context 32) trained 60 steps on the code corpus, and its HF export."""
    from helpers import make_corpus, tiny_config

    from raygpt.hf import export_checkpoint
    from raygpt.training.local import run_without_ray

    tmp = tmp_path_factory.mktemp("mc")
    data = make_corpus(tmp)
    run_without_ray(tiny_config(data, tmp, "train.max_steps=60", "model.context_len=32", "train.eval_freq=30",
                                "train.save_freq=60"), str(data), str(tmp / "run"))
    export_checkpoint(str(tmp / "run"), str(tmp / "hf"))
    return tmp


@pytest.mark.slow
def test_a_trained_tiny_model_scores_above_chance_on_its_own_training_text(trained_run, run_cli):
    from helpers import write_choice_files

    path, _ = write_choice_files(trained_run)
    items = read_items(str(path), "multiple_choice")
    code, out, err = run_cli("eval", "--checkpoint", str(trained_run / "run"), "--task", "multiple_choice",
                             "--data", str(path), "--out", str(trained_run / "own.json"))
    assert code == 0, err
    scores = json.loads((trained_run / "own.json").read_text())
    assert scores["items"] == len(items) == 20 and f"acc_norm {scores['acc_norm']:.4f}" in out
    untrained = score_items(_tiny_model(), items, 32, torch.device("cpu"))
    # chance is 0.25: 10 of 20 right by luck has p ~ 0.014
    assert scores["acc"] >= 0.45 and scores["acc_norm"] >= 0.5, scores
    assert scores["acc_norm"] > untrained["acc_norm"] + 0.2, (scores, untrained)


LM_EVAL = """
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
hf, include, tasks = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {}
for task, extra in tasks.items():
    res = simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32{extra}", tasks=[task], batch_size=4,
                          device="cpu", task_manager=TaskManager(include_path=include), log_samples=True)
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    out[task] = {"acc": res["results"][task]["acc,none"], "acc_norm": res["results"][task]["acc_norm,none"],
                 "lls": [[r[0] for r in s["filtered_resps"]] for s in samples]}
print(json.dumps(out))
"""

TASK_CONFIG = """
    task: {name}
    dataset_path: json
    dataset_kwargs:
      data_files:
        validation: {data}
      cache_dir: {cache}
    output_type: multiple_choice
    validation_split: validation
    metric_list:
      - metric: acc
      - metric: acc_norm
"""
HELLASWAG_FIELDS = """
    process_docs: !function utils.process_docs
    doc_to_text: "{{query}}"
    doc_to_target: "{{label}}"
    doc_to_choice: "choices"
"""
GENERIC_FIELDS = """
    doc_to_text: "{{context}}"
    doc_to_target: label
    doc_to_choice: choices
"""


def lm_eval_scores(hf_dir: Path, data: dict[str, Path], tmp: Path, model_args: dict[str, str]) -> dict:
    """lm-evaluation-harness's HF backend on an exported folder, over a local task config per jsonl
    (offline: the `json` dataset builder; HellaSwag with the harness's own utils.py), every task in
    one process (the harness's imports take most of its time)."""
    import lm_eval

    include = tmp / "lm-eval-tasks"
    include.mkdir()
    (include / "utils.py").write_text((Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py").read_text())
    for task, path in data.items():
        fields = HELLASWAG_FIELDS if task == "hellaswag" else GENERIC_FIELDS
        config = TASK_CONFIG.format(name=f"raygpt_{task}", data=path, cache=tmp / "hf-datasets") + fields
        (include / f"raygpt_{task}.yaml").write_text(textwrap.dedent(config))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home"),
           "TOKENIZERS_PARALLELISM": "false"}
    tasks = json.dumps({f"raygpt_{task}": model_args.get(task, "") for task in data})
    proc = subprocess.run([sys.executable, "-c", LM_EVAL, str(hf_dir), str(include), tasks],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {task.removeprefix("raygpt_"): r for task, r in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def parity_items() -> dict[str, list[dict]]:
    """HellaSwag's schema rows (truncated on the left into the 32-token window), and the second
    kind of text: prose the model never saw."""
    from helpers import prose_documents

    return {"hellaswag": HELLASWAG_ROWS + [{**r, "label": (int(r["label"]) + 1) % 4} for r in HELLASWAG_ROWS],
            "multiple_choice": [{"context": i.context[-300:], "choices": list(i.choices), "label": i.label}
                                for i in own_text_items("".join(d[:400] for d in prose_documents()[:6]),
                                                        seed=3)[:24]]}


@pytest.fixture(scope="module")
def lm_eval_parity(trained_run):
    """The parity items' files, and lm-eval's scores of the exported model on them. HellaSwag with
    the harness's defaults. The generic items turn off its logits cache: in lm-eval 0.4.13 a
    one-token continuation grouped with a longer one over the same input tokens (here
    'The "assert"' + ' statement' beside 'The' + ' "assert" statement') is read at the group's first
    continuation position instead of its own; uncached, the harness agrees with a plain forward
    pass, as raygpt does."""
    pytest.importorskip("lm_eval")
    data = {}
    for task, rows in parity_items().items():
        data[task] = trained_run / f"parity-{task}.jsonl"
        data[task].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, lm_eval_scores(trained_run / "hf", data, trained_run, {"multiple_choice": ",logits_cache=False"})


@pytest.mark.slow
@pytest.mark.parametrize("task", ["hellaswag", "multiple_choice"])
def test_raygpt_eval_and_lm_eval_agree_exactly_on_an_exported_model(trained_run, lm_eval_parity, task):
    from raygpt.generate import load_model

    data, results = lm_eval_parity
    theirs = results[task]
    model, _ = load_model(str(trained_run / "run"))
    items = read_items(str(data[task]), task)
    requests = [r for item in items for r in item_requests(item, 32)]
    ours = loglikelihoods(model, requests, 32, torch.device("cpu"), batch_size=5)
    assert [ll for lls in theirs["lls"] for ll in lls] == pytest.approx(ours, abs=1e-3)
    scores = score_items(model, items, 32, torch.device("cpu"))
    assert (scores["acc"], scores["acc_norm"]) == (theirs["acc"], theirs["acc_norm"])
