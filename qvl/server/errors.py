"""Every failure becomes an OpenAI error body: {"error": {"message", "type", "param", "code"}}.

Owns: `APIError` (what the server, and any other front end such as the CLI or a batch runner, raises for
a request it refuses) and its body, the mapping of pydantic validation errors to a message and a `param`
path like "messages[0].content[1].image_url.url", and the mapping of exceptions raised while planning,
checking and loading a prompt (bad media, limits) to 4xx. Imports no web framework: installing the
handlers that turn these into HTTP responses is qvl.server.app's.
"""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from qvl.server.protocol import ErrorInfo, ErrorResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the server refuses (or cannot serve); `status` is the HTTP status, `headers` any extra
    response headers."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers          # extra response headers, e.g. Connection: close
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


def _param_path(loc: tuple) -> str | None:
    """('messages', 0, 'content', 1, 'image_url', 'image_url', 'url') -> 'messages[0].content[1].image_url.url'.

    pydantic puts union branch names ('list[...]', 'function-after[...]') and discriminator tags (the
    part type, right before the field of the same name) into `loc`; neither is a field, so drop them.
    """
    out = ""
    prev = None
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif isinstance(item, str):
            if "[" in item or item in ("str", "int", "float", "bool", "list", "dict", "none"):
                continue
            if item == prev:
                continue
            out += ("." if out else "") + item
        prev = item
    return out or None


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """An APIError for pydantic errors: the most specific one (deepest location) is reported."""
    if not errors:
        return APIError("Invalid request body")
    # union branches report one error per branch; prefer the deepest (the branch the user meant)
    err = max(errors, key=lambda e: (e.get("type") != "string_type", len(e.get("loc", ()))))
    param = _param_path(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err.get("type") == "missing":
        message = f"Missing required field '{param}'"
    elif param:
        message = f"Invalid value for '{param}': {msg}"
    else:
        message = msg
    if "input" in err and err.get("type") not in ("missing",) and not isinstance(err["input"], (dict, list)):
        shown = repr(err["input"])
        if len(shown) <= 80:
            message += f" (got {shown})"
    return APIError(message, param=param, code="invalid_value" if err.get("type") != "missing"
                    else "missing_required_parameter")


def from_pydantic(exc: ValidationError) -> APIError:
    return validation_error(exc.errors(include_url=False))


def media_error(exc: BaseException, param: str | None = None) -> APIError | None:
    """Map an exception raised while planning/checking/loading a prompt to a 4xx, or None if it is ours.

    The contract of qvl.multimodal is: bad input -> ValueError (or a subclass) with a message naming the
    item and the numbers; a prompt over its limits -> plan.PromptLimitError, whose code is kept and whose
    param is `param` (the prompt's field: "messages" or "prompt") or "max_tokens". Pillow, PyAV and httpx
    raise their own types for bad/unreachable media.
    """
    import httpx
    from PIL import Image

    from qvl.multimodal.plan import PromptLimitError

    if isinstance(exc, PromptLimitError):
        return APIError(str(exc), param="max_tokens" if exc.field == "max_tokens" else param, code=exc.code)

    name = type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError):
        return APIError(f"Image refused as a decompression bomb: {exc}", code="invalid_image")
    if isinstance(exc, PermissionError) or name in ("MediaPolicyError", "MediaForbiddenError"):
        return APIError(f"Media refused by the server's media policy: {exc}", code="media_forbidden")
    if isinstance(exc, FileNotFoundError):
        return APIError(f"Media file not found: {exc}", code="invalid_media")
    if isinstance(exc, httpx.TimeoutException) or isinstance(exc, TimeoutError):
        return APIError(f"Timed out fetching media: {exc}", code="media_fetch_failed")
    if isinstance(exc, httpx.HTTPError):
        return APIError(f"Could not fetch media: {exc}", code="media_fetch_failed")
    if isinstance(exc, ValueError):
        return APIError(str(exc) or name, code="invalid_value")
    module = type(exc).__module__ or ""
    if module.startswith(("PIL", "av")) or isinstance(exc, (OSError, EOFError)):
        return APIError(f"Could not decode media: {name}: {exc}", code="invalid_media")
    return None
