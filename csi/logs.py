"""The process's log output: one line per record, as text or as JSON (`--log-format`).

Code logs with the standard `logging` module and passes structured fields with `extra=`
(`log.info("...", extra={"volume_id": v, "code": "OK"})`); this module only decides how a
record is written. Both formats carry the same fields, so a key grepped for in text is the
key queried in JSON. docs/logging.md lists the keys.

  text  2025-01-02T03:04:05.678Z INFO csi.rpc: NodePublishVolume ok method=… volume_id=…
  json  {"ts": "2025-01-02T03:04:05.678Z", "level": "INFO", "logger": "csi.rpc", "msg": …}
"""

import datetime
import json
import logging
import re
import sys

FORMATS = ("text", "json")

# The attributes every LogRecord has: whatever else a record carries came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}
# A text value is quoted when it would not read back as one key=value token.
_PLAIN = re.compile(r"[^\s\"'=\\]+")


def fields(record: logging.LogRecord) -> dict:
    """The structured fields of a record (those given with `extra=`), in the order given."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def timestamp(record: logging.LogRecord) -> str:
    """RFC 3339 in UTC with milliseconds: 2025-01-02T03:04:05.678Z."""
    t = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's fields, then
    `exc` (the traceback) when there is one. Newlines inside values are escaped, so a record
    is always exactly one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": timestamp(record), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        for key, value in fields(record).items():
            out.setdefault(key, value)  # a field never replaces one of the four above
        exc = self._exception(record)
        if exc:
            out["exc"] = exc
        return json.dumps(out, default=str, ensure_ascii=False)

    def _exception(self, record: logging.LogRecord) -> str:
        parts = []
        if record.exc_info:
            parts.append(self.formatException(record.exc_info))
        elif record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(parts)


class TextFormatter(logging.Formatter):
    """`TS LEVEL logger: message key=value …`, values quoted (JSON string syntax) when they
    hold spaces, quotes, `=` or nothing; a traceback follows on its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        for key, value in fields(record).items():
            line += f" {key}={text_value(value)}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def text_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if _PLAIN.fullmatch(text) else json.dumps(text, ensure_ascii=False)


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (as logging's last resort
    does), so a replaced stderr (a test capturing it) never leaves a stale stream behind."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure(level: str | int = "INFO", fmt: str = "text", stream=None) -> logging.Handler:
    """Send every log record at `level` and above to `stream` (default: stderr) in `fmt`.
    Calling it again replaces the handler it installed before, and no other."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = _Stderr() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._strata = True  # noqa: SLF001 - marks ours, for the next configure()
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_strata", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
