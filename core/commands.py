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
from rbm_study.core.config import LabConfig, load_config, set_dotted
from rbm_study.core.data import EVAL_BINARIZE_SEED, TEST_BINARIZE_SEED, binarize_once, load_mnist
from rbm_study.core.errors import UserError, output_folder
from rbm_study.core.evaluate import RAISE_BETAS, RAISE_CHAINS, RAISE_IMAGES
from rbm_study.core.models import DBN, RBM, UpDownDBN, mean_activity, visible_bias_from_means


def run_command(args: argparse.Namespace, model: type[LabConfig] = LabConfig) -> int:
    """`rbm-study run`. `model` is the lab's config, or the CLI passes the study's (a superset) so
    that a study config also runs as a single trial."""
    from rbm_study.core.pipeline import run_lab

    config = load_config(args.config, args.set, model)
    if args.data_dir:
        config = config.with_values({"data.root": args.data_dir})
    if args.device:
        config = config.with_values({"device": args.device})
    out = output_folder(args.out)
    try:
        result = run_lab(config, progress=True)
    except FloatingPointError as err:  # a learning rate too large for the data: the user's to change
        raise UserError(str(err)) from None
    written = [labfiles.save(model, out / labfiles.FILE_NAMES[stage]) for stage, model in result.models().items()]
    write_metrics(out / "metrics.json", result.metrics, seconds_total=result.seconds, config=config.to_dict())
    print(f"wrote {', '.join(str(p) for p in written)} and {out / 'metrics.json'}")
    print(f"final test log-likelihood (lower bound) {result.metrics['final.test.log_likelihood']:.2f} nats")
    return 0


def write_metrics(path: Path, metrics: dict[str, float], **extra: object) -> None:
    """Flat dotted metrics as nested, strict JSON (what `jq` and `JSON.parse` read).

    A non-finite metric (a diverged model's NaN, say) is written as null: Python's `NaN` and
    `-Infinity` are not JSON.
    """
    nested: dict = {}
    for name, value in metrics.items():
        set_dotted(nested, name, value if math.isfinite(value) else None)
    nested.update(extra)
    path.write_text(json.dumps(nested, indent=2, allow_nan=False))


def evaluate_command(args: argparse.Namespace) -> int:
    """`rbm-study evaluate`: one line per method, "... <estimate>", all on the first `--images` images.

    exact and ais give log Z and with it the mean log-likelihood (RBM) or its variational lower
    bound (DBN), with log Z's interval carried through and the standard error over the images;
    raise gives RAISE's estimate (`core.evaluate`) and, when a forward method ran too, the mean
    difference from it image by image on the images RAISE scored.
    """
    if args.chains is not None and args.chains < 1:
        raise UserError("--chains must be >= 1")
    if args.betas is not None and args.betas < 3:
        raise UserError("--betas must be >= 3")
    if args.images is not None and args.images < 1:
        raise UserError("--images must be >= 1")
    if not Path(args.file).is_file():
        why = "is a folder, not a lab weight file" if Path(args.file).is_dir() else "does not exist"
        raise UserError(f"{args.file} {why}")
    model = labfiles.load(args.file)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but torch sees no CUDA GPU")
    data = load_mnist(args.data_dir or os.environ.get("MNIST_ROOT"), device)
    v = binarize_once(data.split(args.split), seed=EVAL_BINARIZE_SEED if args.split == "val" else TEST_BINARIZE_SEED)
    v = v[: args.images]
    generator = torch.Generator(device=device).manual_seed(args.seed)

    if isinstance(model, RBM):
        rbm = model.to(device)
        annealed, base, label = rbm, _base(data.train), f"{args.split} LL"

        def scores(images: torch.Tensor) -> torch.Tensor:
            return evaluate.unnormalised_log_p(rbm, images)

        def reverse(images: torch.Tensor, **settings: object) -> evaluate.RaiseEstimate:
            return evaluate.raise_log_likelihood(rbm, images, base, **settings)
    else:
        ud = UpDownDBN.from_dbn(model) if isinstance(model, DBN) else model
        ud = UpDownDBN(ud.R.to(device), ud.b_rec.to(device), ud.G.to(device), ud.a.to(device), ud.top.to(device))
        parts = (ud.R, ud.b_rec, ud.G, ud.a, ud.top)
        annealed, label = ud.top, f"{args.split} LL lower bound"
        base = visible_bias_from_means(mean_activity([RBM(ud.R, ud.a, ud.b_rec)], data.train))

        def scores(images: torch.Tensor) -> torch.Tensor:
            return evaluate.dbn_lower_bound_per_image(images, *parts, generator=generator)

        def reverse(images: torch.Tensor, **settings: object) -> evaluate.RaiseEstimate:
            return evaluate.dbn_raise_log_likelihood(images, *parts, base, **settings)

    small = min(annealed.n_visible, annealed.n_hidden) <= evaluate.AUTO_EXACT_UNITS
    methods = {"auto": ["exact" if small else "ais"], "all": [*(["exact"] if small else []), "ais", "raise"]}
    # per image log p from the first forward method (exact before ais): RAISE's line gives its gap to it
    forward_log_p, forward_name = None, ""
    image_scores = None
    for method in methods.get(args.method, [args.method]):
        if method == "raise":
            images = v if args.images is not None else v[:RAISE_IMAGES]
            estimate = reverse(images, chains=args.chains or RAISE_CHAINS, betas=args.betas or RAISE_BETAS,
                               generator=generator)
            gap = ""
            if forward_log_p is not None:
                difference = estimate.per_image - forward_log_p[: estimate.images].cpu()
                gap = (f", {difference.mean().item():+.2f} (se {evaluate.standard_error(difference):.2f}) "
                       f"from {forward_name} on these images")
            chains = f"{estimate.chains} chain{'s' if estimate.chains != 1 else ''}"
            print(f"raise ({chains} x {estimate.betas} betas, {estimate.images} images) "
                  f"{label} se {estimate.stderr:.2f}{gap}  {estimate.log_likelihood:.2f}")
            continue
        try:
            log_z = evaluate.log_z(annealed, method, base_visible_bias=base, chains=args.chains or 100,
                                   betas=args.betas or 14_500, generator=generator)
        except ValueError as err:  # exact asked for a layer too large to enumerate
            raise UserError(str(err)) from None
        if image_scores is None:  # the same per-image scores (and DBN samples) for every forward method
            image_scores = scores(v)
        ll = evaluate.LogLikelihood.from_scores(image_scores, log_z)
        if forward_log_p is None:
            forward_log_p, forward_name = image_scores - log_z.log_z, log_z.method
        settings = f"{log_z.chains} chains x {log_z.betas} betas" if log_z.method == "ais" else "enumerated"
        print(f"{log_z.method} ({settings}) log Z {log_z.log_z:.2f} [{log_z.low:.2f}, {log_z.high:.2f}]  "
              f"{label} [{ll.low:.2f}, {ll.high:.2f}] se {ll.stderr:.2f} ({ll.images} images)  {ll.mean:.2f}")
    return 0


def _base(train: torch.Tensor) -> torch.Tensor:
    return visible_bias_from_means(train.mean(dim=0))
