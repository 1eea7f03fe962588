"""`ldit inspect`: read-only looks inside a shard set, the sample order of a step, a checkpoint and a run.

    ldit inspect data SHARDS [--verify] [--threads N]
    ldit inspect order [SHARDS] [--config TRAIN.yaml] [--seed S --global-batch B --streams V]
                       (--step K | --steps K1:K2) [--world-size W [--rank R]]
    ldit inspect checkpoint RUN_OR_CHECKPOINT [--world-size W ...] [--against CONFIG.yaml [key=value ...]]
    ldit inspect run RUN

Plain text by default, `--json` for machines. Nothing here starts a process group, and the one file
written is the record of a good `data --verify` pass beside the manifest (data_prep/verify.py
`record_pass`; a line on stderr says whether it was written), so later starts check shard sizes only.
Each sub-command builds a JSON-ready dict and renders it as text: `data_report` and `order_report`
(slurm/inspect_data.py), `checkpoint_report` (slurm/inspect_checkpoint.py), `slurm.status.run_status`;
this module holds the parser and the dispatch, slurm/inspect_common.py what they share.

- `order` runs the trainer's own reader, `data_prep.reader.StreamReader(...).batches(start)`, at the
  given rank and world size, with a decoder that reads keys and labels and takes the flip decision
  from `data_prep.reader.flip_mask` (the latent decoder's rule) without decoding any array.
- `checkpoint` judges completeness with `trainer.checkpoint.problems` and which checkpoint a resume
  would pick with `trainer.checkpoint.Checkpointer.latest`; the world-size rule is the trainer's own,
  `trainer.config.world_size_problems`.
- `run` is `ldit status`'s text (shared code in `slurm/status.py`).

Exit status: 0 fine; 1 something is wrong (a shard fails verification, the inspected checkpoint is
incomplete or cannot resume at a requested world size, a missing manifest or checkpoint); 2 a usage
or configuration error. Errors are one line, `ldit inspect: error: …`, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from slurm.inspect_checkpoint import cmd_checkpoint
from slurm.inspect_common import (
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_USAGE,
    InspectError,
)
from slurm.inspect_data import cmd_data, cmd_order

SUMMARY = "a shard set (--verify, recorded beside it), the samples of a step, a checkpoint, a run"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, `ldit inspect: error: …`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"ldit inspect: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


# --------------------------------------------------------------------------------------------- run


def _cmd_run(ns: argparse.Namespace) -> int:
    from slurm.status import render_status, run_status

    r = run_status(Path(ns.run_dir))
    print(json.dumps(r, indent=1) if ns.json else render_status(r))
    return EXIT_OK


# ------------------------------------------------------------------------------------------ parser


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the four sub-commands to `parser` (the `inspect` parser of `ldit`, or a standalone one)."""
    sub = parser.add_subparsers(
        title="what", dest="what", metavar="<what>", required=True, parser_class=_Parser
    )
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "data", parents=[common], help="a shard set's manifest; --verify checks every shard",
        description="ldit inspect data: kind, count, shards, classes, latent statistics, producer, skipped "
        "inputs. --verify re-reads every shard (size, sha256, sample count); exit status 1 when one is bad. "
        "A pass that finds every shard good is recorded in SHARDS/shards-verified.json when the folder is "
        "writable, so a run's start on the set checks shard sizes only (a line on stderr says whether it "
        "was recorded).",
    )  # fmt: skip
    p.add_argument(
        "shards", metavar="SHARDS", help="shard set folder (with manifest.json), or a URL / pipe: template"
    )
    p.add_argument("--verify", action="store_true", help="check every shard's size, sha256 and sample "
                   "count; record a good pass in SHARDS/shards-verified.json")  # fmt: skip
    p.add_argument("--threads", type=int, default=4, metavar="N", help="threads of --verify (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    p = sub.add_parser(
        "order", parents=[common], help="the sample keys of a step, as the trainer's reader delivers them",
        description="ldit inspect order: the samples (key, class, place in the global batch, stream, and for "
        "latents whether the flipped latent is used) of global batch K, or of rank R's part of it, read by "
        "the trainer's StreamReader. Without --rank and with --world-size W, every rank's part in turn.",
    )  # fmt: skip
    p.add_argument(
        "shards", metavar="SHARDS", nargs="?", help="shard set folder (default: data.shards of --config)"
    )
    p.add_argument(
        "--config", metavar="TRAIN.yaml", help="a `ldit train` config: defaults for the data.* flags"
    )
    p.add_argument("--seed", type=int, help="data.seed")
    p.add_argument("--global-batch", type=int, metavar="B", help="data.global_batch")
    p.add_argument("--streams", type=int, metavar="V", help="data.streams")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--step", type=int, metavar="K", help="the step (0 is the first)")
    which.add_argument("--steps", metavar="K1:K2", help="steps K1, …, K2 - 1")
    p.add_argument("--world-size", type=int, default=1, metavar="W", help="world size (default 1)")
    p.add_argument("--rank", type=int, metavar="R", help="only rank R's part (default: every rank)")

    p = sub.add_parser(
        "checkpoint", parents=[common], help="step, topology, sizes, completeness, resumability, config diff",
        description="ldit inspect checkpoint: the latest checkpoint of a run directory (or the given "
        "checkpoint folder): step, samples seen, topology, sizes on disk, whether it is complete, whether "
        "it resumes at each --world-size and how, and with --against the config keys that differ. Exit "
        "status 1 when it is incomplete or cannot resume at a requested world size.",
    )  # fmt: skip
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="run directory or checkpoints/step-N folder")
    p.add_argument("--world-size", type=int, action="append", metavar="W",
                   help="world size to resume at (repeatable; default: the one it was saved at)")  # fmt: skip
    p.add_argument("--against", nargs="+", metavar="CONFIG.yaml|key=value",
                   help="a `ldit train` config (files, then overrides) to compare with the checkpoint's")  # fmt: skip

    p = sub.add_parser(
        "run", parents=[common], help="checkpoints, exports, last step and losses, SLURM jobs, evals",
        description="ldit inspect run: what `ldit status` shows; --json gives it as a dict.",
    )  # fmt: skip
    p.add_argument("run_dir", metavar="RUN", help="run directory (runs/<run.name>)")
    return parser


def main(argv: Sequence[str]) -> int:
    """`ldit inspect …` (argv without the leading "inspect"); returns the exit status."""
    from data_prep.manifest import ShardSetError

    parser = configure(_Parser(prog="ldit inspect", description=f"ldit inspect: {SUMMARY}."))
    try:
        ns = parser.parse_args(list(argv))
        if ns.what == "data":
            return cmd_data(ns)
        if ns.what == "order":
            return cmd_order(ns, parser)
        if ns.what == "checkpoint":
            return cmd_checkpoint(ns, parser)
        return _cmd_run(ns)
    except (InspectError, ShardSetError, FileNotFoundError) as exc:
        print(f"ldit inspect: error: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except SystemExit as exc:  # a usage error (already printed as one line) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
