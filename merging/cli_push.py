"""`alloy push OUT_DIR REPO_ID` and the `--push REPO_ID` option of `alloy merge`.

The token is never taken on the command line (it would land in the shell
history and the process list): it comes from HF_TOKEN, the login saved by
`hf auth login`, or a hidden prompt when the terminal is interactive.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import TextIO

from .errors import AlloyError, MergeCancelled

_NO_TOKEN = "no Hugging Face access token: log in with `hf auth login` or set HF_TOKEN"
_NO_ENV_TOKEN = "--token-from-env was given but HF_TOKEN is not set"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `push` command to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "push",
        help="push an exported model folder to the Hugging Face Hub",
        description=(
            "Push an exported model folder (weights, config, model card, recipe) to a model repo on the "
            "Hugging Face Hub in one commit, creating the repo if it is missing. The endpoint follows "
            "HF_ENDPOINT; the token comes from HF_TOKEN or `hf auth login`."
        ),
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the exported folder")
    parser.add_argument("repo_id", metavar="REPO_ID", help="'namespace/name' or 'name' (your own namespace)")
    _add_common_options(parser, short_message=True)
    parser.set_defaults(func=run)
    return parser


def add_push_options(parser: argparse.ArgumentParser) -> None:
    """Add `--push REPO_ID`, `--private`, `--token-from-env`, `--commit-message` to `alloy merge`."""
    parser.add_argument("--push", metavar="REPO_ID", default=None, help="push the output folder to this Hub model repo")
    _add_common_options(parser, short_message=False)


def _add_common_options(parser: argparse.ArgumentParser, *, short_message: bool) -> None:
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument(
        "--token-from-env",
        action="store_true",
        help="use only the token in HF_TOKEN (ignore a saved `hf auth login`)",
    )
    flags = ("--commit-message", "-m") if short_message else ("--commit-message",)
    parser.add_argument(*flags, default=None, metavar="TEXT", help="commit message")


def run(args: argparse.Namespace) -> int:
    """Run `alloy push`; returns the exit status."""
    return push_after_merge(
        args.out_dir,
        args.repo_id,
        private=args.private,
        token_from_env=args.token_from_env,
        commit_message=args.commit_message,
    )


def check_push_target(repo_id: str, *, token_from_env: bool = False) -> str | None:
    """Why a push to `repo_id` cannot start (bad id, no token), or None.

    Offline and instant: `alloy merge --push` calls it before a long merge.
    """
    from .hub import env_token, resolve_token, validate_repo_id

    problem = validate_repo_id(repo_id)
    if problem is not None:
        return problem
    token = env_token() if token_from_env else resolve_token(None)
    if token is None:
        if token_from_env:
            return _NO_ENV_TOKEN
        if not _interactive():
            return _NO_TOKEN
    return None


def push_after_merge(
    out_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token_from_env: bool = False,
    commit_message: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Push `out_dir` to `repo_id`, printing progress and the result; returns the exit status.

    0 pushed, 1 failed (the message is on stderr, without the token), 130 cancelled.
    """
    from .hub import env_token, push_folder, resolve_token

    out = out or sys.stdout
    err = err or sys.stderr
    token = env_token() if token_from_env else resolve_token(None)
    if token is None:
        if token_from_env:
            return _fail(err, _NO_ENV_TOKEN)
        if not _interactive():
            return _fail(err, _NO_TOKEN)
        token = getpass.getpass("Hugging Face access token (input hidden): ").strip() or None
        if token is None:
            return _fail(err, _NO_TOKEN)

    last_percent = [-1]

    def report(done: int, total: int) -> None:
        percent = 100 if total == 0 else int(100 * done / total)
        if percent != last_percent[0]:
            last_percent[0] = percent
            print(f"pushing: {percent:3d}% ({_size(done)} of {_size(total)})", file=err, flush=True)

    try:
        result = push_folder(
            Path(out_dir),
            repo_id,
            token=token,
            private=private,
            commit_message=commit_message,
            progress=report,
        )
    except MergeCancelled as exc:
        return _fail(err, str(exc), status=130)
    except AlloyError as exc:
        return _fail(err, str(exc))
    visibility = "private" if result.private else "public"
    verb = "created" if result.created else "updated"
    print(
        f"pushed {len(result.files)} files ({_size(result.total_bytes)}) to {result.repo_url} ({verb}, {visibility})",
        file=out,
    )
    print(f"commit: {result.commit_url}", file=out, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m merging.cli_push OUT_DIR REPO_ID ...`: the push command on its own."""
    parser = argparse.ArgumentParser(prog="alloy")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _interactive() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except ValueError:  # closed stdin
        return False


def _fail(err: TextIO, message: str, *, status: int = 1) -> int:
    print(f"alloy push: error: {message}", file=err, flush=True)
    return status


def _size(nbytes: int) -> str:
    if nbytes < 1000:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            break
    return f"{value:.1f} {unit}"


if __name__ == "__main__":
    sys.exit(main())
