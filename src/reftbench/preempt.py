"""Stop cleanly on a cluster's warning signal: SIGTERM, SIGUSR1 (SLURM's `--signal` before a time-out,
and what a preempting scheduler sends) and, in a submitit job, submitit's own signal.

A handler only sets a flag; the training loop reads it after each optimiser step (a step is never cut
in half), writes a checkpoint and raises `Stopped`. In a submitit job (hydra/launcher=submitit_slurm)
the loop then hands the signal to submitit's own handler: it calls the launcher's `checkpoint` hook
(the same job again), requeues it and exits; the requeued job resumes from the checkpoint.
"""
import logging
import os
import signal
import threading
from contextlib import contextmanager

log = logging.getLogger("reftbench")


class Stopped(BaseException):
    """The loop stopped on a signal after saving its checkpoint. Not an Exception: a sweep must not
    go on to its next job when the whole job was told to stop."""

    def __init__(self, signum: int, step: int, saved: bool):
        self.signum, self.step, self.saved = signum, step, saved
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after optimiser step {step}"
                         + ("; a checkpoint was saved: the same command resumes from it" if saved
                            else "; checkpoints are off (trainer.checkpoints=false): nothing was saved"))


def _submitit_signal() -> int:
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")  # submitit's own default
    return getattr(signal, name, signal.SIGUSR2)


class StopFlag:
    def __init__(self):
        self.signum = None
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            # os.write, not logging: the signal may land inside a logging call, and a log handler's
            # buffered stream raises "reentrant call" when written to from within its own write.
            os.write(2, (f"reftbench: {signal.Signals(signum).name} received: stopping after the next optimiser "
                         "step, with a checkpoint (send it again to stop now, without one)\n").encode())
            self.signum = signum
            return
        # a second signal: the default action now (a run still loading or evaluating is not kept waiting)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def submitit_handler(self):
        """submitit's handler, when this process runs a submitit job (it installed one)."""
        prev = self.previous.get(_submitit_signal())
        owner = getattr(prev, "__self__", None)
        return prev if owner is not None and type(owner).__module__.startswith("submitit") else None


_ACTIVE: list[StopFlag] = []  # the flag of the outermost open block


@contextmanager
def stop_on_signals():
    """Yields a StopFlag whose `signum` is set once a stop signal arrives; the previous handlers are
    back when the block ends. run() opens one around a whole run, so a signal during loading or the
    frozen evaluation stops the run after its first step; a nested block shares the outer flag.
    Outside the main thread (signals cannot be caught there) nothing is set."""
    if _ACTIVE:
        yield _ACTIVE[0]
        return
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    for sig in {signal.SIGTERM, signal.SIGUSR1, _submitit_signal()}:
        flag.previous[sig] = signal.signal(sig, flag._handle)
    _ACTIVE.append(flag)
    try:
        yield flag
    finally:
        _ACTIVE.remove(flag)
        for sig, prev in flag.previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)


def agreed(flag: StopFlag, accelerator) -> int | None:
    """The stop signal if any process got one, on every process (they save and stop together)."""
    if accelerator.num_processes == 1:
        return flag.signum
    import torch
    t = torch.tensor([flag.signum or 0], device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item()) or None


def hand_over(flag: StopFlag, signum: int, step: int, saved: bool):
    """After the checkpoint: in a submitit job, submitit requeues the job and exits; otherwise (or on
    a process submitit does not requeue from) raise Stopped."""
    handler = flag.submitit_handler()
    if handler is not None:
        log.info("handing over to submitit: requeue from the checkpoint of step %d", step)
        handler(_submitit_signal(), None)  # checkpoint hook, requeue, sys.exit
    raise Stopped(signum, step, saved)
