"""Logging set-up: text for people, JSON lines for machines (AUDIENCES_LOG_FORMAT)."""

from __future__ import annotations

import logging

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(body).decode()


def log_handlers(log_format: str) -> list[logging.Handler]:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return [handler]


def configure(log_format: str = "text", level: str = "INFO") -> None:
    root = logging.getLogger()
    root.handlers[:] = log_handlers(log_format)
    root.setLevel(level.upper())


def logging_config(log_format: str, level: str = "INFO") -> dict[str, object]:
    """dictConfig for the Faust worker (it replaces Faust's coloured console set-up)."""
    formatter: dict[str, object] = (
        {"()": "audiences.logs.JsonFormatter"}
        if log_format == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "main"}},
        "root": {"level": level.upper(), "handlers": ["console"]},
        "loggers": {"aiokafka": {"level": "WARNING"}},
    }
