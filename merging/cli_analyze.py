"""`alloy analyze RECIPE.yaml`: do the recipe's fine-tunes fight each other? Numbers, JSON and PNG figures.

Prints a summary (cosine similarity, norms, sign conflicts at the recipe's
density, what PCB keeps), and with `--json` writes the whole result, with
`--plots DIR` the figures as PNG files (drawn with pyqtgraph offscreen; Qt is
imported only then). Results are cached by file identity and parameters, so a
second run on unchanged files reads no tensor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import AlloyError, MergeCancelled

if TYPE_CHECKING:
    from .recipe import Recipe


def _densities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 0.05,0.1,0.2 (got {text!r})") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"densities must lie in (0, 1] (got {text!r})")
    return values


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the `analyze` subcommand to an `alloy` subparsers object."""
    p = subparsers.add_parser(
        "analyze",
        help="measure how the recipe's fine-tunes interfere (cosine, sign conflicts, magnitudes, PCB) without merging",
        description="Interference diagnostics of a recipe's fine-tuned models against its base: cosine similarity of task "
                    "vectors, norms, sign conflicts after trimming at every density, magnitude histograms, PCB scores; "
                    "with --retention, cos(merged, model) from a dry-run merge; with an alignment section, per-layer "
                    "similarity before/after permutation.",
    )
    p.add_argument("recipe", type=Path, help="recipe file (YAML)")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="write the full result as JSON")
    p.add_argument("--plots", type=Path, metavar="DIR", help="write the figures as PNG files into DIR")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--exact", action="store_true", help="read every parameter (default: exact up to 32M parameters, sampled above)")
    how.add_argument("--sample-size", type=int, metavar="N", help="sample N parameters per tensor (seeded by the recipe's seed)")
    p.add_argument("--block", type=int, default=None, metavar="B",
                   help="sample in runs of B consecutive parameters (default: 1/16 of each tensor's rows, 16 to 256; "
                        "longer runs read fewer disk pages when the files are not cached, with noisier estimates)")
    p.add_argument("--densities", type=_densities, metavar="D1,D2,...",
                   help="trim densities to evaluate (default 0.05, 0.10, ..., 1.0, plus the recipe's)")
    p.add_argument("--density", type=float, help="density the summary and figures mark (default: the recipe's, else 0.2)")
    ret = p.add_mutually_exclusive_group()
    ret.add_argument("--retention", dest="retention", action="store_true", default=None,
                     help="also compute cos(τ_merged, τ_i) from a dry-run merge (costs a merge without writing; "
                          "default: on for models analysed exactly)")
    ret.add_argument("--no-retention", dest="retention", action="store_false", help="skip the dry-run merge")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the analysis cache")
    p.add_argument("--cache-dir", type=Path, help="analysis cache folder (default: $ALLOY_CACHE_DIR/analysis or ~/.cache/alloy/analysis)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run `alloy analyze`; a user error ends it with one line on stderr and exit code 1 (130 when cancelled)."""
    try:
        return _analyze(args)
    except MergeCancelled as exc:
        print(f"alloy: {exc}", file=sys.stderr)
        return 130
    except AlloyError as exc:
        print(f"alloy: error: {exc}", file=sys.stderr)
        return 1


def _analyze(args: argparse.Namespace) -> int:
    from .analysis import AUTO_EXACT_MAX_PARAMS, analyze_recipe, default_cache_dir
    from .cli import _progress_bar
    from .progress import CancelToken
    from .recipe import load_recipe

    if args.sample_size is not None and args.sample_size < 1:
        raise AlloyError(f"--sample-size must be at least 1, not {args.sample_size}")
    if args.block is not None and args.block < 1:
        raise AlloyError(f"--block must be at least 1, not {args.block}")
    if args.density is not None and not 0 < args.density <= 1:
        raise AlloyError(f"--density must lie in (0, 1], not {args.density}")
    recipe = load_recipe(args.recipe)
    exact = True if args.exact else (False if args.sample_size is not None else None)
    retention = args.retention
    if retention is None:
        retention = bool(exact) or (exact is None and _float_params(recipe) <= AUTO_EXACT_MAX_PARAMS)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    on_event, close = _progress_bar(args.quiet)
    cancel = CancelToken()
    try:
        result = analyze_recipe(
            recipe, retention=retention, densities=args.densities, exact=exact, sample_size=args.sample_size,
            block_size=args.block, progress=on_event, cancel=cancel, cache_dir=cache_dir,
        )
    except KeyboardInterrupt:
        cancel.cancel()
        raise MergeCancelled("analysis cancelled") from None
    finally:
        close()
    density = args.density if args.density is not None else result.density
    if args.density is not None:
        result.density = args.density
    if not args.quiet:
        if result.interference is not None:
            print(result.interference.summary(density if density is not None else 0.2))
        for al in result.alignments:
            print(f"\nalignment of {al.other_label} to {al.reference_label}: cosine {float(al.cosine_before('overall')):.3f} "
                  f"before, {float(al.cosine_after('overall')):.3f} after; distance {float(al.distance_before('overall')):.4g} "
                  f"-> {float(al.distance_after('overall')):.4g}")
    if args.json is not None:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            result.save(args.json)
        except OSError as exc:
            raise AlloyError(f"{args.json}: cannot write the result: {exc.strerror or exc}") from None
        if not args.quiet:
            print(f"\nwrote {args.json}")
    if args.plots is not None:
        from app.plots import render_analysis_pngs

        try:
            files = render_analysis_pngs(result, args.plots, density=density)
        except OSError as exc:
            raise AlloyError(f"{args.plots}: cannot write the figures: {exc}") from None
        if not args.quiet:
            print(f"wrote {len(files)} figures to {args.plots}")
    return 0


def _float_params(recipe: "Recipe") -> int:
    """Floating-point parameters of the base (headers only), to decide whether the default is exact."""
    if recipe.base_model is None:
        return 0
    from .checkpoint import open_checkpoint

    base = open_checkpoint(recipe.base_model)
    try:
        return sum(base.info(n).numel for n in base.names() if base.info(n).is_float)
    finally:
        base.close()
