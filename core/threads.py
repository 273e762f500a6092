"""How many threads a loop of small CPU steps runs on: torch's count, or one (`AdaptiveThreads`).

Training (CD-k, greedy layers, up-down) and the annealing loops of evaluation (AIS, RAISE) are
long sequences of small torch operations; this is the one place that picks their thread count.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager

import torch


class AdaptiveThreads:
    """Runs a loop of small steps on whichever is faster now: torch's thread count, or one thread.

    Why: each torch operation on the CPU is a parallel region whose threads all wait for the
    slowest one, and a CD step is a few dozen of them. When another process keeps one of the
    cores busy, the thread that shares that core runs only in the scheduler's time slices, and
    every region waits for it; libgomp's waiting threads spin meanwhile, so the scheduler never
    sees an idle core to move it to. The step then takes several times longer on two threads than
    on one alone. Which count is faster depends on what else the machine runs, and that changes
    while a trial runs, so it is measured instead of guessed:

    - the loop runs in chunks of at least `chunk_seconds` of wall time; each chunk is timed, and
      the estimate of a thread count is its fastest seconds per step over its last `window`
      chunks: a machine's hiccups only ever slow a chunk down, so one slow chunk is not taken for
      a change, while a core taken for good slows every chunk after it;
    - the next chunk runs on the count with the lower estimate, so a lasting slowdown of the count
      in use moves training to the other count after `window` chunks;
    - the count not in use is tried again, for half a chunk, after 1, 2, 4, ... chunks (at most
      `max_interval`), and kept if its estimate, with that half chunk in it, is now the lower;
      the interval doubles each time a trial loses and starts again at 1 when one wins: a trial
      that runs into a stolen core costs about half a chunk's time, and a freed core is found
      again within `max_interval` chunks. Both estimates are minima over as many chunks, so
      neither count is favoured by the noise of its measurements.

    Why not let the threads wait passively instead (OMP_WAIT_POLICY=passive, which libgomp reads
    once, when torch loads): that ends the stalls, but then every region has to wake a sleeping
    thread, and on a quiet machine two threads became slower than one.

    The count chosen goes to `torch.set_num_threads`, or, where `running` is given `apply`, to
    that (the compiled CD step's own threads, `core.cpu_cd`) while torch stays on one thread. The
    count in force before `running` is restored after it. Results do not depend on the count: the
    compiled step cuts its work the same way on any count, and MKL's sgemm and torch's element-wise
    operations and column sums give the same bits on one thread as on two for the shapes trained
    here (the tests check it), so the same seed still gives the same weights.
    """

    def __init__(
        self,
        chunk_seconds: float = 0.02,
        max_interval: int = 32,
        window: int = 3,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.chunk_seconds = chunk_seconds
        self.max_interval = max_interval
        self.window = window
        self.clock = clock
        self.most = 1  # torch's thread count when `running` began: the larger of the two choices
        self.threads = 1  # the count of the chunk now running
        self.per_step: dict[int, float] = {}  # thread count -> its estimate, seconds per step
        self._recent: dict[int, deque[float]] = {}  # thread count -> seconds per step of its last chunks
        self.steps_on: dict[int, int] = {}  # thread count -> steps run on it, all told
        self._active = False  # inside `running`, with more than one thread to choose from
        self._apply: Callable[[int], None] = torch.set_num_threads  # where a chosen count goes
        self._trial = False  # whether the chunk now running tries the count not in use
        self._interval = 1  # chunks between trials of the count not in use
        self._until_trial = 1
        self._steps = 0
        self._chunk_start: float | None = None  # None until the first step of a `running` block ends

    @contextmanager
    def running(self, enabled: bool = True, apply: Callable[[int], None] | None = None):
        """Choose the thread count for the steps inside; each step ends with a call to `step`.

        The count goes to `apply` if given (torch then runs on one thread meanwhile), else to
        `torch.set_num_threads`. Disabled (a CUDA model) or with torch on one thread already,
        nothing is changed.
        """
        most = torch.get_num_threads()
        if most != self.most:  # a new thread budget: earlier measurements do not apply
            self.most, self.threads, self.per_step, self._recent = most, most, {}, {}
            self._trial, self._interval, self._until_trial = False, 1, 1
        self._active = enabled and most > 1
        self._apply = apply or torch.set_num_threads
        if self._active:
            if apply is not None:
                torch.set_num_threads(1)
            self._apply(self.threads)
        # the clock starts after the first step, which also pays for what precedes the loop
        # (an epoch's first minibatch redraws the binary copy of the data)
        self._steps, self._chunk_start = 0, None
        try:
            yield self
        finally:
            if self._active:
                torch.set_num_threads(most)
            self._active = False
            self._apply = torch.set_num_threads

    def step(self) -> None:
        """One step is done: at the end of a chunk, pick the thread count of the next one."""
        if not self._active:
            return
        self.steps_on[self.threads] = self.steps_on.get(self.threads, 0) + 1
        now = self.clock()
        if self._chunk_start is None:
            self._chunk_start = now
            return
        self._steps += 1
        if now - self._chunk_start < (self.chunk_seconds / 2 if self._trial else self.chunk_seconds):
            return
        recent = self._recent.setdefault(self.threads, deque(maxlen=self.window))
        recent.append((now - self._chunk_start) / self._steps)
        self.per_step[self.threads] = min(recent)
        self._choose()
        self._steps, self._chunk_start = 0, self.clock()  # after the switch: not timed

    def _choose(self) -> None:
        current = self.threads
        other = 1 if current == self.most else self.most
        if self._trial:  # a trial has just run on `current`: keep the count with the lower estimate
            self._trial = False
            if self.per_step[current] <= self.per_step[other]:
                self._interval = 1
            else:
                self._interval = min(2 * self._interval, self.max_interval)
                current = other
            self._until_trial = self._interval
        elif other in self.per_step and self.per_step[current] > self.per_step[other]:
            current = other  # the count in use got slower than the other's estimate
            self._until_trial = self._interval = 1
        else:
            self._until_trial -= 1
            if self._until_trial <= 0 or other not in self.per_step:
                self._trial, current = True, other
        if current != self.threads:
            self.threads = current
            self._apply(current)
