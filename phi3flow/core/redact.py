"""The one redactor: what reaches a tag, a param, an artifact or a log passes through `redact`.

Error texts travel far here: a step's exception becomes its run's `phi3flow.error` tag, the
job's log and `mlflow run`'s last line. Some carry credentials: a blob storage error can quote
the SAS URL it was given (its `sig=` is a signature that grants access until it expires), an HTTP
error can echo an `Authorization: Bearer ...` header, Azure ML's run tokens are JWTs, and a
Hugging Face token starts `hf_`. Each is
replaced by `[REDACTED]`, keeping the rest of the text (the host, the path, the status) that says
what went wrong. `install_log_filter` applies it to every log line this process writes.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[REDACTED]"

# Ordered: a bearer token that is a JWT is caught whole by the first pattern.
_PATTERNS = (
    # `Authorization: Bearer <token>`, `"Bearer <token>"`: any token after the scheme.
    (re.compile(r"(?i)\b(bearer)(\s+|%20)[A-Za-z0-9\-._~+/]+=*"), rf"\1\2{REDACTED}"),
    # A JWT anywhere (header.payload.signature, base64url; headers start with `{"` = eyJ).
    (re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"), REDACTED),
    # A SAS token's signature, in a URL's query or on its own (`sig=...&` or at the end).
    (re.compile(r"(?i)(?<![A-Za-z0-9])(sig)=[^&\s'\"<>]+"), rf"\1={REDACTED}"),
    # A Hugging Face access token (`hf_` and 30-odd letters and digits).
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"), REDACTED),
    # A storage account key or connection string's key (`AccountKey=...;`).
    (re.compile(r"(?i)(AccountKey|SharedAccessSignature)=[^;\s'\"]+"), rf"\1={REDACTED}"),
    # `token=...`, `"access_token": "..."`, `MLFLOW_TRACKING_TOKEN=...` (a key naming a token).
    (re.compile(r"(?i)([A-Za-z_]*token[\"']?\s*[:=]\s*[\"']?)([A-Za-z0-9\-._~+/]{16,}=*)"),
     rf"\1{REDACTED}"),
)


def redact(text: str) -> str:
    """`text` with every bearer token, JWT, SAS signature, account key and named token
    replaced by `[REDACTED]`."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def error_text(exc: BaseException, limit: int = 4000) -> str:
    """`Type: message`, redacted and cut to `limit` characters (a tag holds at most 5,000)."""
    return redact(f"{type(exc).__name__}: {exc}")[:limit]


class RedactingFilter(logging.Filter):
    """Redacts a record's final message (its arguments and exception text included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_FILTER = RedactingFilter()


def install_log_filter() -> None:
    """Redact every line written by the root logger's handlers and by MLflow's own (MLflow's
    loggers do not propagate to the root)."""
    for name in (None, "mlflow"):
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
