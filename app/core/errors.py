"""Corral's one error hierarchy.

Lower-level exceptions (llama.cpp, redis, sqlalchemy, httpx) are translated into these at
one boundary each, with ``raise ... from exc``; ``app.api.errors`` maps them to HTTP.

    CorralError
    ├── ConfigError              bad settings or environment             (500)
    ├── SpecError                a workflow spec or request is invalid   (422)
    ├── AuthError                missing or wrong API key                (401)
    ├── ForbiddenError           the key may not do this (not an admin)  (403)
    ├── NotFoundError            no such workflow / model / key          (404)
    ├── ConflictError            the request clashes with stored state   (409)
    ├── ServiceUnavailable       Redis or the database cannot be reached (503)
    ├── PlacementError           no GPU can hold the model (now, or ever: ``permanent``)
    ├── ModelError               catalog and model-file problems
    │   ├── UnknownModelError    a name not in the catalog
    │   ├── ModelFileError       a GGUF file missing, truncated or corrupt
    │   └── DownloadError        a pull failed: HTTP error, size or sha256 mismatch
    └── StepError                a step failed while running (recorded on the step)
        ├── StepTimeout          the step ran past its ``timeout_s``      (retryable)
        ├── StepCancelled        the workflow was cancelled mid-step
        └── StepInputError       the rendered input is unusable          (never retried)
"""

from __future__ import annotations

from dataclasses import dataclass, field


class CorralError(Exception):
    """Base class of every error Corral raises on purpose."""


class ConfigError(CorralError):
    """The settings or the environment are unusable."""


@dataclass
class FieldError:
    """One problem with one field: where it is, what is wrong, and a machine-readable type."""

    loc: tuple[str | int, ...]
    msg: str
    type: str = "value_error"

    def as_dict(self) -> dict[str, object]:
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


@dataclass
class SpecError(CorralError):
    """A workflow spec (or another request body) is invalid; nothing was written."""

    errors: list[FieldError] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.__str__())

    @classmethod
    def single(cls, loc: tuple[str | int, ...], msg: str, type: str = "value_error") -> SpecError:
        return cls([FieldError(loc, msg, type)])

    def __str__(self) -> str:
        return "; ".join(
            f"{'.'.join(str(p) for p in e.loc)}: {e.msg}" if e.loc else e.msg for e in self.errors
        )


class AuthError(CorralError):
    """The request carries no API key, or one that is unknown or revoked."""


class ForbiddenError(CorralError):
    """The key is valid but may not do this (e.g. change rules without being an admin)."""


class NotFoundError(CorralError):
    """The named resource does not exist (or is not visible to this key)."""


class ConflictError(CorralError):
    """The request clashes with stored state (e.g. an Idempotency-Key reused for another body)."""


class ServiceUnavailable(CorralError):
    """A backing service (Redis, the database) cannot be reached right now."""


class PlacementError(CorralError):
    """The scheduler cannot place a model's pool: no room now, or too big for this host."""

    def __init__(self, message: str, *, permanent: bool, need_bytes: int = 0) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.need_bytes = need_bytes


class ModelError(CorralError):
    """A problem with a catalog entry or a model file."""


class UnknownModelError(ModelError):
    """The name is not in the model catalog."""


class ModelFileError(ModelError):
    """A GGUF file is missing, truncated or corrupt."""


class DownloadError(ModelError):
    """Pulling a model failed: an HTTP error, or a size or sha256 mismatch."""


class StepError(CorralError):
    """A step failed while running; the message is recorded on the step."""

    retryable = True


class StepTimeout(StepError):
    """The step ran past its ``timeout_s``."""


class StepCancelled(StepError):
    """The workflow was cancelled while the step ran."""

    retryable = False


class StepInputError(StepError):
    """The step's rendered input is unusable (e.g. longer than the model's context)."""

    retryable = False
