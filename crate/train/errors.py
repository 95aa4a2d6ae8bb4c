"""A diverged run ends training. Like a damaged checkpoint (`crate.errors.CheckpointError`) it is deterministic
(resubmitting changes nothing), so under Ray Train it fails the job instead of being retried (`crate.train.loop`)."""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """The loss or the model became non-finite, or the engine skipped too many steps in a row."""

    def __init__(self, step: int, reason: str):
        self.step = step
        self.reason = reason
        super().__init__(f"training diverged at step {step}: {reason}; no checkpoint was written for it, the newest "
                         f"checkpoint on storage is the last good one (fix the cause, then resubmit to resume from it)")

    def __reduce__(self):
        return (TrainingDiverged, (self.step, self.reason))
