"""The ``detrkd`` command line (also ``python -m detrkd``).

    detrkd data digits --out DIR [--train-images N --val-images N --image-size S --seed K --overwrite]
    detrkd train [--config CFG.yaml] [--set key=value ...] [--output-dir DIR] [--resume]
                 [--family F --preset P --data ROOT --epochs N --device D --seed K]
    detrkd distill ...  (as train, plus --teacher PATH)
    torchrun --nproc-per-node N -m detrkd train|distill ...   (data-parallel; README "Running at scale")
    detrkd eval --checkpoint PATH [--data ROOT] [--split val] [--image-size S] [--batch-size B]
                [--max-images N] [--device D] [--out metrics.json]
    detrkd predict --checkpoint PATH --image IMG --out OUT.png [--threshold 0.3] [--image-size S]
    detrkd analyze gqs --checkpoint PATH [--data ROOT] [--split val] [--max-images N] [--threshold 0.0]
                [--out stats.json]   |   ... --image-id ID | --image IMG  --figure OUT.png [--gt-index K]

User errors (missing files, bad configs, bad checkpoints) print one ``detrkd: error: ...`` line and
exit with status 2; ``--debug`` shows the traceback instead. A training run stopped by SIGTERM or
Ctrl-C (SIGINT) writes ``last.pt``, prints the ``--resume`` command and exits with status 143 / 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from detrkd import __version__
from detrkd.config import ConfigError
from detrkd.errors import CheckpointError, TrainingError, TrainingInterrupted

USER_ERRORS = (ConfigError, CheckpointError, TrainingError, OSError, ValueError)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM: stopped cleanly on request, last.pt written


# ---- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``detrkd`` argument parser with all subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logging")
    parser = argparse.ArgumentParser(prog="detrkd", parents=[common],
                                     description="Knowledge distillation for DETR-family detectors.")
    parser.add_argument("--version", action="version", version=f"detrkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data(sub, common)
    _add_train(sub, common)
    _add_eval(sub, common)
    _add_predict(sub, common)
    _add_export(sub, common)
    _add_distill(sub, common)
    _add_methods(sub, common)
    _add_analyze(sub, common)
    _add_bench(sub, common)
    return parser


def _add_data(sub: Any, common: argparse.ArgumentParser) -> None:
    data = sub.add_parser("data", parents=[common], help="generate datasets")
    kinds = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    digits = kinds.add_parser("digits", parents=[common],
                              help="write the bundled digits detection dataset (COCO format)")
    digits.add_argument("--out", required=True, type=Path, help="output directory")
    digits.add_argument("--train-images", type=int, default=2000, help="training images (default 2000)")
    digits.add_argument("--val-images", type=int, default=500, help="validation images (default 500)")
    digits.add_argument("--image-size", type=int, default=256, help="square image side in px (default 256)")
    digits.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    digits.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    digits.set_defaults(func=cmd_data_digits)


def _add_train(sub: Any, common: argparse.ArgumentParser) -> None:
    train = sub.add_parser("train", parents=[common], help="train a detector",
                           description="Train a detector. Config precedence: --config file < "
                                       "shortcut flags (--family ...) < --set.")
    _add_run_arguments(train)
    train.set_defaults(func=cmd_train)


def _add_distill(sub: Any, common: argparse.ArgumentParser) -> None:
    from detrkd.distill.catalog import help_text

    distill = sub.add_parser("distill", parents=[common], help="distil a student from a teacher",
                             formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_text(),
                             description="Train a student (--student, or model.* of --config) from a teacher "
                                         "(--teacher or config key teacher) with the chosen methods (--method, "
                                         "or config key methods). Config precedence: --config < shortcuts < "
                                         "--set. E.g. detrkd distill --teacher runs/t/last.pt --student "
                                         "rt_detr:tiny --method qskd --data data/digits --output-dir runs/s")
    _add_run_arguments(distill)
    distill.add_argument("--teacher", help="teacher checkpoint (.pt) or from_pretrained dir (config key teacher)")
    distill.add_argument("--student", help="FAMILY:PRESET (e.g. rt_detr:tiny; model.family / model.preset) or a "
                                           "from_pretrained dir to start from (model.pretrained)")
    distill.add_argument("--method", action="append", metavar="NAME",
                         help="a method or recipe (listed below; repeatable): sets config key methods")
    distill.set_defaults(func=cmd_distill)


def _add_methods(sub: Any, common: argparse.ArgumentParser) -> None:
    me = sub.add_parser("methods", parents=[common], help="every distillation method's options and defaults")
    me.set_defaults(func=cmd_methods)


def cmd_methods(args: argparse.Namespace) -> int:
    """``detrkd methods``: each method's one line, its recipe weight and every option with its default."""
    from detrkd.distill.catalog import RECIPE_SUMMARIES, RECIPES, SUMMARIES
    from detrkd.distill.methods import method_class

    from detrkd.distill.methods import option_hints

    for name, summary in SUMMARIES.items():
        cls = method_class(name)
        print(f"{name}: {summary}")
        print(f"  weight: {RECIPES[name][name]['weight']:g}  (lambda: multiplies every term)")
        print("  terms: {" + ", ".join(f"{t}: {w:g}" for t, w in cls.terms.items()) + "}  (per-term weights)")
        for param in option_hints(cls).values():
            default = "required" if param.default is param.empty else repr(param.default)
            print(f"  {param.name}: {default}")
    for name, summary in RECIPE_SUMMARIES.items():
        print(f"{name} (recipe): {summary}")
    return 0


def _add_run_arguments(train: argparse.ArgumentParser) -> None:
    """Arguments shared by ``train`` and ``distill``."""
    train.add_argument("--config", type=Path, help="YAML config (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)")
    train.add_argument("--output-dir", help="run directory (config key output_dir)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in the output dir from its last.pt "
                            "(its config.yaml is used when --config is not given)")
    shortcuts = train.add_argument_group("shortcuts for config keys")
    shortcuts.add_argument("--family", help="model.family, e.g. deformable_detr")
    shortcuts.add_argument("--preset", help="model.preset: tiny, small or base")
    shortcuts.add_argument("--data", help="data.root, a dataset in the digits layout")
    shortcuts.add_argument("--epochs", type=int, help="optim.epochs")
    shortcuts.add_argument("--device", help="device, e.g. cpu or cuda")
    shortcuts.add_argument("--seed", type=int, help="seed: weights init, data order, augmentation "
                                                    "(a CPU run repeats bit-for-bit)")
    _add_progress_flag(train)


def _add_eval(sub: Any, common: argparse.ArgumentParser) -> None:
    ev = sub.add_parser("eval", parents=[common], help="COCO-evaluate a detector")
    _add_checkpoint_on_data(ev, "evaluate")
    ev.add_argument("--out", type=Path, help="also write the metrics as JSON to this file")
    _add_progress_flag(ev)
    ev.set_defaults(func=cmd_eval)


def _add_checkpoint_on_data(parser: argparse.ArgumentParser, verb: str) -> None:
    """The arguments of commands that run a checkpoint over a dataset split (eval, analyze)."""
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a detrkd checkpoint (.pt) or a HF from_pretrained directory")
    parser.add_argument("--data", help="dataset root (default: the checkpoint's training data)")
    parser.add_argument("--split", default="val", choices=("train", "val"), help="split (default val)")
    parser.add_argument("--image-size", type=int, help="the side fed to the model (default: the model's own preprocessing)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--max-images", type=int, help=f"{verb} only the first N images")
    parser.add_argument("--device", default="cpu", help="device (default cpu)")


def _add_predict(sub: Any, common: argparse.ArgumentParser) -> None:
    pr = sub.add_parser("predict", parents=[common], help="draw a detector's boxes on an image")
    pr.add_argument("--checkpoint", required=True, type=Path,
                    help="a detrkd checkpoint (.pt) or a HF from_pretrained directory")
    pr.add_argument("--image", required=True, type=Path, help="input image")
    pr.add_argument("--out", required=True, type=Path, help="output PNG")
    pr.add_argument("--threshold", type=float, default=0.3, help="minimum score to draw (default 0.3)")
    pr.add_argument("--image-size", type=int, help="the side fed to the model (default: the model's own preprocessing)")
    pr.add_argument("--device", default="cpu", help="device (default cpu)")
    pr.set_defaults(func=cmd_predict)


def _add_export(sub: Any, common: argparse.ArgumentParser) -> None:
    ex = sub.add_parser("export", parents=[common],
                        help="a run or checkpoint -> a transformers from_pretrained dir",
                        description="Write a detrkd run's detector (its best.pt, else last.pt) or a "
                                    "checkpoint as a directory transformers' from_pretrained loads, with "
                                    "detrkd_export.json naming where the weights came from.")
    ex.add_argument("--checkpoint", required=True, type=Path, help="a run directory or a detrkd .pt")
    ex.add_argument("--out", required=True, type=Path, help="the directory to write (must not exist or be empty)")
    ex.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="weight dtype (default float32; detrkd loads any of them as float32)")
    ex.add_argument("--with-run-files", action="store_true",
                    help="also copy the run's config.yaml, metrics.jsonl and provenance.jsonl (what a "
                         "shipped teacher carries: how it was trained)")
    ex.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """``detrkd export``."""
    import shlex

    from detrkd.export import export_checkpoint

    command = shlex.join(["detrkd", "export", "--checkpoint", str(args.checkpoint), "--out", str(args.out),
                          "--dtype", args.dtype] + (["--with-run-files"] if args.with_run_files else []))
    record = export_checkpoint(args.checkpoint, args.out, args.dtype, command=command, run_files=args.with_run_files)
    print(f"exported {record['source']} (step {record['global_step']}, {record['family']}, {args.dtype}) "
          f"-> {args.out}")
    return 0


def _add_analyze(sub: Any, common: argparse.ArgumentParser) -> None:
    an = sub.add_parser("analyze", parents=[common], help="analyse a detector's queries")
    kinds = an.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    gqs = kinds.add_parser("gqs", parents=[common],
                           help="QSKD Table 1 (queries per GT by GIoU), or with --figure its Fig. 1/4")
    _add_checkpoint_on_data(gqs, "analyse")
    gqs.add_argument("--threshold", type=float, default=0.0,
                     help="GQS hard-negative threshold, G > threshold (default 0.0)")
    gqs.add_argument("--out", type=Path, help="also write the statistics as JSON to this file")
    fig = gqs.add_argument_group("figure (draws one image instead of the statistics)")
    which = fig.add_mutually_exclusive_group()
    which.add_argument("--image-id", type=int, help="COCO id of the image to draw")
    which.add_argument("--image", type=Path, help="the image to draw: a file of the split or its file_name")
    fig.add_argument("--figure", type=Path, help="output PNG")
    fig.add_argument("--gt-index", type=int, help="the image's GT to analyse (default: the largest)")
    _add_progress_flag(gqs)
    gqs.set_defaults(func=cmd_analyze_gqs)


def _add_bench(sub: Any, common: argparse.ArgumentParser) -> None:
    from detrkd.bench.accuracy import PRESETS, SETTINGS, SUITES

    bench = sub.add_parser("bench", parents=[common], help="benchmarks: accuracy and training-step overhead")
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    acc = kinds.add_parser("accuracy", parents=[common],
                           help="teacher, no-KD student and distilled students, one schedule, COCO AP",
                           description="Train (or reuse) every run of a suite and write its result "
                                       "table; finished runs are reused, interrupted ones resumed.")
    acc.add_argument("--suite", default="all", choices=sorted(SUITES),
                     help="all = every method at its paper defaults (default); or one method's ablation")
    acc.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="run sizes (default cpu)")
    acc.add_argument("--setting", default="compressed", choices=sorted(SETTINGS),
                     help="teacher / student pair: compressed = RT-DETR small -> tiny (default); paper = the "
                          "papers' setting, the student keeps the teacher's transformer, smaller backbone only; "
                          "heterogeneous = the same teacher -> a torchvision Faster R-CNN (suite heterogeneous); "
                          "cross_family / cross_family_deimv2 = the same teacher -> an RF-DETR / a DEIMv2 "
                          "student (suite cross_family)")
    acc.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="K",
                     help="train every row but the teacher once per seed; rows report the mean (default 0)")
    acc.add_argument("--threads", type=int, help="torch threads of each run started now (default: the configs')")
    acc.add_argument("--only", nargs="*", metavar="ROW",
                     help="train only these rows of the suite now (with no ROW: none but the teacher and no-KD "
                          "rows; finished rows are reported either way)")
    acc.add_argument("--teacher", type=Path, metavar="DIR",
                     help="distil every row from this exported teacher (detrkd export --with-run-files) instead "
                          "of training the setting's teacher row; the teacher row is its evaluation")
    acc.add_argument("--out", type=Path, help="result file (default benchmarks/results/[paper/]<suite>.json, "
                                              "accuracy.json for all)")
    acc.set_defaults(func=cmd_bench_accuracy)
    ov = kinds.add_parser("overhead", parents=[common], help="seconds per training step of every method",
                          description="Time one training step of the student alone, student + teacher "
                                      "inference (the floor) and student + teacher + each method.")
    ov.add_argument("--queries", type=int, nargs="+", default=[300, 900], help="query counts (default 300 900)")
    ov.add_argument("--methods", nargs="+", help="methods to time (default: all)")
    ov.add_argument("--teacher", default="rt_detr:small", help="teacher FAMILY:PRESET (default rt_detr:small)")
    ov.add_argument("--student", default="rt_detr:tiny", help="student FAMILY:PRESET (default rt_detr:tiny)")
    ov.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    ov.add_argument("--image-size", type=int, default=256, help="square input side (default 256)")
    ov.add_argument("--steps", type=int, default=5, help="timed rounds, one step of every method each (default 5; median)")
    ov.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    ov.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ov.add_argument("--data", type=Path, default=Path("data/digits"),
                    help="take the batch from this dataset's train split (default data/digits; a "
                         "synthetic batch when it does not exist)")
    ov.add_argument("--breakdown", type=int, default=3, help="profile the N slowest methods (default 3)")
    ov.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.json"), help="result file")
    ov.set_defaults(func=cmd_bench_overhead)


def _add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress bars (default: when stderr is a terminal)")


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


# ---- entry point ----------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``detrkd`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage + "detrkd: error: ..."
        return int(exc.code or 0)
    debug = getattr(args, "debug", False)
    _setup_logging(debug)
    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as exc:
        if _is_main_process():
            print(f"detrkd: {_one_line(exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED if exc.signum == signal.SIGINT else EXIT_TERMINATED
    except BrokenPipeError:  # the reader went away (e.g. `detrkd methods | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("detrkd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"detrkd: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        from detrkd.distributed import shutdown_distributed

        shutdown_distributed()


def _is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` job, or a plain process (the launcher's ``RANK`` variable)."""
    return os.environ.get("RANK", "0") == "0"


def _setup_logging(debug: bool) -> None:
    """``detrkd`` log messages (warnings, resume notes, eval results) go to stderr; Python
    warnings are one line each; transformers' and the Hub's progress bars stay quiet unless
    ``--debug``."""
    if not debug:
        warnings.showwarning = _one_line_warning
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
        if "transformers" in sys.modules:  # already imported (detrkd used as a library, tests)
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    logger = logging.getLogger("detrkd")
    # in a data-parallel job only rank 0 reports progress; the others still report problems
    logger.setLevel(logging.DEBUG if debug else logging.INFO if _is_main_process() else logging.WARNING)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` for the CLI: 'detrkd: warning: MESSAGE' on one line, no source echo
    (``--debug`` keeps Python's own format)."""
    print(f"detrkd: warning: {_one_line(message)}", file=file or sys.stderr)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


# ---- data -----------------------------------------------------------------------------------
def cmd_data_digits(args: argparse.Namespace) -> int:
    """``detrkd data digits``."""
    from detrkd.data.digits import make_digits_dataset

    summary = make_digits_dataset(args.out, train_images=args.train_images, val_images=args.val_images,
                                  image_size=args.image_size, seed=args.seed, overwrite=args.overwrite)
    for split in ("train", "val"):
        info = summary[split]
        print(f"{split}: {info['images']} images, {info['objects']} objects "
              f"(small {info['small']}, medium {info['medium']}, large {info['large']}) "
              f"-> {info['annotation_file']}")
    print(f"wrote {args.out} in {summary['seconds']:.1f}s")
    return 0


# ---- train ----------------------------------------------------------------------------------
def train_overrides(args: argparse.Namespace) -> list[str | tuple[str, Any]]:
    """Config overrides from the shortcut flags (typed pairs) followed by ``--set`` strings."""
    shortcuts = {"model.family": args.family, "model.preset": args.preset, "data.root": args.data,
                 "optim.epochs": args.epochs, "device": args.device, "output_dir": args.output_dir,
                 "seed": args.seed, "teacher": getattr(args, "teacher", None)}
    pairs: list[str | tuple[str, Any]] = [(k, v) for k, v in shortcuts.items() if v is not None]
    pairs += student_overrides(getattr(args, "student", None))
    if getattr(args, "method", None):
        from detrkd.distill.catalog import methods_for

        pairs.append(("methods", methods_for(args.method)))
    return pairs + list(args.overrides)


def student_overrides(student: str | None) -> list[tuple[str, Any]]:
    """``--student``: FAMILY:PRESET -> model.family / model.preset; a from_pretrained directory ->
    model.pretrained and model.family (from its config.json's model_type)."""
    if student is None:
        return []
    path = Path(student)
    if path.is_dir():
        from detrkd.models import family_of_pretrained_dir

        try:
            family = family_of_pretrained_dir(path)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"--student {student}: {exc}") from None
        return [("model.family", family), ("model.pretrained", str(path)), ("model.preset", None)]
    family, sep, preset = student.partition(":")
    if not sep or not family or not preset:
        raise ConfigError(f"--student {student!r}: use FAMILY:PRESET (e.g. rt_detr:tiny) or a from_pretrained dir")
    return [("model.family", family), ("model.preset", preset)]


def train_config_source(args: argparse.Namespace) -> Path | None:
    """``--config``, or with ``--resume`` and no ``--config`` the run dir's ``config.yaml``."""
    if args.config is not None or not args.resume or args.output_dir is None:
        return args.config
    saved = Path(args.output_dir) / "config.yaml"
    return saved if saved.is_file() else None


def print_summary(summary: dict[str, Any]) -> None:
    """Where a training / distillation run stopped and its best val AP, and how to export it (rank 0)."""
    if not _is_main_process():
        return
    best = summary["best_metric"]
    status = "stopped at optim.max_steps" if summary["stopped_early"] else "done"
    print(f"{status}: {summary['global_step']} steps, epoch {summary['last_epoch']}, "
          f"best AP {'n/a' if best is None else f'{best:.4f}'} -> {summary['run_dir']}")
    from detrkd.models.cnn import is_cnn_family

    target = "torchvision" if is_cnn_family(summary.get("family")) else "transformers"
    print(f"for {target}: detrkd export --checkpoint {summary['run_dir']} --out {summary['run_dir']}/hf")


def cmd_train(args: argparse.Namespace) -> int:
    """``detrkd train``."""
    from detrkd.config import load_config
    from detrkd.recipe import train_detector

    config = load_config(train_config_source(args), train_overrides(args))
    summary = train_detector(config, resume=args.resume, progress=_progress(args))
    print_summary(summary)
    return 0


# ---- distill --------------------------------------------------------------------------------
def cmd_distill(args: argparse.Namespace) -> int:
    """``detrkd distill``."""
    from detrkd.config import DistillConfig, load_config
    from detrkd.recipe import distill_detector

    config = load_config(train_config_source(args), train_overrides(args), schema=DistillConfig)
    summary = distill_detector(config, resume=args.resume, progress=_progress(args))
    print_summary(summary)
    return 0


# ---- bench ----------------------------------------------------------------------------------
def cmd_bench_accuracy(args: argparse.Namespace) -> int:
    """``detrkd bench accuracy``."""
    from detrkd.bench.accuracy import markdown, run_suite

    rows = run_suite(args.suite, args.preset, only=args.only, out=args.out, setting=args.setting, seeds=args.seeds,
                     threads=args.threads, teacher=args.teacher)
    print(markdown(rows))
    return 0


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    """``detrkd bench overhead``."""
    import torch

    from detrkd.bench.overhead import Pair, markdown, plot, run_overhead
    from detrkd.provenance import git_sha, hardware

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    (t_family, _, t_preset), (s_family, _, s_preset) = (x.partition(":") for x in (args.teacher, args.student))
    pair = Pair(t_family, t_preset or "small", s_family, s_preset or "tiny")
    from detrkd.config import DataConfig

    data = args.data if Path(DataConfig(root=str(args.data)).split_paths("train")[1]).exists() else None
    rows, breakdown = run_overhead(pair, args.queries, args.methods, args.batch_size, args.image_size,
                                   args.steps, args.warmup, data, args.breakdown)
    result = {"rows": rows, "breakdown_ms": breakdown, "teacher": args.teacher, "student": args.student,
              "batch_size": args.batch_size, "image_size": args.image_size, "steps": args.steps,
              "warmup": args.warmup, "data": str(data) if data else "synthetic",
              "hardware": hardware(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "git_sha": git_sha(), "command": _overhead_command(args)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows)
    args.out.with_suffix(".md").write_text(table + "\n")
    plot(rows, args.out.with_suffix(".png"), f"{args.teacher} -> {args.student}, batch {args.batch_size}, "
                                             f"{torch.get_num_threads()} threads")
    print(table)
    return 0


def _overhead_command(args: argparse.Namespace) -> str:
    """The ``detrkd bench overhead`` command line with every option spelled out."""
    import shlex

    parts = ["detrkd", "bench", "overhead", "--queries", *map(str, args.queries), "--teacher", args.teacher,
             "--student", args.student, "--batch-size", str(args.batch_size), "--image-size",
             str(args.image_size), "--steps", str(args.steps), "--warmup", str(args.warmup), "--data",
             str(args.data), "--breakdown", str(args.breakdown), "--out", str(args.out)]
    if args.methods:
        parts += ["--methods", *args.methods]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)


# ---- eval -----------------------------------------------------------------------------------
def detector_on_split(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    """``inference.detector_on_split`` with the command's flags."""
    from detrkd.inference import detector_on_split as on_split

    return on_split(args.checkpoint, args.split, data=args.data, image_size=args.image_size,
                    batch_size=args.batch_size, device=args.device)


def cmd_eval(args: argparse.Namespace) -> int:
    """``detrkd eval``."""
    from torch.utils.data import DataLoader

    from detrkd.data.collate import collate
    from detrkd.evaluation import evaluate

    model, dataset, data, ann = detector_on_split(args)
    loader = DataLoader(dataset, batch_size=data.batch_size, shuffle=False, collate_fn=collate)
    stats = evaluate(model, loader, dataset, args.device, max_images=args.max_images,
                     progress=_progress(args))
    print(format_stats(stats))
    if args.out is not None:
        record = {"checkpoint": str(args.checkpoint), "annotation_file": ann, "split": args.split,
                  "image_size": data.image_size, **stats}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


_STAT_LABELS = {
    "ap": "AP @[.50:.95]", "ap50": "AP @.50", "ap75": "AP @.75", "aps": "AP small", "apm": "AP medium",
    "apl": "AP large", "ar1": "AR @1", "ar10": "AR @10", "ar100": "AR @100", "ars": "AR small",
    "arm": "AR medium", "arl": "AR large",
}


def format_stats(stats: dict[str, float]) -> str:
    """A two-column table of the COCO stats, images/s and the image count."""
    rows = [(label, f"{stats[key]:.4f}" if stats[key] >= 0 else "n/a")
            for key, label in _STAT_LABELS.items() if key in stats]
    if "images_per_sec" in stats:
        rows.append(("images/s", f"{stats['images_per_sec']:.2f}"))
    if "num_images" in stats:
        rows.append(("images", f"{int(stats['num_images'])}"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value:>8}" for label, value in rows)


# ---- analyze --------------------------------------------------------------------------------
def cmd_analyze_gqs(args: argparse.Namespace) -> int:
    """``detrkd analyze gqs``: the Table 1 statistic over a split, or with ``--figure`` Fig. 1/4."""
    from torch.utils.data import DataLoader

    from detrkd import analysis
    from detrkd.data.collate import collate

    if (args.image_id is not None or args.image is not None or args.gt_index is not None) != (args.figure is not None):
        raise ValueError("a figure needs --figure OUT.png and the image (--image-id ID or --image PATH)")
    model, dataset, data, ann = detector_on_split(args)
    if getattr(model, "decode", None) is None:  # a torchvision CNN student (detrkd.models.cnn)
        raise ConfigError(f"analyze gqs reads a DETR's query predictions; {args.checkpoint} is a {model.family} detector")
    if args.figure is not None:
        index = analysis.find_image_index(dataset, args.image_id, args.image)
        summary = analysis.draw_dataset_image(model, dataset, index, args.gt_index, args.figure,
                                              args.threshold, args.device)
        for q in summary["queries"]:
            print(f"{q['kind']}\tquery {q['query']}\tG {q['giou']:.3f}\tscore {q['score']:.3f}")
        print(f"image {summary['image_id']}, GT {summary['gt_index']}: {summary['selected']} selected "
              f"queries in the image -> {args.figure}")
        return 0
    loader = DataLoader(dataset, batch_size=data.batch_size, shuffle=False, collate_fn=collate)
    stats = analysis.gqs_statistics(model, loader, args.threshold, max_images=args.max_images,
                                    device=args.device, progress=_progress(args))
    print(analysis.format_statistics(stats))
    if args.out is not None:
        record = {"checkpoint": str(args.checkpoint), "data": data.root, "annotation_file": ann,
                  "split": args.split, "image_size": data.image_size, **analysis.statistics_to_json(stats)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


# ---- predict --------------------------------------------------------------------------------
def cmd_predict(args: argparse.Namespace) -> int:
    """``detrkd predict``: a header and one tab-separated line per detection on stdout, and
    ``--out`` in the format its suffix names (an image with the boxes drawn, or .json)."""
    from PIL import Image

    from detrkd.data.coco import to_rgb8
    from detrkd.inference import (HEADER, class_names, draw_detections, load_for_inference, output_format,
                                  predict_image)

    fmt = output_format(args.out)  # before any work: an unknown suffix is refused up front
    if not args.image.is_file():
        raise FileNotFoundError(f"image not found: {args.image}")
    model, _ = load_for_inference(args.checkpoint, args.device)
    with Image.open(args.image) as im:
        image = to_rgb8(im)
    detections = predict_image(model, image, args.image_size, args.device, args.threshold)
    names = class_names(model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        named = [{**det, "name": names(det["label"])} for det in detections]
        args.out.write_text(json.dumps({"image": str(args.image), "checkpoint": str(args.checkpoint),
                                        "threshold": args.threshold, "detections": named}, indent=2) + "\n")
    else:
        draw_detections(image, detections, names).save(args.out, format=fmt)
    print("\t".join(HEADER))
    for det in detections:
        box = "\t".join(f"{v:.1f}" for v in det["box"])
        print(f"{names(det['label'])}\t{det['score']:.3f}\t{box}")
    print(f"{len(detections)} detections with score >= {args.threshold} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
