"""`rbm-study run` (the three lab tasks once, in-process) and `rbm-study evaluate` (score a weight file).

The arguments are defined in `rbm_study.cli`; these are the handlers it imports when they run."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
from rbm_study.core import evaluate, labfiles
from rbm_study.core.config import LAB_KEYS, Schema, load_config, set_dotted
from rbm_study.core.data import EVAL_BINARIZE_SEED, TEST_BINARIZE_SEED, binarize_once, load_mnist
from rbm_study.core.dbn import DBN, mean_activity
from rbm_study.core.errors import UserError
from rbm_study.core.finetune import UpDownDBN
from rbm_study.core.rbm import RBM, visible_bias_from_means


def run_command(args: argparse.Namespace, schema: Schema = LAB_KEYS) -> int:
    """`rbm-study run`. `schema` is the lab's keys, or the CLI passes the study's superset so that a
    study config also runs as a single trial."""
    from rbm_study.core.pipeline import run_lab

    config = load_config(args.config, args.set, schema)
    if args.data_dir:
        set_dotted(config, "data.root", args.data_dir)
    if args.device:
        set_dotted(config, "device", args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = run_lab(config, progress=True)
    except FloatingPointError as err:  # a learning rate too large for the data: the user's to change
        raise UserError(str(err)) from None
    written = [labfiles.save(model, out / labfiles.FILE_NAMES[stage]) for stage, model in result.models().items()]
    write_metrics(out / "metrics.json", result.metrics, seconds_total=result.seconds, config=config)
    print(f"wrote {', '.join(str(p) for p in written)} and {out / 'metrics.json'}")
    print(f"final test log-likelihood (lower bound) {result.metrics['final.test.log_likelihood']:.2f} nats")
    return 0


def write_metrics(path: Path, metrics: dict[str, float], **extra: object) -> None:
    """Flat dotted metrics as nested, strict JSON (what `jq` and `JSON.parse` read).

    A non-finite metric is written as null: AIS's lower end log(Z - 3 sigma) is -inf when the
    spread is wider than the estimate, and Python's `-Infinity` is not JSON.
    """
    nested: dict = {}
    for name, value in metrics.items():
        set_dotted(nested, name, value if math.isfinite(value) else None)
    nested.update(extra)
    path.write_text(json.dumps(nested, indent=2, allow_nan=False))


def evaluate_command(args: argparse.Namespace) -> int:
    if args.chains < 1 or args.betas < 2:
        raise UserError("--chains must be >= 1 and --betas >= 2")
    if not Path(args.file).is_file():
        raise UserError(f"{args.file} does not exist")
    model = labfiles.load(args.file)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but torch sees no CUDA GPU")
    data = load_mnist(args.data_dir or os.environ.get("MNIST_ROOT"), device)
    v = binarize_once(data.split(args.split), seed=EVAL_BINARIZE_SEED if args.split == "val" else TEST_BINARIZE_SEED)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    ais = {"chains": args.chains, "betas": args.betas, "generator": generator}

    if isinstance(model, RBM):
        model = model.to(device)
        estimate = evaluate.log_z(model, args.method, base_visible_bias=_base(data.train), **ais)
        value = evaluate.mean_log_likelihood(model, v, estimate.log_z)
        label = f"{args.split} LL"
    else:
        ud = UpDownDBN.from_dbn(model) if isinstance(model, DBN) else model
        ud = UpDownDBN(ud.R.to(device), ud.b_rec.to(device), ud.G.to(device), ud.a.to(device), ud.top.to(device))
        h1_means = mean_activity([RBM(ud.R, ud.a, ud.b_rec)], data.train)
        estimate = evaluate.log_z(ud.top, args.method, base_visible_bias=visible_bias_from_means(h1_means), **ais)
        value = evaluate.dbn_lower_bound(v, ud.R, ud.b_rec, ud.G, ud.a, ud.top, top_log_z=estimate.log_z,
                                         generator=generator)
        label = f"{args.split} LL lower bound"
    settings = f"{estimate.chains} chains x {estimate.betas} betas" if estimate.method == "ais" else "enumerated"
    print(f"{estimate.method} ({settings}) log Z {estimate.log_z:.2f} [{estimate.low:.2f}, {estimate.high:.2f}]"
          f"  {label} {value:.2f}")
    return 0


def _base(train: torch.Tensor) -> torch.Tensor:
    return visible_bias_from_means(train.mean(dim=0))
