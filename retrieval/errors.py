"""One exception family. Each error carries a `kind`; each adapter translates kinds in one place.

The CLI turns any RetrievalError into one line on stderr and exit code 1 (retrieval.cli.app); the
API turns its kind into an HTTP status with the message as `detail` (retrieval.api.errors). So a
message raised where a client can see it is a stable, public string without server paths.
"""

from __future__ import annotations

# The stable set of kinds: what went wrong, from the caller's side.
KINDS = (
    "invalid",            # the request or an option is malformed
    "unprocessable",      # well-formed, but its content cannot be used (an image that does not decode)
    "not_found",          # what was asked for does not exist
    "conflict",           # the state forbids it now (another run holds the lock, another model built the index)
    "unsupported_media",  # data in a format the tool does not read
    "too_large",          # more bytes than the configured limit
    "unauthorized",       # missing or wrong credentials
    "forbidden",          # credentials or not, this server refuses it (writes beyond loopback without a key)
    "unavailable",        # a needed part (the model, the index) is not loaded or not usable yet
    "timeout",            # something the tool waited on took too long
)


class RetrievalError(Exception):
    """Base class for every error a user can cause or fix. `kind` is one of KINDS."""

    kind = "invalid"

    def __init__(self, message: str = "", kind: str | None = None):
        super().__init__(message)
        if kind is not None:
            if kind not in KINDS:
                raise ValueError(f"unknown error kind {kind!r}")
            self.kind = kind


class CorpusError(RetrievalError):
    """The corpus path is missing, not a directory, or holds no images."""


class ModelLoadError(RetrievalError):
    """The embedding model cannot be found or is not a DINOv2 checkpoint."""

    kind = "unavailable"


class PreprocessConfigError(RetrievalError):
    """The checkpoint's preprocessor_config.json asks for something we do not implement."""


class IndexMismatchError(RetrievalError):
    """The existing index was built with another model, dimension or corpus."""

    kind = "conflict"


class IndexNotFoundError(RetrievalError):
    """No index exists where one was expected."""

    kind = "not_found"


class ImageDecodeError(RetrievalError):
    """An image could not be read or decoded; the message is the human reason we record.

    `failure_kind` is the stable machine-readable category stored in the failures table: empty,
    not_an_image, too_large, truncated or corrupt. Data in no image format is `unsupported_media`;
    every other decode failure is `unprocessable`.
    """

    FAILURE_KINDS = ("empty", "not_an_image", "too_large", "truncated", "corrupt")

    def __init__(self, message: str, failure_kind: str = "corrupt"):
        if failure_kind not in self.FAILURE_KINDS:
            raise ValueError(f"unknown decode failure kind {failure_kind!r}")
        super().__init__(message, "unsupported_media" if failure_kind == "not_an_image" else "unprocessable")
        self.failure_kind = failure_kind


class QueryError(RetrievalError):
    """A search query is invalid (unknown id, path outside the corpus, bad k)."""


class ReadFailure(RetrievalError):
    """Bytes of one image could not be read from its source (remote object gone, denied, timed out, too large).

    `failure_kind` is the failures-table category (vanished, unreadable, io_error, too_large); the
    run records it with `reason` and goes on. As an error kind it is `unavailable`.
    """

    def __init__(self, failure_kind: str, reason: str):
        super().__init__(reason, "unavailable")
        self.failure_kind, self.reason = failure_kind, reason

    def __reduce__(self):  # noqa: ANN204 - crosses process boundaries (decode workers)
        return (ReadFailure, (self.failure_kind, self.reason))
