"""Errors a caller can catch by kind."""


class EngineDeadError(RuntimeError):
    """The engine cannot serve now: a stage process died (the stages restart, then it serves
    again), or, when `permanent`, for good (its restarts are spent, it was shut down)."""

    def __init__(self, message: str = "", permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class StageDiedError(EngineDeadError):
    def __init__(self, stage: int, rank: int, exitcode: int | None, detail: str = ""):
        self.stage, self.rank, self.exitcode = stage, rank, exitcode
        msg = f"pipeline stage {stage} (rank {rank}) died"
        if exitcode is not None:
            msg += f" with exit code {exitcode}"
        super().__init__(msg + (f": {detail}" if detail else ""))


class NodeLostError(StageDiedError):
    """The machine a stage ran on is gone (its Ray raylet unreachable). Not restarted:
    the cluster no longer has the resources the stage was placed on."""

    def __init__(self, stage: int, rank: int, node: str):
        self.node = node
        super().__init__(stage, rank, None, f"node {node} was lost (its Ray raylet is unreachable)")


class StageHungError(EngineDeadError):
    def __init__(self, stage: int, rank: int, timeout_s: float):
        self.stage, self.rank = stage, rank
        super().__init__(f"pipeline stage {stage} (rank {rank}) made no progress for {timeout_s:g} s "
                         "with work pending (--stage-timeout)")


class MicrobatchError(RuntimeError):
    """Running one microbatch raised on a stage: its requests fail, the engine serves on."""

    def __init__(self, stage: int, rank: int, summary: str, detail: str = ""):
        self.stage, self.rank, self.summary, self.detail = stage, rank, summary, detail
        super().__init__(f"pipeline stage {stage} (rank {rank}) failed on this request's microbatch: {summary}")

    def __reduce__(self):
        return type(self), (self.stage, self.rank, self.summary, self.detail)


class InvalidRequest(ValueError):
    """A request the caller got wrong; `param` names the request field at fault, if one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # keeps `param` across processes (the default pickles only the message)
        return type(self), (str(self), self.param)


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full; retry later."""
