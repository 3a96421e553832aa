"""Live configuration: read hestia_config.yml again when it changes (a watch on its folder), on
SIGHUP and on `POST /v1/config/reload`, and hand a valid new version to the gateway.

A reload reads the whole file and validates it before anything changes. An invalid file, an
empty one, or one still being written (its content changes while it is read) leaves the running
configuration as it is; the error (file, key paths, reasons) is logged and kept for
`GET /v1/config` until a valid version is loaded.

The folder is watched, not the file: an editor that saves by writing a new file and renaming it
over the old one (vim, many IDEs) replaces the inode, and a watch on the old inode (or a bind
mount of the single file) would never see the edit. Every change in the folder leads to a read;
a version whose hash is the one running is not applied again.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from hestia.config import HestiaConfig, parse_config_text, read_config_text
from hestia.errors import ConfigError

# A file is read again after this long; a different content means a save still under way.
SETTLE_S = 0.15
# Reads of a file that keeps changing, before the reload gives up (the next change retries).
MAX_SETTLE_TRIES = 20


def config_problems(err: ConfigError) -> list[dict[str, str]]:
    """What is wrong, as [{"path": key path, "reason": ...}] (from the error's detail when the
    validation gave one, else from its message: "invalid config in FILE: path: reason")."""
    given = err.detail.get("errors") if err.detail else None
    if isinstance(given, list) and given:
        return [dict(p) for p in given]
    message = err.message
    rest = message.split(": ", 1)[1] if message.startswith("invalid config in ") else message
    path, sep, reason = rest.partition(": ")
    if not sep or " " in path:
        return [{"path": "(file)", "reason": rest}]
    return [{"path": path, "reason": reason}]


@dataclass
class ReloadOutcome:
    result: str  # "applied", "unchanged" or "invalid"
    cause: str
    at: float
    hash: str | None
    error: dict[str, Any] | None = None
    changes: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "cause": self.cause,
            "at": self.at,
            "hash": self.hash,
            "error": self.error,
            "changes": self.changes,
        }


Apply = Callable[[HestiaConfig], dict[str, list[str]]]


class ConfigReloader:
    """The running config's file, hash and load time, the last reload's outcome, and the
    watch. `apply(new)` changes the gateway (and says what changed); it raises ConfigError
    when the new version cannot be applied (e.g. a backend that is not running)."""

    def __init__(
        self,
        path: str | Path | None,
        config: HestiaConfig,
        apply: Apply,
        on_outcome: Callable[[ReloadOutcome], None] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self._on_outcome = on_outcome
        self.config = config
        self._apply = apply
        # set by the data-plane workers' controller: held around applying a valid version, so
        # that every worker hands all requests to this process before anything changes
        self.hold: Callable[[], AbstractAsyncContextManager[None]] | None = None
        self.hash: str | None = None
        self.loaded_at = time.time()
        self.error: dict[str, Any] | None = None
        self.last: ReloadOutcome | None = None
        self.watching = False
        self.restart_required: list[str] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        if self.path is not None and self.path.is_file():
            try:
                self.hash = _digest(read_config_text(self.path))
            except ConfigError:
                self.hash = None

    # ---------------------------------------------------------------- reloads
    async def reload(self, cause: str) -> ReloadOutcome:
        """Read, validate and (when valid and different) apply the file. One at a time."""
        async with self._lock:
            outcome = await self._reload(cause)
        self.last = outcome
        if self._on_outcome is not None and outcome.result != "unchanged":
            self._on_outcome(outcome)
        return outcome

    async def _reload(self, cause: str) -> ReloadOutcome:
        now = time.time()
        if self.path is None:
            return self._invalid(
                cause,
                None,
                ConfigError(
                    "Hestia was started without a config file (labels only): there is nothing "
                    "to reload; start it with --config PATH or HESTIA_CONFIG"
                ),
            )
        try:
            text = await self._read_settled()
        except ConfigError as exc:
            return self._invalid(cause, None, exc)
        digest = _digest(text)
        if digest == self.hash:
            self.error = None  # back to the running version: nothing is wrong any more
            return ReloadOutcome("unchanged", cause, now, digest)
        if not text.strip() or _only_comments(text):
            return self._invalid(
                cause,
                digest,
                ConfigError(
                    f"invalid config in {self.path}: the file is empty (a save still under "
                    "way?); the running configuration stays. To run on labels alone, leave "
                    "`services: {}` in it"
                ),
            )
        try:
            new = await asyncio.to_thread(parse_config_text, text, str(self.path))
            if self.hold is None:
                changes = self._apply(new)
            else:  # data-plane workers route nothing on their own until it is applied
                async with self.hold():
                    changes = self._apply(new)
        except ConfigError as exc:
            return self._invalid(cause, digest, exc)
        self.config = new
        self.hash = digest
        self.loaded_at = now
        self.error = None
        self.restart_required = changes.get("restart_required", [])
        described = ", ".join(f"{k}: {', '.join(v)}" for k, v in changes.items() if v)
        logger.info(
            "config {} reloaded ({}, hash {}): {}",
            self.path,
            cause,
            digest[:12],
            described or "no service changed",
        )
        if self.restart_required:
            logger.warning(
                "config {}: {} changed; these take effect at the next restart of Hestia",
                self.path,
                ", ".join(self.restart_required),
            )
        return ReloadOutcome("applied", cause, now, digest, changes=changes)

    def _invalid(self, cause: str, digest: str | None, exc: ConfigError) -> ReloadOutcome:
        now = time.time()
        again = self.error is not None and self.error["message"] == exc.message
        self.error = {
            "file": str(self.path) if self.path is not None else None,
            "message": exc.message,
            "errors": config_problems(exc),
            "at": now,
            "hash": digest,
        }
        if not again or cause != "file changed":
            logger.error(
                "config reload ({}) refused, the running configuration stays: {}",
                cause,
                exc.message,
            )
        return ReloadOutcome("invalid", cause, now, digest, error=self.error)

    async def _read_settled(self) -> str:
        """The file's text once two reads SETTLE_S apart agree (an editor that writes in
        two steps is not caught in the middle)."""
        assert self.path is not None
        path = self.path
        if not path.exists():
            raise ConfigError(
                f"config file {path} does not exist (removed, or in the middle of a save); the "
                "running configuration stays"
            )
        text = await asyncio.to_thread(read_config_text, path)
        for _ in range(MAX_SETTLE_TRIES):
            await asyncio.sleep(SETTLE_S)
            again = await asyncio.to_thread(read_config_text, path)
            if again == text:
                return text
            text = again
        raise ConfigError(
            f"config file {path} kept changing for {MAX_SETTLE_TRIES * SETTLE_S:g}s; the "
            "running configuration stays until it settles"
        )

    # ---------------------------------------------------------------- the watch
    def start_watching(self) -> None:
        if self.path is None or self._task is not None:
            return
        folder = self.path.parent.resolve()
        if not folder.is_dir():
            logger.warning("config folder {} does not exist: not watching it", folder)
            return
        self._task = asyncio.create_task(self._watch(folder), name="hestia-config-watch")

    async def _watch(self, folder: Path) -> None:
        import logging

        from watchfiles import awatch

        logging.getLogger("watchfiles").setLevel(logging.WARNING)  # "1 change detected"
        try:
            # the file itself (edited in place, or renamed over), or the `..data` symlink a
            # Kubernetes ConfigMap swaps; an unchanged hash is not applied again
            async for changes in awatch(
                folder,
                watch_filter=self._concerns_us,
                recursive=False,  # the folder may be a whole project (docker-compose.yml's)
                stop_event=self._stop,
                debounce=400,
                step=100,
                rust_timeout=1000,
                yield_on_timeout=True,  # the first (empty) yield: the watch is in place
            ):
                if not self.watching:
                    self.watching = True
                    logger.info("watching {} for changes of the config file", folder)
                if not changes:
                    continue
                try:
                    await self.reload("file changed")
                except Exception:
                    logger.exception("config reload after a file change failed")
        except Exception:
            logger.exception("watching {} failed; reload with SIGHUP or the API", folder)
        finally:
            self.watching = False

    def _concerns_us(self, _change: Any, path: str) -> bool:
        assert self.path is not None
        name = Path(path).name
        return name == self.path.name or name.startswith("..")

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            self._task = None

    def describe(self) -> dict[str, Any]:
        return {
            "file": str(self.path) if self.path is not None else None,
            "hash": self.hash,
            "loaded_at": self.loaded_at,
            "watching": self.watching,
            "error": self.error,
            "last_reload": self.last.to_dict() if self.last is not None else None,
            "restart_required": self.restart_required,
        }


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _only_comments(text: str) -> bool:
    return all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())
