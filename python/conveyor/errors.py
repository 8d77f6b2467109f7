"""Conveyor's exception hierarchy: everything it raises derives from ConveyorError.

The types raised by the C++ core are created by the compiled module and re-exported
here, so ``except conveyor.errors.QueueFull`` catches the core's error too. The
Python-only types (configuration, lookup) subclass the same base.

| error               | raised when                                                     |
|---------------------|-----------------------------------------------------------------|
| InvalidInput        | a request or argument does not match the model (also ValueError) |
| QueueFull           | the model's bounded queue is full: retry later                  |
| DeadlineExceeded    | the request's timeout passed before it ran (also TimeoutError)  |
| Cancelled           | the caller gave up on the request                               |
| ModelExecutionError | the model raised or returned outputs that break its config      |
| OutOfMemory         | a memory pool's limit was reached (also MemoryError)            |
| Unavailable         | the runtime or model is stopping or stopped                     |
| ConfigError         | a config file or repository is invalid (also ValueError)        |
| ModelNotFound       | no model or version of that name (also LookupError)             |
| NotFound            | no shared-memory region of that name (also LookupError)         |
| Conflict            | the request clashes with what runs (a second rollout on a model) |
| InternalError       | a broken invariant inside Conveyor: a bug, please report it     |
"""

from conveyor._core import (
    Cancelled,
    ConveyorError,
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelExecutionError,
    OutOfMemory,
    QueueFull,
    Unavailable,
)


class ConfigError(ConveyorError, ValueError):
    """A model configuration or repository is invalid; the message names file, field and fix."""


class ModelNotFound(ConveyorError, LookupError):
    """No model, or no such version of it, is loaded."""


class NotFound(ConveyorError, LookupError):
    """Something else a request names (a shared-memory region) does not exist; the message names it."""


class Conflict(ConveyorError):
    """The request clashes with something already running; the message says what and how to end it."""


__all__ = [
    "Cancelled",
    "ConfigError",
    "Conflict",
    "ConveyorError",
    "DeadlineExceeded",
    "InternalError",
    "InvalidInput",
    "ModelExecutionError",
    "ModelNotFound",
    "NotFound",
    "OutOfMemory",
    "QueueFull",
    "Unavailable",
]
