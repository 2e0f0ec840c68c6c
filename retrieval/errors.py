"""One exception family. The CLI turns any of these into a one-line message and exit code 1."""


class RetrievalError(Exception):
    """Base class for every error a user can cause or fix."""


class CorpusError(RetrievalError):
    """The corpus path is missing, not a directory, or holds no images."""


class ModelLoadError(RetrievalError):
    """The embedding model cannot be found or is not a DINOv2 checkpoint."""


class PreprocessConfigError(RetrievalError):
    """The checkpoint's preprocessor_config.json asks for something we do not implement."""


class IndexMismatchError(RetrievalError):
    """The existing index was built with another model, dimension or corpus."""


class IndexNotFoundError(RetrievalError):
    """No index exists where one was expected."""


class ImageDecodeError(RetrievalError):
    """An image could not be read or decoded; the message is the human reason we record.

    `kind` is the stable machine-readable category (stored in the failures table, mapped to HTTP
    status codes by the API): empty, not_an_image, too_large, truncated or corrupt.
    """

    KINDS = ("empty", "not_an_image", "too_large", "truncated", "corrupt")

    def __init__(self, message: str, kind: str = "corrupt"):
        if kind not in self.KINDS:
            raise ValueError(f"unknown decode error kind {kind!r}")
        super().__init__(message)
        self.kind = kind


class QueryError(RetrievalError):
    """A search query is invalid (unknown id, path outside the corpus, bad k)."""


class ReadFailure(RetrievalError):
    """Bytes of one image could not be read from its source (remote object gone, denied, timed out, too large).

    `kind` is the failures-table category (vanished, unreadable, io_error, too_large); the run
    records it with `reason` and goes on.
    """

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason

    def __reduce__(self):  # noqa: ANN204 - crosses process boundaries (decode workers)
        return (ReadFailure, (self.kind, self.reason))
