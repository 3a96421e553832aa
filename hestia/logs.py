"""Logging: loguru for Hestia, with the standard library's loggers (uvicorn, docker) routed
through the same sink. JSON lines by default (one object a line), or text for terminals."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from loguru import logger


def _json_sink(message: Any) -> None:
    record = message.record
    line: dict[str, Any] = {
        "ts": record["time"].isoformat(),
        "level": record["level"].name.lower(),
        "msg": record["message"],
        "logger": record["name"],
    }
    line.update({k: v for k, v in record["extra"].items() if k not in line})
    if record["exception"] is not None:
        line["exception"] = "".join(
            __import__("traceback").format_exception(*record["exception"])
        ).rstrip()
    sys.stdout.write(json.dumps(line, default=str) + "\n")
    sys.stdout.flush()


class _InterceptHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def setup_logging(fmt: str = "json", level: str = "INFO") -> None:
    logger.remove()
    if fmt == "json":
        logger.add(_json_sink, level=level.upper())
    else:
        logger.add(
            sys.stderr,
            level=level.upper(),
            format="<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}",
        )
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.INFO, force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "docker", "urllib3"):
        std = logging.getLogger(name)
        std.handlers = [_InterceptHandler()]
        std.propagate = False
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("docker").setLevel(logging.WARNING)
