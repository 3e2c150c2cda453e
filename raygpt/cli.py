"""The `raygpt` command. Each subcommand parses its options and calls one library function;
bad input (`UserError`) becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

from raygpt.errors import Interrupted, TrainingFailed, UserError


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize text into GPT-2 token shards")
    p.add_argument("inputs", nargs="*", help=".txt / .jsonl / .parquet files, folders or globs")
    p.add_argument("--source", choices=["stdlib"], help="a built-in corpus: this Python's standard library sources")
    p.add_argument("--config", help="a raygpt YAML config: its data.dir and model.context_len become defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", help="output folder or storage URI, e.g. s3://bucket/data "
                   "(default: the config's data.dir, else data/stdlib)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents for val (default 0.1)")
    p.add_argument("--context-len", type=int, help="check the corpus holds one window (default: config or 1024)")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard file (default 32Mi)")
    p.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: all cores)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even when the output is up to date; into a folder holding files raygpt did not "
                        "write, replace only raygpt's own files and keep the others")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> None:
    from raygpt.config import load_config
    from raygpt.data.prepare import DEFAULT_SHARD_TOKENS
    from raygpt.data.remote import prepare_to

    out, context_len = args.out, args.context_len
    if args.config or args.overrides:
        cfg = load_config(args.config, args.overrides)
        out = out or cfg.data.dir
        context_len = cfg.model.context_len if context_len is None else context_len
    if not args.inputs and not args.source:
        if args.config:
            args.source = "stdlib"  # the config's corpus is the default one unless inputs are given
        else:
            raise UserError("nothing to prepare: give input paths/globs or --source stdlib")
    if args.inputs and not out:
        raise UserError("--out is required with input paths (e.g. --out data/mycorpus)")
    prepare_to(
        out or "data/stdlib", inputs=args.inputs, source=args.source, val_fraction=args.val_fraction,
        context_len=1024 if context_len is None else context_len,
        shard_tokens=DEFAULT_SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens,
        threads=args.threads, force=args.force,
    )


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures (default: training, five ways)",
                       description="Without a subcommand: the same model and global batch trained as (0) a bare "
                                   "PyTorch loop, the ceiling, (a) the plain loop, (b) raygpt with 1 worker, "
                                   "(c) raygpt with 2 workers, (d) torchrun "
                                   "with 2 processes, interleaved; a table and one JSON object.")
    p.add_argument("--preset", default="tiny", help="tiny | small | gpt2-small (default tiny)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model in every row")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--data", default="data/stdlib", help="prepared data (default data/stdlib, prepared if missing)")
    p.add_argument("--address", help="Ray cluster for rows b and c (default: each starts a local Ray)")
    p.add_argument("--rows", default="0abcd", help="which rows to run (default 0abcd; 0 is the bare PyTorch loop; "
                   "e and f are c and d under run.strategy=fsdp)")
    p.set_defaults(func=_run_bench_train)
    what = p.add_subparsers(dest="what")
    bp = what.add_parser("prepare", help="prepare's tokens/s vs a single-threaded encode loop")
    bp.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each side (default 2)")
    bp.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: all cores)")
    bp.set_defaults(func=_run_bench_prepare)
    bc = what.add_parser("checkpoint", help="how long the loop is blocked per save: sync vs run.async_save")
    bc.add_argument("--preset", default="gpt2-small", help="the model whose checkpoint is saved (default gpt2-small)")
    bc.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    bc.add_argument("--s3", default="moto", help="an S3 URI to save to as well, 'moto' (an S3 API on loopback, "
                    "the default) or 'none'")
    bc.set_defaults(func=_run_bench_checkpoint)
    bm = what.add_parser("mup-coord", help="µP's coordinate check: mean |activation| per layer vs width, both "
                         "parametrizations")
    bm.add_argument("--widths", default="64,128,256,512,1024", help="comma-separated (default 64,...,1024)")
    bm.add_argument("--steps", type=int, default=4, help="AdamW steps (default 4)")
    bm.add_argument("--lr", type=float, default=0.01, help="the learning rate every width trains at (default 0.01)")
    bm.add_argument("--out", default="mup_coord", help="folder for mup_coord.png (default mup_coord)")
    bm.set_defaults(func=_run_bench_mup_coord)
    bx = what.add_parser("mup-transfer", help="µP's learning-rate transfer: best lr per width from width x lr "
                         "searches (jobs/mup-transfer.yaml); searches of one parametrization are pooled")
    bx.add_argument("experiments", nargs="+", help="experiment folders of `raygpt tune` (a path or URI); a grid "
                    "point run more than once (train.seed searched, or in several searches) counts as its mean")
    bx.add_argument("--base-width", type=int, default=128, help="the width the lr is chosen at (default 128)")
    bx.add_argument("--out", default="mup_transfer", help="folder for mup_transfer.png (default mup_transfer)")
    bx.set_defaults(func=_run_bench_mup_transfer)
    bt = what.add_parser("tune", help="the same 16-configuration grid with and without ASHA")
    bt.add_argument("--address", help="Ray cluster to join (default: start a local Ray)")
    bt.add_argument("--data", default="data/stdlib", help="prepared data (default data/stdlib, prepared if missing)")
    bt.add_argument("--arms", default="full_grid,asha,asha_trainer",
                    help="which searches to run, comma-separated (default full_grid,asha,asha_trainer)")
    bt.set_defaults(func=_run_bench_tune)


def _run_bench_train(args: argparse.Namespace) -> None:
    from raygpt.bench.train import bench_train

    if not args.rows or set(args.rows) - set("0abcdef"):
        raise UserError(f"--rows takes characters of 0abcdef, got {args.rows!r}")
    bench_train(args.preset, args.device, args.precision, args.compile, args.steps, args.repeats, args.data,
                args.address, args.rows)


def _run_bench_checkpoint(args: argparse.Namespace) -> None:
    from raygpt.bench.checkpoint import bench_checkpoint

    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    bench_checkpoint(args.preset, args.repeats, args.s3)


def _run_bench_mup_coord(args: argparse.Namespace) -> None:
    from raygpt.bench.mup_coord import bench_mup_coord

    try:
        widths = [int(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
        raise UserError(f"--widths takes comma-separated whole numbers, got {args.widths!r}") from None
    bench_mup_coord(widths, args.steps, args.lr, out=args.out)


def _run_bench_mup_transfer(args: argparse.Namespace) -> None:
    from raygpt.bench.mup_transfer import bench_mup_transfer

    bench_mup_transfer(args.experiments, args.base_width, args.out)


def _run_bench_prepare(args: argparse.Namespace) -> None:
    from raygpt.bench.prepare import bench_prepare

    bench_prepare(repeats=args.repeats, threads=args.threads)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pre-train on Ray Train (an embedded local Ray, or a cluster)")
    p.add_argument("--config", help="YAML config (default: the built-in defaults, GPT-2 small on data.dir data/stdlib, "
                   "which must be prepared; the tiny demo job is jobs/pretrain.yaml; "
                   "with --resume: the run's own config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--address", help="Ray cluster to join: 'auto' or HOST:PORT (default: start a local Ray)")
    p.add_argument("--resume", metavar="RUN", help="continue a run (its name under run.storage_path, or its folder)")
    p.add_argument("--no-ray", action="store_true",
                   help="the same loop without Ray: one process, or DDP when started by torchrun")
    p.add_argument("--check", action="store_true",
                   help="check the config, data (shard hashes too) and run folder as a launch would, "
                        "print the plan, start nothing")
    p.add_argument("--set-from", metavar="CONFIG",
                   help="take whole sections from another config, e.g. a search's best_config.yaml (--keys)")
    p.add_argument("--keys", default="optim", help="the sections --set-from takes, comma-separated (default optim)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from raygpt.config import load_config
    from raygpt.data.remote import prepare_to
    from raygpt.data.shards import has_manifest, load_manifest
    from raygpt.runs import resume_paths
    from raygpt.training.ray_train import run_config, train

    if args.resume and args.set_from:
        raise UserError("--set-from starts a run from another config's sections; --resume keeps the run's own config")
    if args.resume and not args.config:
        where = load_config(None, [o for o in args.overrides if o.startswith("run.storage_path=")])
        cfg = run_config(resume_paths(args.resume, where.run.storage_path), args.overrides)
    else:
        cfg = load_config(args.config, args.overrides, args.set_from, tuple(k for k in args.keys.split(",") if k))
    from raygpt.training.memory import check_memory_plan

    check_memory_plan(cfg)  # from the config alone: before the data is looked at
    if cfg.data.source and not has_manifest(cfg.data.dir):
        if args.check:
            print(f"config ok; data.dir {cfg.data.dir} is not prepared yet (a launch prepares it from "
                  f"{cfg.data.source} first, then checks it)")
            return
        prepare_to(cfg.data.dir, source=cfg.data.source, context_len=cfg.model.context_len)
    load_manifest(cfg.data.dir)
    if args.check:
        from raygpt.training.ray_train import preflight

        paths, plan = preflight(cfg, args.resume, hash_shards=True)
        print(f"ok: run {paths.name} ({'resume' if args.resume else 'new'}) -> {paths.uri}: {plan.total_steps} steps "
              f"of {cfg.train.batch_size} x {cfg.model.context_len} tokens "
              f"({plan.total_steps * cfg.train.batch_size * cfg.model.context_len:,} tokens) on {cfg.run.num_workers} "
              f"worker(s); "
              f"nothing started")
    elif args.no_ray:
        from raygpt.training.local import train_without_ray

        train_without_ray(cfg, args.resume)
    else:
        train(cfg, address=args.address, resume=args.resume)


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="hyperparameter search: parallel Ray Tune trials with ASHA")
    p.add_argument("--config", help="search YAML: a training config plus `search` and `tune` sections")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a base config key, or a tune setting as tune.KEY=VALUE")
    p.add_argument("--address", help="Ray cluster to join: 'auto' or HOST:PORT (default: start a local Ray)")
    p.add_argument("--resume", metavar="EXPERIMENT_DIR", help="continue an interrupted search")
    p.add_argument("--check", action="store_true",
                   help="check the search and every trial's config, print the launch order, start nothing")
    p.set_defaults(func=_run_tune)


def _run_tune(args: argparse.Namespace) -> None:
    from raygpt.data.remote import prepare_to
    from raygpt.data.shards import has_manifest
    from raygpt.search.analysis import report_search
    from raygpt.search.spec import load_search
    from raygpt.search.tune import interruption, resume_search, run_search

    if args.resume:
        experiment = resume_search(args.resume, address=args.address)
    else:
        if not args.config:
            raise UserError("raygpt tune needs --config SEARCH.yaml (see jobs/tune.yaml) or --resume EXPERIMENT_DIR")
        search = load_search(args.config, args.overrides)
        data = search.base.get("data", {})
        if data.get("source") and not has_manifest(data.get("dir", "")):
            prepare_to(data["dir"], source=data["source"])
        if args.check:
            run_search(search, check_only=True)
            return
        experiment = run_search(search, address=args.address)
    analysis = report_search(experiment)
    interrupted = interruption(experiment, analysis.rows)
    if interrupted:
        raise Interrupted(interrupted)
    if analysis.failed:
        raise TrainingFailed(f"search failed: {len(analysis.errors)} of {len(analysis.rows)} trials ended in ERROR "
                             f"(causes above; experiment: {experiment})")


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="table, best config, curves of a finished or running search")
    p.add_argument("experiment", help="the experiment folder (or storage URI)")
    p.add_argument("--out", help="a local folder for a copy of the table, best config and plot (they are always "
                                 "written into the experiment folder, local or on storage)")
    p.set_defaults(func=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> None:
    from raygpt.search.analysis import report_search

    report_search(args.experiment, args.out)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, a run folder, or a storage URI")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    from raygpt.generate import generate_text

    print(generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="multiple-choice accuracy of a checkpoint (HellaSwag or your own jsonl), "
                                    "scored as lm-evaluation-harness scores it")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint folder, a run folder (its newest), or a storage URI")
    p.add_argument("--task", required=True, help="hellaswag (its published jsonl) or multiple_choice "
                                                 '(jsonl rows {"context", "choices", "label"})')
    p.add_argument("--data", required=True, help="the jsonl file (a path or storage URI)")
    p.add_argument("--limit", type=int, default=None, help="score the first N items only")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--out", default=None, help="where to write the scores as JSON (default: eval_<task>.json)")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from raygpt.multiple_choice import check_task, evaluate_checkpoint

    check_task(args.task, "--task")
    out = args.out or f"eval_{args.task}.json"
    r = evaluate_checkpoint(args.checkpoint, args.task, args.data, args.limit, args.batch_size, out)
    print(f"{r['task']}: acc {r['acc']:.4f} | acc_norm {r['acc_norm']:.4f} | {r['items']:,} items | "
          f"step {r['step']} | {r['seconds']:.1f} s -> {out}")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face GPT-2 folder (transformers loads it)")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint folder, a run folder (its newest), or a storage URI")
    p.add_argument("--out", required=True, help="the folder to write (config.json, model.safetensors, tokenizer files)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from raygpt.hf import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out} (transformers: GPT2LMHeadModel.from_pretrained({str(out)!r}))")


def _add_runs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list the runs and searches in a storage folder: status, steps, best val loss")
    p.add_argument("storage", nargs="?", default="runs",
                   help="a storage folder or URI, e.g. s3://bucket/raygpt/runs (default: runs, as run.storage_path)")
    p.add_argument("--json", action="store_true", help="print one JSON array (for scripts) instead of the table")
    p.set_defaults(func=_run_runs)


def _run_runs(args: argparse.Namespace) -> None:
    import json
    import math

    from raygpt import storage
    from raygpt.listing import format_runs_table, list_runs

    entries = list_runs(args.storage)
    if args.json:  # strict JSON for scripts: a non-finite number (never written by raygpt) is null
        finite = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in e.items()}
                  for e in entries]
        print(json.dumps(finite, indent=1, allow_nan=False))
    elif entries:
        print(format_runs_table(entries))
    else:
        print(f"no runs in {storage.resolve_storage(args.storage)}")


def _run_bench_tune(args: argparse.Namespace) -> None:
    from raygpt.bench.tune import TUNE_ARMS, bench_tune

    arms = args.arms.split(",")
    if set(arms) - set(TUNE_ARMS):
        raise UserError(f"--arms takes {', '.join(TUNE_ARMS)}, got {args.arms!r}")
    bench_tune(args.address, args.data, arms)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raygpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_train(sub)
    _add_tune(sub)
    _add_analyze(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_runs(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"raygpt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (TrainingFailed, Interrupted) as exc:
        print(f"raygpt: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("raygpt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
