"""Push an exported model folder to the Hugging Face Hub.

The folder is pushed as it is: the model card (README.md with its front
matter) and alloy_recipe.yaml written at export are the ones that land on the
Hub. All HTTP goes through `huggingface_hub`, so the endpoint follows
`HF_ENDPOINT` and the token comes from the places every Hub tool reads.

The push is one commit. Large files are uploaded one by one before it
(`HfApi.preupload_lfs_files`), which gives a progress report per file, a
Cancel point between files, and resumption: an object the Hub already holds
is not sent again, so pushing again after a failure only sends what is
missing. Nothing is visible in the repo until the final commit succeeds.

The client runs in a daemon worker thread watched by the calling thread: a
server that stops answering cannot hang the caller (the client itself has no
timeout), and Cancel returns at once.

The access token is never logged, never written anywhere but
huggingface_hub's own token store (on request), and scrubbed from every
error message.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token, hf_api
from huggingface_hub import login as _hf_login
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import HFValidationError
from huggingface_hub.utils import validate_repo_id as _hf_validate_repo_id

from . import __version__
from .errors import AlloyError, MergeCancelled

try:  # the HTTP stack huggingface_hub uses: httpx2 in 2.x, httpx in 1.x
    from httpx2 import TransportError as _TransportError
except ImportError:  # pragma: no cover - depends on the installed client
    try:
        from httpx import TransportError as _TransportError
    except ImportError:
        _TransportError = OSError  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

#: Seconds any single step (one request, one file) may take before the push
#: is declared stuck, on top of the time its bytes need at MIN_UPLOAD_RATE.
STEP_TIMEOUT_S = 120.0
#: Slowest upload rate (bytes/s) a file is given time for before it counts as stuck.
MIN_UPLOAD_RATE = 256 * 1024
#: Text files larger than this are not scanned for a leaked token before upload.
_TOKEN_SCAN_MAX_BYTES = 8 * 1024 * 1024
_TEXT_SUFFIXES = {".md", ".yaml", ".yml", ".json", ".txt", ".cfg", ".ini", ".toml"}
_REPO_TYPE_PREFIXES = {"datasets": "dataset", "spaces": "space", "models": "model"}


class HubError(AlloyError):
    """Pushing to the Hub failed; the message says why and what to do.

    `status` is the HTTP status the Hub answered, when there was one.
    """

    def __init__(self, message: str, *, status: int | None = None):
        self.status = status
        super().__init__(message)


class CancelToken(Protocol):
    """Anything with `is_set()`, such as `threading.Event`."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class PushResult:
    """Where the pushed model lives and which commit holds it."""

    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str
    private: bool | None
    created: bool
    files: tuple[str, ...]
    total_bytes: int


# -- token -----------------------------------------------------------------


def resolve_token(explicit: str | None = None) -> str | None:
    """The token to push with: `explicit` (typed in the app), else `HF_TOKEN`,
    else the token saved by `hf auth login` — huggingface_hub's own lookup."""
    if explicit is not None and explicit.strip():
        return explicit.strip()
    return get_token()


def env_token() -> str | None:
    """The token from the environment only (`HF_TOKEN`), ignoring any saved login."""
    value = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return value.strip() if value and value.strip() else None


def save_token(token: str) -> None:
    """Validate `token` against the Hub and store it where `hf auth login` does.

    Uses huggingface_hub's `login`, so it follows `HF_ENDPOINT` as set when
    huggingface_hub was imported.
    """
    token = token.strip()
    if not token:
        raise HubError("the access token is empty")
    try:
        _hf_login(token=token, add_to_git_credential=False)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear message
        status = _http_status(exc)
        if status == 401:
            error = HubError(
                "the Hub rejected this access token (401 Unauthorized); it was not saved. "
                "Create a token with write access on the Hub's settings page.",
                status=401,
            )
        elif _find_cause(exc, (_TransportError, ConnectionError)) is not None:
            error = HubError(f"cannot reach the Hub at {hf_api.api.endpoint} to check the token; it was not saved")
        else:
            error = HubError(f"the token could not be saved: {_scrub(str(exc), token)}", status=status)
        raise error from None


def scrub(text: str, token: str | None) -> str:
    """`text` with every occurrence of `token` replaced by '***'."""
    return _scrub(text, token)


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return text


# -- repo id ---------------------------------------------------------------


def validate_repo_id(text: str) -> str | None:
    """Why `text` is not a usable model repo id ('name' or 'namespace/name'), or None."""
    value = (text or "").strip()
    if not value:
        return "enter a repo id such as 'your-name/merged-model'"
    if "://" in value or value.startswith(("huggingface.co/", "hf.co/")):
        return "enter the repo id ('namespace/name'), not a web address"
    parts = value.split("/")
    if len(parts) > 2:
        if parts[0] in _REPO_TYPE_PREFIXES and parts[0] != "models":
            return f"Alloy pushes model repos; '{value}' names a {_REPO_TYPE_PREFIXES[parts[0]]}"
        return f"'{value}' has too many '/': use 'namespace/name'"
    if any(not part for part in parts):
        return f"'{value}' has an empty namespace or name: use 'namespace/name'"
    if any(char.isspace() for char in value):
        return f"'{value}' contains spaces; use letters, digits, '-', '_' or '.'"
    name = parts[-1]
    if name.endswith(".git"):
        return f"'{value}': a repo name cannot end in '.git'"
    if "--" in value or ".." in value:
        return f"'{value}': '--' and '..' are not allowed in a repo id"
    try:
        _hf_validate_repo_id(value)
    except HFValidationError:
        return (
            f"'{value}' is not a valid repo id: use letters, digits, '-', '_' or '.', "
            "not starting or ending with '-' or '.', at most 96 characters"
        )
    return None


# -- what gets pushed --------------------------------------------------------


def push_files(folder: str | Path) -> list[tuple[str, Path, int]]:
    """(path in repo, local path, size) of every file the push sends, sorted.

    Hidden files and folders (.git, .cache) stay local, as with `hf upload`.
    """
    root = Path(folder)
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        found.append((rel.as_posix(), path, path.stat().st_size))
    return found


def _check_folder(folder: Path, files: list[tuple[str, Path, int]], token: str) -> None:
    """Refuse before any upload what the Hub would refuse after it, and leaked tokens."""
    if not files:
        raise HubError(f"{folder}: there are no files to push")
    for rel, path, size in files:
        if path.suffix.lower() in _TEXT_SUFFIXES and size <= _TOKEN_SCAN_MAX_BYTES:
            if token.encode() in path.read_bytes():
                raise HubError(f"{path} contains your access token; remove it before pushing")
        if rel == "README.md":
            try:
                metadata_load(path)
            except Exception as exc:  # noqa: BLE001 - yaml raises several types
                raise HubError(f"{path}: the model card's front matter is not valid YAML ({exc})") from None


# -- the push --------------------------------------------------------------


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: CancelToken | None = None,
    timeout: float = STEP_TIMEOUT_S,
) -> PushResult:
    """Push every file of `folder` to the model repo `repo_id` in one commit.

    Creates the repo when missing (private when asked; an existing public repo
    is refused when `private` is set). `token` is resolved with
    `resolve_token`; `endpoint` defaults to `HF_ENDPOINT`. `progress(done,
    total)` gets bytes of files finished (per file, not per byte) and is called
    on the calling thread. `cancel.is_set()` (or Ctrl-C) stops the push before
    its commit; `timeout` bounds each step (plus transfer time at
    MIN_UPLOAD_RATE).

    Raises HubError (message free of the token) or MergeCancelled.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder}: not a folder; export the model first")
    problem = validate_repo_id(repo_id)
    if problem is not None:
        raise HubError(problem)
    token = resolve_token(token)
    if token is None:
        raise HubError("no Hugging Face access token: log in with `hf auth login` or set HF_TOKEN")
    files = push_files(folder)
    _check_folder(folder, files, token)
    if cancel is not None and cancel.is_set():
        raise MergeCancelled("push cancelled; nothing was sent to the Hub")

    job = _PushJob(
        folder=folder,
        repo_id=repo_id.strip(),
        token=token,
        private=private,
        commit_message=commit_message or f"Upload {folder.name} with Alloy",
        endpoint=_endpoint(endpoint),
        files=files,
    )
    return job.run(progress=progress, cancel=cancel, timeout=timeout)


def _endpoint(explicit: str | None) -> str:
    return (explicit or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


class _Stopped(Exception):
    """The caller cancelled or gave up; the worker leaves without committing."""


class _PushJob:
    """One push: the client calls run in a worker; `run` watches it."""

    def __init__(self, *, folder, repo_id, token, private, commit_message, endpoint, files):
        self.folder: Path = folder
        self.repo_id: str = repo_id
        self.token: str = token
        self.private: bool = private
        self.commit_message: str = commit_message
        self.endpoint: str = endpoint
        self.files: list[tuple[str, Path, int]] = files
        self.total = sum(size for _, _, size in files)
        self.api = HfApi(endpoint=endpoint, token=token, library_name="alloy", library_version=__version__)
        self.events: queue.Queue = queue.Queue()
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.stop = False
        self.committing = False
        self.step = "starting"
        self.result: PushResult | None = None
        self.error: BaseException | None = None

    # -- the watching side (caller's thread) --------------------------------
    def run(self, *, progress, cancel, timeout: float) -> PushResult:
        worker = threading.Thread(target=self._work, name="alloy-hub-push", daemon=True)
        deadline = time.monotonic() + timeout
        step = "starting"
        worker.start()
        try:
            while True:
                try:
                    kind, *payload = self.events.get(timeout=0.05)
                except queue.Empty:
                    pass
                else:
                    if kind == "step":
                        step, allowance = payload
                        deadline = time.monotonic() + timeout + allowance
                    elif kind == "progress" and progress is not None:
                        progress(*payload)
                    continue
                if self.done.is_set():
                    break
                if cancel is not None and cancel.is_set():
                    return self._cancelled(timeout)
                if time.monotonic() > deadline:
                    return self._stuck(step, timeout)
        except KeyboardInterrupt:
            return self._cancelled(timeout)  # Ctrl-C in a terminal is a Cancel
        except BaseException:
            self._request_stop()  # a raising progress callback
            raise
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        assert self.result is not None
        return self.result

    def _request_stop(self) -> bool:
        """Ask the worker to leave before committing; True when it already commits."""
        with self.lock:
            self.stop = True
            return self.committing

    def _cancelled(self, timeout: float) -> PushResult:
        if self._request_stop():
            # The commit is in flight: it is atomic, so report how it ended.
            self.done.wait(timeout)
            if self.result is not None:
                return self.result
            if self.error is not None:
                raise self.error
            raise HubError(
                f"cancelled while the Hub at {self.endpoint} was committing to '{self.repo_id}'; "
                "the commit may or may not have been made: check the repo page"
            )
        raise MergeCancelled(
            f"push to '{self.repo_id}' cancelled; nothing was committed "
            "(files already uploaded are reused by the next push)"
        )

    def _stuck(self, step: str, timeout: float) -> PushResult:
        committing = self._request_stop()
        outcome = (
            "the commit may or may not have been made: check the repo page"
            if committing
            else "nothing was committed; push again to resume"
        )
        raise HubError(
            f"the Hub at {self.endpoint} stopped answering while {step} "
            f"(no progress for more than {timeout:g} s); {outcome}"
        )

    # -- the working side (daemon thread) ------------------------------------
    def _work(self) -> None:
        try:
            self.result = self._push()
        except _Stopped:
            log.info("push to %s stopped before its commit", self.repo_id)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self.error = self._map_error(exc)
        finally:
            self.done.set()

    def _set_step(self, step: str, nbytes: int = 0, *, check_stop: bool = True) -> None:
        if check_stop:
            with self.lock:
                if self.stop:
                    raise _Stopped
        self.step = step
        log.debug("hub push: %s", step)
        self.events.put(("step", step, nbytes / MIN_UPLOAD_RATE))

    def _push(self) -> PushResult:
        self._set_step(f"checking the access token with {self.endpoint}")
        user = self._whoami()
        if "/" not in self.repo_id:
            self.repo_id = f"{user}/{self.repo_id}"
        self._set_step(f"creating the repo '{self.repo_id}'")
        repo_url, created, is_private = self._ensure_repo()

        done = 0
        self.events.put(("progress", 0, self.total))
        operations: list[CommitOperationAdd] = []
        inline_bytes = 0
        for rel, path, size in self.files:
            self._set_step(f"uploading {rel}", size)
            operation = CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path))
            self.api.preupload_lfs_files(self.repo_id, additions=[operation], repo_type="model", free_memory=False)
            operations.append(operation)
            # Small text files travel inside the commit itself; count them there.
            if getattr(operation, "_upload_mode", "lfs") == "regular":
                inline_bytes += size
            else:
                done += size
                self.events.put(("progress", done, self.total))

        with self.lock:
            if self.stop:
                raise _Stopped
            self.committing = True
        self._set_step(f"committing to '{self.repo_id}'", inline_bytes, check_stop=False)
        info = self.api.create_commit(
            self.repo_id, operations=operations, commit_message=self.commit_message, repo_type="model"
        )
        self.events.put(("progress", self.total, self.total))
        log.info("pushed %d files to %s", len(operations), self.repo_id)
        return PushResult(
            repo_id=self.repo_id,
            repo_url=str(repo_url),
            commit_url=str(info.commit_url),
            commit_oid=str(info.oid),
            private=is_private,
            created=created,
            files=tuple(rel for rel, _, _ in self.files),
            total_bytes=self.total,
        )

    def _whoami(self) -> str:
        info = self.api.whoami()
        access = (info.get("auth") or {}).get("accessToken") or {}
        if access.get("role") == "read":
            raise HubError(
                f"the access token is read-only; create one with write access at {self.endpoint}/settings/tokens",
                status=403,
            )
        return str(info["name"])

    def _ensure_repo(self) -> tuple[str, bool, bool | None]:
        """Create the model repo, or accept an existing one that fits."""
        try:
            url = self.api.create_repo(self.repo_id, private=self.private, repo_type="model", exist_ok=False)
            return str(url), True, self.private
        except HfHubHTTPError as exc:
            status = _http_status(exc)
            if status not in (403, 409):
                raise
            # The repo may already exist: 409, or 403 for a collaborator who cannot create.
            existing = self._model_info()
            if existing is None:
                if status == 409:
                    other = self._other_type()
                    if other is not None:
                        raise HubError(
                            f"'{self.repo_id}' already exists on {self.endpoint} as a {other}; "
                            "Alloy pushes models: choose another name",
                            status=409,
                        ) from None
                raise
        if self.private and existing.private is False:
            raise HubError(
                f"'{self.repo_id}' already exists on {self.endpoint} and is public, but a private push "
                "was asked for: make the repo private on the Hub or choose another name",
                status=409,
            )
        return f"{self.endpoint}/{self.repo_id}", False, existing.private

    def _model_info(self):
        try:
            return self.api.model_info(self.repo_id)
        except RepositoryNotFoundError:
            return None

    def _other_type(self) -> str | None:
        for repo_type in ("dataset", "space"):
            if self.api.repo_exists(self.repo_id, repo_type=repo_type):
                return repo_type
        return None

    # -- errors ------------------------------------------------------------
    def _map_error(self, exc: BaseException) -> HubError:
        error = self._describe(exc)
        # A fresh exception without __cause__/__context__: a traceback must not
        # carry the client's internals, and the text is scrubbed of the token.
        mapped = HubError(_scrub(str(error), self.token), status=getattr(error, "status", None))
        mapped.__suppress_context__ = True
        return mapped

    def _describe(self, exc: BaseException) -> HubError:
        if isinstance(exc, HubError):
            return exc
        before_commit = not self.committing
        aftermath = (
            "nothing was committed; push again to resume (uploaded files are not sent twice)"
            if before_commit
            else "the commit was not made"
        )
        status = _http_status(exc)
        if status is not None:
            return HubError(self._http_message(status, exc, aftermath), status=status)
        reason = _find_cause(exc, (_TransportError, ConnectionError))
        if reason is not None:
            return HubError(
                f"cannot reach the Hub at {self.endpoint} while {self.step} ({_short(reason)}): "
                f"check the network connection or HF_ENDPOINT; {aftermath}"
            )
        os_error = _find_cause(exc, (OSError,))
        if os_error is not None:
            where = getattr(os_error, "filename", None) or self.folder
            return HubError(f"{where}: cannot read the file to push ({_short(os_error)})")
        if isinstance(exc, ValueError):
            return HubError(
                f"the Hub at {self.endpoint} sent an answer Alloy cannot use while {self.step} ({_short(exc)}); "
                f"{aftermath}"
            )
        return HubError(f"push to '{self.repo_id}' failed while {self.step}: {_short(exc)}; {aftermath}")

    def _http_message(self, status: int, exc: BaseException, aftermath: str) -> str:
        namespace = self.repo_id.split("/")[0] if "/" in self.repo_id else "your account"
        http = _find_cause(exc, (HfHubHTTPError,))
        server = getattr(http, "server_message", None) or ""
        server = f" (the Hub says: {_short_text(server)})" if server.strip() else ""
        creating = self.step.startswith("creating")
        if status == 401:
            return (
                f"the Hub at {self.endpoint} rejected the access token (401 Unauthorized){server}: "
                "log in with `hf auth login` or set HF_TOKEN to a token with write access"
            )
        if status == 403:
            if creating:
                return (
                    f"your token cannot create a model repo under '{namespace}' on {self.endpoint} "
                    f"(403 Forbidden){server}: check that you belong to '{namespace}' with write access "
                    "and that the token has write permission"
                )
            return f"your token has no write access to '{self.repo_id}' (403 Forbidden){server}; {aftermath}"
        if status == 404:
            if creating:
                return (
                    f"'{namespace}' is not a user or organisation on {self.endpoint} (404 Not Found){server}: "
                    f"check the namespace in '{self.repo_id}'"
                )
            return f"'{self.repo_id}' was not found on {self.endpoint} while {self.step} (404){server}; {aftermath}"
        if status == 409:
            return f"'{self.repo_id}' conflicts with an existing repo on {self.endpoint} (409 Conflict){server}"
        if status == 413:
            return f"the Hub at {self.endpoint} refused {self.step}: too large (413){server}; {aftermath}"
        if status == 429:
            return f"the Hub at {self.endpoint} is rate-limiting requests (429){server}: wait and push again"
        if status >= 500:
            return f"the Hub at {self.endpoint} failed while {self.step} ({status}){server}; {aftermath}"
        return f"the Hub at {self.endpoint} refused {self.step} ({status}){server}; {aftermath}"


# -- helpers ---------------------------------------------------------------


def _find_cause(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of `types` in `exc`'s cause/context chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _http_status(exc: BaseException) -> int | None:
    http = _find_cause(exc, (HfHubHTTPError,))
    response: Any = getattr(http, "response", None)
    status = getattr(response, "status_code", None)
    return int(status) if isinstance(status, int) else None


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return _short_text(text)


def _short_text(text: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
