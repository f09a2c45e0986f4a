"""merging.hub against a local Hub server: the real huggingface_hub client over real HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from hub_server import BIG_SHARD, HubServer, export_dir, export_template, hf_local, hub, token  # noqa: F401

from merging.errors import AlloyError, MergeCancelled
from merging.hub import HubError, push_files, push_folder, resolve_token, save_token, validate_repo_id

# huggingface_hub streams LFS uploads with httpx's `data=` (its own choice, harmless).
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_repo_matches(server: HubServer, repo_id: str, folder: Path) -> None:
    repo = server.repo(repo_id)
    expected = local_files(folder)
    pushed = {path: stored.data for path, stored in repo.files.items() if path != ".gitattributes"}
    assert sorted(pushed) == sorted(expected)
    for path, data in expected.items():
        assert pushed[path] == data, f"{path} differs from the export"


def no_commit_since_creation(server: HubServer, repo_id: str) -> bool:
    return [c.summary for c in server.repo(repo_id).commits] == ["initial commit"]


# -- the happy paths ---------------------------------------------------------


def test_push_creates_public_repo_with_byte_identical_files(hub, token, export_dir):
    result = push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url, commit_message="Add TIES merge")

    assert_repo_matches(hub, "alice/merged", export_dir)
    repo = hub.repo("alice/merged")
    assert repo.private is False
    # Weights went through git-LFS (batch, PUT, verify); text files inline in the commit.
    assert repo.files[BIG_SHARD].lfs and repo.files["model-00002-of-00002.safetensors"].lfs
    assert not repo.files["README.md"].lfs and not repo.files["config.json"].lfs
    assert hub.count("PUT", r"^/lfs-upload/") == 2
    assert hub.count("POST", r"/info/lfs/objects/verify$") == 2
    assert hub.count("POST", r"^/api/validate-yaml$") == 1
    # One commit holds everything, with the message asked for.
    assert [c.summary for c in repo.commits] == ["initial commit", "Add TIES merge"]
    assert sorted(repo.commits[-1].paths) == sorted(local_files(export_dir))

    assert result.repo_id == "alice/merged"
    assert result.repo_url == f"{hub.url}/alice/merged"
    assert result.commit_oid == repo.sha
    assert result.commit_url == f"{hub.url}/alice/merged/commit/{repo.sha}"
    assert result.created is True and result.private is False
    assert result.files == tuple(sorted(local_files(export_dir)))
    assert result.total_bytes == sum(len(d) for d in local_files(export_dir).values())


def test_private_push_creates_private_repo(hub, token, export_dir):
    result = push_folder(export_dir, "alice/secret-merge", token=token, private=True, endpoint=hub.url)

    assert hub.repo("alice/secret-merge").private is True
    assert result.private is True
    create = hub.wait_for_request("POST", r"^/api/repos/create$")
    assert json.loads(create.body) == {"name": "secret-merge", "organization": "alice", "visibility": "private", "type": "model"}
    assert_repo_matches(hub, "alice/secret-merge", export_dir)
    # A private repo is invisible to anyone else.
    stranger = hub.add_token("bob")
    hub.users["bob"] = "Bob"
    with pytest.raises(HubError):
        push_folder(export_dir, "alice/secret-merge", token=stranger, endpoint=hub.url)


def test_bare_name_goes_to_the_token_owner(hub, token, export_dir):
    result = push_folder(export_dir, "merged", token=token, endpoint=hub.url)
    assert result.repo_id == "alice/merged"
    assert_repo_matches(hub, "alice/merged", export_dir)


def test_push_into_an_organisation(hub, token, export_dir):
    push_folder(export_dir, "alice-lab/merged", token=token, endpoint=hub.url)
    assert_repo_matches(hub, "alice-lab/merged", export_dir)


def test_endpoint_follows_HF_ENDPOINT(hub, token, export_dir, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = push_folder(export_dir, "alice/merged", token=token)
    assert result.repo_url.startswith(hub.url)
    assert_repo_matches(hub, "alice/merged", export_dir)


def test_progress_reports_bytes_per_file_on_the_calling_thread(hub, token, export_dir):
    calls: list[tuple[int, int, int]] = []
    push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url,
                progress=lambda done, total: calls.append((done, total, threading.get_ident())))

    sizes = {rel: size for rel, _, size in push_files(export_dir)}
    total = sum(sizes.values())
    assert {ident for _, _, ident in calls} == {threading.get_ident()}
    done = [d for d, _, _ in calls]
    assert all(t == total for _, t, _ in calls)
    assert done[0] == 0 and done[-1] == total
    assert done == sorted(done)
    # Each LFS file is reported as it finishes; the inline text files with the commit.
    lfs_sizes = [sizes["model-00002-of-00002.safetensors"], sizes[BIG_SHARD]]
    assert done[1] in lfs_sizes and done[2] == sum(lfs_sizes)


def test_second_push_after_a_failed_commit_does_not_resend_uploads(hub, token, export_dir):
    hub.fail("POST", r"/commit/main$", 500, {"error": "internal error"})
    with pytest.raises(HubError) as failed:
        push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url)
    assert "500" in str(failed.value) and failed.value.status == 500
    assert no_commit_since_creation(hub, "alice/merged")
    puts = hub.count("PUT", r"^/lfs-upload/")
    assert puts == 2

    result = push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url)
    assert hub.count("PUT", r"^/lfs-upload/") == puts  # the Hub already had both objects
    assert result.created is False
    assert_repo_matches(hub, "alice/merged", export_dir)


def test_pushing_unchanged_files_again_makes_no_commit(hub, token, export_dir):
    first = push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url)
    commits = len(hub.repo("alice/merged").commits)
    again = push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url)
    assert len(hub.repo("alice/merged").commits) == commits
    assert again.commit_oid == first.commit_oid


def test_existing_repo_is_updated_and_keeps_other_files(hub, token, export_dir):
    hub.add_repo("model", "alice/merged", files={"notes.txt": b"keep me"})
    (export_dir / "config.json").write_text('{"changed": true}')
    result = push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url)
    assert result.created is False
    repo = hub.repo("alice/merged")
    assert repo.files["notes.txt"].data == b"keep me"
    assert repo.files["config.json"].data == b'{"changed": true}'


def test_hidden_files_stay_local(hub, token, export_dir):
    (export_dir / ".cache").mkdir()
    (export_dir / ".cache" / "lock").write_text("x")
    (export_dir / ".DS_Store").write_text("x")
    push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url)
    assert not any(p.startswith(".cache") or p == ".DS_Store" for p in hub.repo("alice/merged").files)


# -- error paths -------------------------------------------------------------


def test_bad_token_is_401_with_login_advice(hub, export_dir):
    bad = "hf_" + "x" * 34
    with pytest.raises(HubError) as caught:
        push_folder(export_dir, "alice/merged", token=bad, endpoint=hub.url)
    message = str(caught.value)
    assert caught.value.status == 401
    assert "401" in message and "hf auth login" in message and "HF_TOKEN" in message
    assert bad not in message
    assert hub.repos == {}


def test_no_token_anywhere_fails_before_any_request(hub, export_dir):
    with pytest.raises(HubError, match="hf auth login.*HF_TOKEN"):
        push_folder(export_dir, "alice/merged", endpoint=hub.url)
    assert hub.requests == []


def test_namespace_without_write_access_is_403(hub, token, export_dir):
    with pytest.raises(HubError) as caught:
        push_folder(export_dir, "other-lab/merged", token=token, endpoint=hub.url)
    assert caught.value.status == 403
    assert "cannot create a model repo under 'other-lab'" in str(caught.value)
    assert hub.repos == {}


def test_read_only_token_is_refused(hub, export_dir):
    read_only = hub.add_token("alice", role="read")
    with pytest.raises(HubError, match="read-only"):
        push_folder(export_dir, "alice/merged", token=read_only, endpoint=hub.url)
    assert hub.repos == {}


def test_unknown_organisation_is_404(hub, token, export_dir):
    with pytest.raises(HubError) as caught:
        push_folder(export_dir, "no-such-org/merged", token=token, endpoint=hub.url)
    assert caught.value.status == 404
    assert "'no-such-org' is not a user or organisation" in str(caught.value)


def test_network_down_names_the_endpoint(hf_local, export_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"  # nothing listens there any more
    with pytest.raises(HubError) as caught:
        push_folder(export_dir, "alice/merged", token="hf_" + "y" * 34, endpoint=endpoint)
    assert f"cannot reach the Hub at {endpoint}" in str(caught.value)
    assert "HF_ENDPOINT" in str(caught.value)


def test_name_taken_by_a_dataset(hub, token, export_dir):
    hub.add_repo("dataset", "alice/merged")
    with pytest.raises(HubError, match="'alice/merged' already exists on .* as a dataset"):
        push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url)
    assert ("model", "alice/merged") not in hub.repos


def test_name_taken_by_a_space(hub, token, export_dir):
    hub.add_repo("space", "alice/merged")
    with pytest.raises(HubError, match="as a space"):
        push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url)


def test_existing_public_repo_is_not_used_for_a_private_push(hub, token, export_dir):
    hub.add_repo("model", "alice/merged", private=False)
    with pytest.raises(HubError, match="is public, but a private push"):
        push_folder(export_dir, "alice/merged", token=token, private=True, endpoint=hub.url)
    assert no_commit_since_creation(hub, "alice/merged")
    assert hub.count("POST", r"/preupload/") == 0


def test_losing_write_access_mid_push_is_403(hub, token, export_dir):
    hub.fail("POST", r"/commit/main$", 403, {"error": "You don't have write access"})
    with pytest.raises(HubError) as caught:
        push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url)
    assert caught.value.status == 403 and "no write access to 'alice/merged'" in str(caught.value)


def test_malformed_answer_is_reported(hub, token, export_dir):
    hub.fail("POST", r"/preupload/main$", 200, raw=b"<html>not json</html>")
    with pytest.raises(HubError, match="answer Alloy cannot use.*nothing was committed"):
        push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url)
    assert no_commit_since_creation(hub, "alice/merged")


def test_server_that_stops_answering_times_out(hub, token, export_dir):
    hub.hold("POST", r"/preupload/main$")
    start = time.monotonic()
    with pytest.raises(HubError, match="stopped answering while uploading README.md"):
        push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url, timeout=0.5)
    assert time.monotonic() - start < 10
    hub.release()
    _join_push_worker()
    assert no_commit_since_creation(hub, "alice/merged")


def test_invalid_card_front_matter_fails_before_any_request(hub, token, export_dir):
    (export_dir / "README.md").write_text("---\ntags: [merge\n---\n# x\n")
    with pytest.raises(HubError, match="README.md: the model card's front matter is not valid YAML"):
        push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url)
    assert hub.requests == []


@pytest.mark.parametrize("bad", ["", "   ", "datasets/alice/x", "spaces/alice/x", "a/b/c", "https://huggingface.co/alice/x",
                                 "alice/", "/x", "alice/x.git", "alice/a--b", "alice/-x", "alice/my model", "alice/" + "x" * 97])
def test_validate_repo_id_rejects(bad):
    assert isinstance(validate_repo_id(bad), str)


@pytest.mark.parametrize("good", ["alice/merged", "merged", "Alice-Lab/Llama-3.1_merge.v2", " alice/merged "])
def test_validate_repo_id_accepts(good):
    assert validate_repo_id(good) is None


def test_bad_repo_id_is_refused_before_any_request(hub, token, export_dir):
    with pytest.raises(HubError, match="names a dataset"):
        push_folder(export_dir, "datasets/alice/x", token=token, endpoint=hub.url)
    assert hub.requests == []


def test_missing_or_empty_folder(hub, token, tmp_path):
    with pytest.raises(HubError, match="not a folder"):
        push_folder(tmp_path / "nope", "alice/x", token=token, endpoint=hub.url)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HubError, match="no files to push"):
        push_folder(tmp_path / "empty", "alice/x", token=token, endpoint=hub.url)


# -- cancel ------------------------------------------------------------------


def _join_push_worker(timeout: float = 20.0) -> None:
    for thread in threading.enumerate():
        if thread.name == "alloy-hub-push":
            thread.join(timeout)
            assert not thread.is_alive()


def test_cancel_during_an_upload_returns_at_once_and_commits_nothing(hub, token, export_dir):
    hub.hold("PUT", r"^/lfs-upload/")
    cancel = threading.Event()
    outcome: dict = {}

    def push() -> None:
        try:
            push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url, cancel=cancel)
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    caller = threading.Thread(target=push)
    caller.start()
    hub.wait_for_request("PUT", r"^/lfs-upload/")  # the first shard is on the wire, held
    cancelled_at = time.monotonic()
    cancel.set()
    caller.join(10)
    assert isinstance(outcome["error"], MergeCancelled)
    assert "nothing was committed" in str(outcome["error"])
    assert outcome["at"] - cancelled_at < 2.0  # did not wait for the held upload

    hub.release()  # the transfer in flight completes in the background...
    _join_push_worker()
    assert no_commit_since_creation(hub, "alice/merged")  # ...and is never committed
    assert hub.count("PUT", r"^/lfs-upload/") == 1  # no further file was started


def test_cancel_before_start_sends_nothing(hub, token, export_dir):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(MergeCancelled):
        push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url, cancel=cancel)
    assert hub.requests == []


# -- the token ---------------------------------------------------------------


def test_resolve_token_order(hf_local, monkeypatch):
    assert resolve_token(None) is None
    (hf_local / "token").write_text("hf_saved_token_000000000000000000")
    assert resolve_token(None) == "hf_saved_token_000000000000000000"
    monkeypatch.setenv("HF_TOKEN", "hf_env_token_11111111111111111111")
    assert resolve_token(None) == "hf_env_token_11111111111111111111"
    assert resolve_token("  hf_typed_22222222222222222222  ") == "hf_typed_22222222222222222222"
    assert resolve_token("   ") == "hf_env_token_11111111111111111111"


def test_save_token_uses_huggingface_hub_store(hub, token, hf_local, monkeypatch):
    import huggingface_hub
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)  # where `login` validates
    save_token(token)
    assert (hf_local / "token").read_text().strip() == token
    assert huggingface_hub.get_token() == token
    assert resolve_token(None) == token
    assert hub.count("GET", r"^/api/whoami-v2$") == 1


def test_save_token_refuses_a_bad_token(hub, hf_local, monkeypatch):
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    bad = "hf_" + "z" * 34
    with pytest.raises(HubError) as caught:
        save_token(bad)
    assert caught.value.status == 401 and bad not in str(caught.value)
    assert not (hf_local / "token").exists()


def test_token_found_in_a_text_file_blocks_the_push(hub, token, export_dir):
    (export_dir / "alloy_recipe.yaml").write_text(f"method: ties\nnote: {token}\n")
    with pytest.raises(HubError, match="contains your access token") as caught:
        push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url)
    assert token not in str(caught.value)
    assert hub.requests == []


class _Collect:
    """A logging handler that keeps every formatted record (with tracebacks)."""

    def __init__(self):
        import logging

        self.lines: list[str] = []
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        outer = self

        class Handler(logging.Handler):
            def emit(self, record):
                outer.lines.append(formatter.format(record))

        self.handler = Handler(level=logging.DEBUG)


def test_token_never_reaches_logs_files_cards_or_errors(hub, token, export_dir, caplog, capfd, monkeypatch):
    """Every output path of a push, successful or failing, is free of the token."""
    import logging

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_DEBUG", True)  # the client logs every request as curl
    collect = _Collect()
    loggers = [logging.getLogger("huggingface_hub"), logging.getLogger("merging")]
    for lg in loggers:
        monkeypatch.setattr(lg, "level", logging.DEBUG)
        lg.addHandler(collect.handler)
    caplog.set_level(logging.DEBUG)
    rejected = lambda: hub.tokens.pop(token)  # noqa: E731 - the Hub no longer knows the token: 401
    scenarios = [
        (rejected, "alice/x", {}),
        (lambda: hub.tokens.update({token: ("alice", "write")}), "other-lab/x", {}),  # 403
        (None, "no-such-org/x", {}),  # 404
        (lambda: hub.add_repo("dataset", "alice/ds"), "alice/ds", {}),  # taken by a dataset
        (lambda: hub.fail("POST", r"/commit/main$", 500, {"error": f"echo {token}"}), "alice/five", {}),
        (lambda: hub.fail("POST", r"/preupload/main$", 200, raw=token.encode()), "alice/bad", {}),
        (lambda: hub.hold("POST", r"/preupload/main$"), "alice/hang", {"timeout": 0.3}),
        (None, "alice/x", {"endpoint": "http://127.0.0.1:9"}),  # nothing listens: network down
    ]
    errors: list[BaseException] = []
    try:
        push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url, progress=lambda d, t: None)
        for setup, repo_id, kwargs in scenarios:
            if setup is not None:
                setup()
            with pytest.raises(HubError) as caught:
                push_folder(export_dir, repo_id, token=token, **({"endpoint": hub.url} | kwargs))
            errors.append(caught.value)
        hub.release()
        _join_push_worker()
    finally:
        for lg in loggers:
            lg.removeHandler(collect.handler)

    assert len(errors) == 8
    assert any("echo ***" in str(e) for e in errors)  # a server echoing the token is scrubbed
    for error in errors:
        assert isinstance(error, AlloyError)
        assert token not in str(error) and token not in repr(error) and token not in repr(error.args)
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    log_text = "\n".join(collect.lines) + caplog.text
    assert "Request" in log_text and "<TOKEN>" in log_text  # the client did log its requests
    assert token not in log_text
    out, err = capfd.readouterr()
    assert token not in out and token not in err
    repo = hub.repo("alice/merged")
    for path in ("README.md", "alloy_recipe.yaml"):
        assert token.encode() not in repo.files[path].data
    for repo in hub.repos.values():
        for stored in repo.files.values():
            assert token.encode() not in stored.data
        assert all(token not in c.summary + c.description for c in repo.commits)
    assert all(token.encode() not in r.body for r in hub.requests)


def test_cancel_during_the_commit_reports_how_the_commit_ended(hub, token, export_dir):
    hub.hold("POST", r"/commit/main$")
    cancel = threading.Event()
    outcome: dict = {}

    def push() -> None:
        try:
            outcome["result"] = push_folder(export_dir, "alice/merged", token=token, endpoint=hub.url, cancel=cancel)
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    caller = threading.Thread(target=push)
    caller.start()
    hub.wait_for_request("POST", r"/commit/main$")
    cancel.set()  # too late: the commit is atomic and already on its way
    time.sleep(0.3)
    assert caller.is_alive()
    hub.release()
    caller.join(10)
    assert "error" not in outcome
    assert outcome["result"].commit_oid == hub.repo("alice/merged").sha
    assert_repo_matches(hub, "alice/merged", export_dir)
