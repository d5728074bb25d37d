"""Where decoding time goes: seconds inside model forwards, and per-call times of a role's methods.

`ForwardTimer.instrument(roles)` wraps the forward of every Stream the roles open from then on, so
the search code is timed as it is, not a copy of it. On CUDA each timed forward synchronizes before
and after: kernels run asynchronously, and without the sync their time would land on whatever Python
line next waits for the GPU (usually `.tolist()` in sampling), making forwards look free.
(The bidirectional-classifier path, EncoderSession, calls its model directly and is not timed.)
"""

import time

import torch


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class ForwardTimer:
    def __init__(self):
        self.seconds = 0.0  # summed over every timed forward
        self.calls = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def wrap(self, forward):
        def timed(*args):
            synchronize()
            start = time.perf_counter()
            out = forward(*args)
            synchronize()
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out
        return timed

    def instrument(self, roles: dict) -> None:
        """Time the forwards of every session these roles (ivg.values.Role, by name) open from now on."""
        for role in roles.values():
            role.forward_of = (lambda forward_of: lambda loaded: self.wrap(forward_of(loaded)))(role.forward_of)


def record_calls(obj, method: str) -> list[float]:
    """Wrap obj.method (on this instance only); returns the list its call durations are appended to."""
    durations, inner = [], getattr(obj, method)

    def timed(*args, **kwargs):
        synchronize()
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        synchronize()
        durations.append(time.perf_counter() - start)
        return out
    setattr(obj, method, timed)
    return durations
