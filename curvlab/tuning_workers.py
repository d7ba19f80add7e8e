"""Workers of a shared tuning study (:func:`curvlab.tuning.tune`): who owns a running trial, its heartbeat, and the
recovery of trials whose worker died (same host: its process is gone; any host: no heartbeat for ``grace_s``). A
dead worker's trial is marked FAIL and its parameters re-queued, so a killed tune resumes with the same
configuration."""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

__all__ = ["WORKER", "BEAT", "host_pid", "is_stale", "recover_stale", "Heartbeat"]

#: user attributes of a trial: the owning worker (host:pid) and its last heartbeat (epoch seconds)
WORKER, BEAT = "curvlab_worker", "curvlab_heartbeat"
#: a RUNNING trial that never recorded its owner is dead after this long (a live worker records it right after ask)
UNOWNED_GRACE_S = 10.0


def host_pid() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def is_stale(frozen: Any, grace_s: float) -> bool:
    """A RUNNING trial whose worker is gone: same host and its process has ended, or no heartbeat in grace_s."""
    owner = str(frozen.user_attrs.get(WORKER, ""))
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        if int(pid) == os.getpid():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    if not owner:
        # killed between ``study.ask()`` and recording its owner (a window of milliseconds for a live worker)
        started = frozen.datetime_start.timestamp() if frozen.datetime_start else time.time()
        return time.time() - started > min(grace_s, UNOWNED_GRACE_S)
    beat = frozen.user_attrs.get(BEAT)
    started = frozen.datetime_start.timestamp() if frozen.datetime_start else time.time()
    return time.time() - float(beat if beat is not None else started) > grace_s


def recover_stale(study: Any, grace_s: float) -> int:
    """Mark the RUNNING trials of dead workers FAIL and re-queue their parameters; returns how many."""
    import optuna

    count = 0
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not is_stale(frozen, grace_s):
            continue
        # Optuna has no public call to close another process's trial; this is what its own
        # RetryFailedTrialCallback machinery does through the storage.
        try:
            study._storage.set_trial_user_attr(frozen._trial_id, "stale", True)
            closed = study._storage.set_trial_state_values(frozen._trial_id, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # its worker finished it meanwhile after all
            closed = False
        if closed:
            if frozen.params:  # killed before its parameters were drawn: nothing to re-run
                study.enqueue_trial(dict(frozen.params), user_attrs={"retry_of": frozen.number})
            count += 1
    return count


class Heartbeat:
    """Writes the trial's heartbeat user attribute every ``interval_s`` from a daemon thread."""

    def __init__(self, trial: Any, interval_s: float) -> None:
        self.trial, self.interval_s, self.stop = trial, interval_s, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.trial.set_user_attr(BEAT, time.time())
            except Exception:  # noqa: BLE001  (a missed beat only delays stale detection)
                pass

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
