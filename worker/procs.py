"""Child processes that die with their parent, even when the parent is SIGKILLed.

Linux's parent-death signal (`prctl(PR_SET_PDEATHSIG)`) is set in the child between fork and
exec. A parent that died before the call leaves the child re-parented already, and the signal
would never come: the child checks its parent is still the one that forked it and exits if not.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` making the child get `sig` when this process dies; None off Linux.

    libc is resolved here, in the parent, so the child only makes two calls between fork and
    exec (threads may be running in the parent: the usual preexec_fn caveat).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    signum = int(sig)

    def _set() -> None:  # pragma: no cover - runs in the child
        prctl(_PR_SET_PDEATHSIG, signum)
        # The parent may have died between fork and prctl: then no signal will ever come.
        if os.getppid() != parent:
            os._exit(1)

    return _set
