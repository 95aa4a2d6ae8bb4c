"""Training faults that end a run: a damaged checkpoint, a diverged run. Both are deterministic (resubmitting
changes nothing), so under Ray Train they fail the job instead of being retried (see `crate.train.loop`)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be trusted or read; the message names the checkpoint and the file."""

    def __reduce__(self):  # picklable with its message, so it crosses Ray actor boundaries intact
        return (type(self), self.args)


class TrainingDiverged(RuntimeError):
    """The loss or the model became non-finite, or the engine skipped too many steps in a row."""

    def __init__(self, step: int, reason: str):
        self.step = step
        self.reason = reason
        super().__init__(f"training diverged at step {step}: {reason}; no checkpoint was written for it, the newest "
                         f"checkpoint on storage is the last good one (fix the cause, then resubmit to resume from it)")

    def __reduce__(self):
        return (TrainingDiverged, (self.step, self.reason))
