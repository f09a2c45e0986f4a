"""`alloy align`: permute OTHER's units to match REFERENCE (Git Re-Basin weight matching) and write it.

The output folder holds OTHER, aligned (same function, new unit order), as
safetensors with OTHER's config and tokenizer files, plus `alignment.json`
(seed, rounds, objective per round). With `--alpha` it holds the
interpolation `(1 − α)·REFERENCE + α·aligned OTHER` instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import AlloyError

ALIGNMENT_FILE = "alignment.json"


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the `align` subcommand to an `alloy` subparsers object."""
    from .alignment.builtin_specs import ATTENTION_MODES

    p = subparsers.add_parser(
        "align",
        help="align a model to a reference by permuting its units (models trained from different initialisations)",
        description="Permute OTHER's hidden units to match REFERENCE (weight matching) and write the aligned OTHER.",
    )
    p.add_argument("reference", type=Path, help="the model to align to (file or folder)")
    p.add_argument("other", type=Path, help="the model to permute (file or folder)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (written only when complete)")
    p.add_argument("--spec", required=True, help="mlp, resnet, vit, gpt2, or a permutation spec file (YAML/JSON)")
    p.add_argument("--seed", type=int, default=0, help="seed of the group visiting order (default 0)")
    p.add_argument("--max-rounds", type=int, default=100, help="cap on coordinate-descent rounds (default 100)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="where cost matrices are computed (default cpu)")
    p.add_argument("--num-heads", type=int, help="attention heads (vit/gpt2; default: from config.json)")
    p.add_argument("--attention", choices=ATTENTION_MODES, default="heads",
                   help="vit/gpt2: permute whole heads and dims within them (heads), dims within heads only (within), or not at all (off)")
    p.add_argument("--alpha", type=float, help="write (1-alpha)*REFERENCE + alpha*aligned OTHER instead of the aligned OTHER")
    p.add_argument("--write-spec", type=Path, metavar="FILE", help="also save the spec used as YAML/JSON, to edit by hand")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run `alloy align`; an AlloyError ends it with one line on stderr and exit code 1."""
    try:
        return _align(args)
    except AlloyError as exc:
        print(f"alloy: error: {exc}", file=sys.stderr)
        return 1


def _align(args: argparse.Namespace) -> int:
    from .alignment import InterpolatedCheckpoint, align_checkpoint, write_spec_file
    from .checkpoint import open_checkpoint
    from .export import export_checkpoint

    if args.max_rounds < 1:
        raise AlloyError("--max-rounds must be at least 1")
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        raise AlloyError(f"--alpha must be between 0 and 1, not {args.alpha}")
    reference = open_checkpoint(args.reference)
    other = open_checkpoint(args.other)

    def say(stage: str, done: int, total: int) -> None:
        if not args.quiet and (stage != "load" or done == total):
            what = "rounds" if stage == "match" else "tensors"
            print(f"{stage}: {done} {what}" + (f" of at most {total}" if stage == "match" else ""), file=sys.stderr)

    aligned, result = align_checkpoint(
        reference, other, args.spec, seed=args.seed, max_rounds=args.max_rounds, device=args.device,
        num_heads=args.num_heads, attention=args.attention, progress=say,
    )
    if args.write_spec is not None:
        write_spec_file(aligned.spec, args.write_spec)
    report = result.to_dict() | {"reference": str(reference.path), "other": str(other.path)}
    output = aligned
    if args.alpha is not None:
        output = InterpolatedCheckpoint(reference, aligned, args.alpha)
        report["alpha"] = args.alpha
    target = export_checkpoint(
        output, args.output, overwrite=args.force,
        extra_files={ALIGNMENT_FILE: json.dumps(report, indent=2) + "\n"},
    )
    state = "converged" if result.converged else "stopped at the round cap"
    print(
        f"aligned {other.path.name} to {reference.path.name} with spec {result.spec_name}: {result.rounds} rounds ({state}), "
        f"objective {result.objectives[0]:.6g} -> {result.objective:.6g} -> {target}"
    )
    return 0
