"""`alloy push` and `alloy merge --push` against a local Hub server."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer, export_dir, export_template, hf_local, hub, token  # noqa: F401

from merging.cli_push import add_push_options, check_push_target, main, push_after_merge, register

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]


def files_match(server: HubServer, repo_id: str, folder: Path) -> bool:
    repo = server.repo(repo_id)
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    return all(repo.files[path].data == data for path, data in local.items()) and len(repo.files) == len(local) + 1


def test_push_command_with_HF_TOKEN(hub, token, export_dir, monkeypatch, capfd):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", token)

    status = main(["push", str(export_dir), "alice/merged", "--private", "-m", "first merge"])

    out, err = capfd.readouterr()
    assert status == 0, err
    assert hub.repo("alice/merged").private is True
    assert files_match(hub, "alice/merged", export_dir)
    assert hub.repo("alice/merged").commits[-1].summary == "first merge"
    assert f"to {hub.url}/alice/merged (created, private)" in out
    assert f"commit: {hub.url}/alice/merged/commit/{hub.repo('alice/merged').sha}" in out
    assert "pushing: 100%" in err
    assert token not in out and token not in err


def test_push_command_uses_the_saved_login(hub, token, export_dir, hf_local, monkeypatch, capfd):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    (hf_local / "token").write_text(token)  # what `hf auth login` leaves behind
    assert main(["push", str(export_dir), "merged"]) == 0
    assert hub.repo("alice/merged").private is False
    out, err = capfd.readouterr()
    assert "(created, public)" in out and token not in out + err


def test_token_from_env_ignores_the_saved_login(hub, token, export_dir, hf_local, monkeypatch, capfd):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    (hf_local / "token").write_text(token)
    status = main(["push", str(export_dir), "alice/merged", "--token-from-env"])
    out, err = capfd.readouterr()
    assert status == 1
    assert "--token-from-env was given but HF_TOKEN is not set" in err
    assert hub.requests == []
    assert token not in out + err

    monkeypatch.setenv("HF_TOKEN", token)
    assert main(["push", str(export_dir), "alice/merged", "--token-from-env"]) == 0


def test_push_command_without_any_token(hub, export_dir, monkeypatch, capfd):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert main(["push", str(export_dir), "alice/merged"]) == 1
    assert "log in with `hf auth login` or set HF_TOKEN" in capfd.readouterr().err
    assert hub.requests == []


@pytest.mark.parametrize(
    ("repo_id", "token_kind", "expected"),
    [
        ("alice/merged", "bad", "401"),
        ("other-lab/merged", "good", "403"),
        ("no-such-org/merged", "good", "404"),
    ],
)
def test_push_command_errors_are_one_line_without_the_token(hub, token, export_dir, monkeypatch, capfd, repo_id, token_kind, expected):
    used = token if token_kind == "good" else "hf_" + "q" * 34
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", used)
    assert main(["push", str(export_dir), repo_id]) == 1
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("alloy push: error:")]
    assert len(lines) == 1 and expected in lines[0]
    assert "Traceback" not in err
    assert used not in out and used not in err


def test_merge_push_option_and_helper(hub, token, export_dir, monkeypatch, capfd):
    """What `alloy merge ... --push REPO_ID` does after writing its output folder."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", token)
    merge = argparse.ArgumentParser(prog="alloy merge")
    merge.add_argument("recipe")
    merge.add_argument("--out")
    add_push_options(merge)
    args = merge.parse_args(["recipe.yaml", "--out", str(export_dir), "--push", "alice-lab/merged", "--private"])
    assert (args.push, args.private, args.token_from_env, args.commit_message) == ("alice-lab/merged", True, False, None)

    assert check_push_target(args.push, token_from_env=args.token_from_env) is None
    status = push_after_merge(Path(args.out), args.push, private=args.private, token_from_env=args.token_from_env)
    assert status == 0
    assert hub.repo("alice-lab/merged").private is True and files_match(hub, "alice-lab/merged", export_dir)
    out, err = capfd.readouterr()
    assert token not in out + err


def test_check_push_target_before_a_long_merge(hf_local, monkeypatch):
    assert "names a dataset" in check_push_target("datasets/alice/x")
    assert "hf auth login" in check_push_target("alice/x")  # no token anywhere, stdin not a terminal
    assert "HF_TOKEN is not set" in check_push_target("alice/x", token_from_env=True)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "e" * 34)
    assert check_push_target("alice/x") is None
    assert check_push_target("alice/x", token_from_env=True) is None


def test_register_adds_push_to_a_subparsers_object():
    parser = argparse.ArgumentParser(prog="alloy")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["push", "out", "alice/x", "--private", "--token-from-env"])
    assert (args.command, args.out_dir, args.repo_id, args.private, args.token_from_env) == ("push", Path("out"), "alice/x", True, True)
    assert callable(args.func)


def test_push_in_a_separate_process(hub, token, export_dir, hf_local):
    """The real process output (the client's own progress bars included) never shows the token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=token, HF_HOME=str(hf_local), HF_HUB_DISABLE_XET="1",
               PYTHONPATH=str(ROOT), TQDM_POSITION="-1")
    proc = subprocess.run(
        [sys.executable, "-m", "merging.cli_push", "push", str(export_dir), "alice/merged", "--private"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert files_match(hub, "alice/merged", export_dir)
    assert "pushed 6 files (11.1 MB)" in proc.stdout
    assert "safetensors: 100%" in proc.stderr  # the client printed its own per-byte bars
    assert token not in proc.stdout and token not in proc.stderr
