"""The one redactor: every credential form this project's errors can carry, and what stays."""

from __future__ import annotations

import logging

import pytest

from phi3flow.core import redact

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjE3MDAwMDAwMDAsImtpbmQiOiJydW4ifQ."
       "c2lnbmF0dXJlLW9mLXRoZS1qd3Q")
SAS = ("https://acct.blob.core.windows.net/azureml/ExperimentRun/dcid.r1/model.onnx?"
       "se=2026-12-05T00%3A00%3A00Z&sp=rcw&sv=2025-01-05&sr=b&sig=AbC%2Bd3F%2FgH1jK%3D")


@pytest.mark.parametrize(("text", "secret", "kept"), [
    (f"401 for Authorization: Bearer {JWT}", JWT, "401 for Authorization: Bearer [REDACTED]"),
    (f"token expired: {JWT}", JWT, "token expired: [REDACTED]"),
    (f"AuthorizationFailure: RequestUrl: {SAS}", "AbC%2Bd3F%2FgH1jK%3D",
     "https://acct.blob.core.windows.net/azureml/ExperimentRun/dcid.r1/model.onnx?se="),
    (f"PUT {SAS}&comp=block failed", "AbC%2Bd3F%2FgH1jK%3D", "&comp=block failed"),
    ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=Zm9vYmFyYmF6cXV4;EndpointSuffix=x",
     "Zm9vYmFyYmF6cXV4", "AccountName=a;AccountKey=[REDACTED];EndpointSuffix=x"),
    ("MLFLOW_TRACKING_TOKEN=abcdefghijklmnopqrstuvwxyz012345", "abcdefghijklmnopqrstuvwxyz012345",
     "MLFLOW_TRACKING_TOKEN=[REDACTED]"),
    ('{"access_token": "abcdefghijklmnop1234567890"}', "abcdefghijklmnop1234567890",
     '"access_token": "[REDACTED]"'),
    ("401 Client Error for https://huggingface.co (hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123)",
     "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123", "401 Client Error for https://huggingface.co"),
])
def test_each_credential_form_is_redacted_and_the_rest_kept(text, secret, kept):
    cleaned = redact.redact(text)
    assert secret not in cleaned
    assert kept in cleaned and redact.REDACTED in cleaned


@pytest.mark.parametrize("text", [
    "usage: prompt_tokens 12, completion_tokens 31, max_tokens=256",
    "fetch_run_id=0c988fe7b6ab4f628a8c6ad7896c0161: no such run",
    "tokenizer_config.json is missing from /models/phi3",
    "https://127.0.0.1:8443/mlflow/v2.0/subscriptions/0000/api/2.0/mlflow/runs/get?run_id=abc",
])
def test_ordinary_text_is_left_alone(text):
    assert redact.redact(text) == text


def test_error_text_is_typed_redacted_and_bounded():
    error = RuntimeError(f"upload failed: {SAS} " + "x" * 5000)
    text = redact.error_text(error)
    assert text.startswith("RuntimeError: upload failed: https://acct.blob") and len(text) == 4000
    assert "AbC%2Bd3F" not in text


def test_the_log_filter_redacts_messages_arguments_and_tracebacks():
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(handler.format(record))
    handler.addFilter(redact.RedactingFilter())
    logger = logging.getLogger("phi3flow.test_redact")
    logger.addHandler(handler)
    try:
        logger.error("refused: %s", f"Bearer {JWT}")
        try:
            raise ValueError(f"blob {SAS}")
        except ValueError:
            logger.exception("upload failed")
    finally:
        logger.removeHandler(handler)
    joined = "\n".join(records)
    assert JWT not in joined and "AbC%2Bd3F" not in joined
    assert "refused: Bearer [REDACTED]" in joined and "ValueError: blob https://acct" in joined
