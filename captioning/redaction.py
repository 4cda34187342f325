"""The one redaction of the project: URLs lose their user, password, query and fragment; known secret values
(storage keys, session tokens, the Ray auth token) are masked wherever they appear, whatever their length.

Every `error:` line, log line, job record, entrypoint and job metadata goes through redact_text.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

REDACTED = "<redacted>"
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")
# Query parameters that make a URL a credential (S3 and GCS presigned URLs, Azure SAS, bearer tokens).
CREDENTIAL_PARAMETERS = frozenset({"x-amz-signature", "x-amz-credential", "x-amz-security-token",
                                   "x-goog-signature", "x-goog-credential", "signature", "sig", "token",
                                   "access_token", "awsaccesskeyid"})
_USERINFO = re.compile(r"(?<=//)[^/?#\s]*@")  # up to the last @ of the authority: `u:p@ss@host` loses `u:p@ss@`
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>),.;:!?]")  # not a trailing ')' or '.'


def redact(url: str) -> str:
    """url without user:password@ and with its query and fragment cut, for error messages and logs."""
    cut = _USERINFO.sub("***@", url, count=1)
    for mark, keep in (("?", "?..."), ("#", "")):
        if mark in cut:
            cut = cut.split(mark, 1)[0] + keep
    return cut


def find_token() -> str | None:
    """The Ray auth token, where Ray itself looks: RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def secret_values() -> list[str]:
    """The values that must never be printed, recorded or put in a job's entrypoint, longest first."""
    values = {os.environ.get(name, "").strip() for name in SECRET_ENV} | {find_token() or ""}
    return sorted((v for v in values if v), key=len, reverse=True)


def redact_text(text: str, hidden: list[str] | None = None) -> str:
    """text with every secret value masked and every URL in it redacted."""
    for value in secret_values() if hidden is None else sorted(hidden, key=len, reverse=True):
        if value:
            text = text.replace(value, REDACTED)
    return _URL.sub(lambda match: redact(match.group(0)), text)


def credentials_in(text: str) -> str | None:
    """What in text carries a credential (a URL user or password, a presigned URL's signature), or None."""
    for match in _URL.finditer(text):
        url = match.group(0)
        try:
            parts = urlsplit(url)
        except ValueError:
            return "a URL that cannot be parsed"
        if "@" in parts.netloc:
            return f"a user or password in the URL {redact(url)}"
        named = {key.lower() for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
        found = sorted(named & CREDENTIAL_PARAMETERS)
        if found:
            return f"the query parameter {found[0]} in the URL {redact(url)}"
    return None


def printable(text: str) -> str:
    """text with control characters escaped (a reason read from storage must not drive the terminal)."""
    return "".join(ch if ch.isprintable() or ch in "\n\t" else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)
