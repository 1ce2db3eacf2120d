"""One root error type; each area has a subclass. Messages are one line a person can act on."""
from __future__ import annotations


class LoradeployError(Exception):
    """Root of every error loradeploy raises on purpose.

    ``exit_code`` is what the CLI exits with; ``hint`` is the "what to do" half of the message.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(str(self.message).split())
        if self.hint:
            text = f"{text} ({' '.join(self.hint.split())})"
        return text


class ConfigError(LoradeployError):
    exit_code = 2


class InputError(LoradeployError):
    """A file or argument the user gave is missing or wrong."""

    exit_code = 2


class ResourceError(LoradeployError):
    """Not enough disk, memory, or a port / lock already held."""

    exit_code = 3


class LockError(ResourceError):
    pass


class DiskFullError(ResourceError):
    """The disk (or the user's quota) filled up while an output was being written."""


def disk_full(exc: BaseException, path) -> "DiskFullError | None":
    """The one-line error for an OSError that says the disk or quota is full (ENOSPC, EDQUOT), else None."""
    import errno
    if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    why = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on the disk"
    return DiskFullError(f"{why} while writing {path}; the partial file was removed",
                         hint="free space there (`loradeploy clean` removes temporaries), or point "
                              "pipeline.work_dir at a larger disk, then run again")


class ProcError(LoradeployError):
    """A subprocess failed; carries the command, exit code and stderr tail."""

    def __init__(self, message: str, *, command: list[str] | None = None, returncode: int | None = None,
                 stderr_tail: str = "", hint: str | None = None):
        self.command = list(command or [])
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        super().__init__(message, hint=hint)


class StageUnavailable(LoradeployError):
    """A stage that is not built, or whose optional dependency is missing."""


class FetchError(LoradeployError):
    pass


class MergeError(LoradeployError):
    pass


class ConvertError(LoradeployError):
    pass


class QuantizeError(LoradeployError):
    pass


class DeployError(LoradeployError):
    pass


class HealthError(LoradeployError):
    pass


class EvalError(LoradeployError):
    pass


class GGUFError(LoradeployError):
    """A GGUF file failed structural validation."""

    exit_code = 2



class LlamaRuntimeError(ResourceError):
    """llama.cpp cannot run on this machine in any CPU mode that was tried."""


class ServingError(DeployError):
    """A served model's process or port misbehaved (crashed, did not become ready, port held)."""


class HttpError(LoradeployError):
    """An HTTP exchange with an OpenAI-compatible server failed; ``kind`` says how."""

    def __init__(self, message: str, *, kind: str = "error", status: int | None = None, body: str = "",
                 hint: str | None = None):
        self.kind = kind          # "connect" | "timeout" | "status" | "protocol"
        self.status = status
        self.body = body
        super().__init__(message, hint=hint)


class HttpConnectError(HttpError):
    def __init__(self, message: str, **kw):
        super().__init__(message, kind="connect", **kw)


class HttpTimeout(HttpError):
    def __init__(self, message: str, **kw):
        super().__init__(message, kind="timeout", **kw)


class HttpStatusError(HttpError):
    def __init__(self, message: str, **kw):
        super().__init__(message, kind="status", **kw)


class VerifyError(LoradeployError):
    """The fidelity gate could not run, or it refused a GGUF (the message names format, metric, value, limit)."""
