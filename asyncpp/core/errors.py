"""Errors a caller can catch by kind."""


class EngineDeadError(RuntimeError):
    """The engine can no longer serve (a stage process died, or it was shut down)."""


class StageDiedError(EngineDeadError):
    def __init__(self, stage: int, rank: int, exitcode: int | None, detail: str = ""):
        self.stage, self.rank, self.exitcode = stage, rank, exitcode
        msg = f"pipeline stage {stage} (rank {rank}) died"
        if exitcode is not None:
            msg += f" with exit code {exitcode}"
        super().__init__(msg + (f": {detail}" if detail else ""))


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full; retry later."""
