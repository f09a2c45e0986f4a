"""`alloy` command line: merge, inspect, demo, and the commands other modules register.

Every error a user can cause ends the command with one line on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .errors import AlloyError, MergeCancelled
from .progress import CancelToken, ProgressEvent

# Modules that add a subcommand: each has `register(subparsers)`; the parser's
# `run` default is called with the parsed arguments.
_PLUGIN_COMMANDS = ("merging.cli_align", "merging.cli_analyze", "merging.cli_push")


def _progress_bar(disable: bool) -> tuple[Callable[[ProgressEvent], None], Callable[[], None]]:
    """A tqdm bar per stage, in bytes when the stage counts bytes."""
    from tqdm import tqdm

    state: dict[str, object] = {"stage": None, "bar": None}

    def close() -> None:
        bar = state["bar"]
        if bar is not None:
            bar.close()  # type: ignore[attr-defined]
        state["bar"] = None

    def on_event(ev: ProgressEvent) -> None:
        if disable:
            return
        if state["stage"] != ev.stage or state["bar"] is None:
            close()
            state["stage"] = ev.stage
            if ev.bytes_total:
                state["bar"] = tqdm(total=ev.bytes_total, unit="B", unit_scale=True, desc=ev.stage, file=sys.stderr)
            else:
                state["bar"] = tqdm(total=ev.total, unit="tensor", desc=ev.stage, file=sys.stderr)
        bar = state["bar"]
        value = ev.bytes_done if ev.bytes_total else ev.done
        bar.update(value - bar.n)  # type: ignore[attr-defined]
        if value >= (ev.bytes_total or ev.total):
            close()

    return on_event, close


def _cmd_merge(args: argparse.Namespace) -> int:
    from .executor import run_merge
    from .export import parse_size
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    try:
        shard = parse_size(args.shard_size)
    except ValueError as exc:
        raise AlloyError(f"--shard-size: {exc}") from None
    if args.push:
        from .cli_push import check_push_target

        problem = check_push_target(args.push, token_from_env=args.token_from_env)
        if problem is not None:
            raise AlloyError(f"--push: {problem}")
    on_event, close = _progress_bar(args.quiet)
    cancel = CancelToken()
    try:
        result = run_merge(
            recipe,
            args.output,
            out_dtype=args.out_dtype,
            shard_size=shard,
            device=args.device,
            overwrite=args.force,
            license=args.license,
            progress=on_event,
            cancel=cancel,
        )
    except KeyboardInterrupt:
        cancel.cancel()
        raise MergeCancelled() from None
    finally:
        close()
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(
        f"merged {result.merged_tensors} of {result.tensors} tensors in {result.seconds:.1f} s "
        f"({result.input_bytes / 1e9:.2f} GB read, {result.throughput_gbps:.2f} GB/s) -> {result.output}"
    )
    if args.push:
        from .cli_push import push_after_merge

        return push_after_merge(
            result.output, args.push, private=args.private, token_from_env=args.token_from_env, commit_message=args.commit_message
        )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import open_checkpoint

    ck = open_checkpoint(args.path, base=args.base)
    arch = ck.architecture() or "unknown"
    dtypes = ", ".join(f"{k} ({v})" for k, v in sorted(ck.dtypes().items()))
    print(f"path:          {ck.path}")
    print(f"format:        {ck.format}")
    print(f"architecture:  {arch}")
    print(f"tensors:       {len(ck)}")
    print(f"parameters:    {ck.num_params:,}")
    print(f"data size:     {ck.data_bytes / 1e6:,.1f} MB")
    print(f"dtypes:        {dtypes}")
    if args.tensors:
        for name in ck.names():
            info = ck.info(name)
            print(f"  {name:60s} {str(list(info.shape)):24s} {info.dtype}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import build_demo_workspace
    from .executor import run_merge
    from .recipe import load_recipe

    ws = build_demo_workspace(Path(args.workspace) if args.workspace else None, progress=lambda m: print(m, file=sys.stderr))
    out = Path(args.output) if args.output else ws.root / "merged-ties"
    recipe = load_recipe(ws.recipe)
    on_event, close = _progress_bar(args.quiet)
    try:
        result = run_merge(recipe, out, overwrite=True, progress=on_event)
    finally:
        close()
    print(f"demo workspace: {ws.root}")
    print(f"recipe:         {ws.recipe}")
    print(f"merged model:   {result.output} ({result.seconds:.1f} s)")
    try:
        from .demo_models import evaluate, load_state

        scores = evaluate(load_state(result.output))
        shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float))
        print(f"accuracy:       {shown}")
    except (ImportError, AttributeError):
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alloy", description="Merge fine-tuned neural-network checkpoints.")
    parser.add_argument("--version", action="version", version=f"alloy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("merge", help="run a merge recipe (YAML, mergekit schema) and export the result")
    p.add_argument("recipe", type=Path, help="recipe file (YAML)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (written only when complete)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the recipe's device")
    p.add_argument("--out-dtype", help="dtype of the written floating-point tensors (default: the recipe's, else the base's)")
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--license", help="license to put in the model card (e.g. apache-2.0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    from .cli_push import add_push_options

    add_push_options(p)
    p.set_defaults(run=_cmd_merge)

    p = sub.add_parser("inspect", help="show a checkpoint's format, size, dtypes and architecture")
    p.add_argument("path", type=Path, help="checkpoint file or folder")
    p.add_argument("--base", type=Path, help="base model, needed to open a LoRA adapter")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("demo", help="build the demo workspace (small digit models) and merge it")
    p.add_argument("--workspace", help="where to build the demo models (default: the user cache)")
    p.add_argument("-o", "--output", help="output folder (default: WORKSPACE/merged-ties)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_demo)

    for module_name in _PLUGIN_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        command = getattr(args, "run", None) or args.func
        return int(command(args) or 0)
    except MergeCancelled as exc:
        print(f"alloy: {exc}", file=sys.stderr)
        return 130
    except AlloyError as exc:
        print(f"alloy: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alloy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
