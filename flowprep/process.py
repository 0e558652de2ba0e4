"""How a flowprep command ends its process."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def run_and_exit(command: Callable[[], object]) -> NoReturn:
    """Run ``command`` (a CLI's main, which may raise ``SystemExit``) and end the process with
    its exit status once Python's own shutdown work is done: other non-daemon threads joined,
    ``atexit`` handlers run (Ray's shutdown among them), standard streams flushed. The process
    then ends without C++ static destructors.

    Why: every Arrow IPC file open starts Arrow's I/O thread pool, and the pool's static
    destructor at exit can race a worker that is still finishing, so ``std::terminate`` aborts
    a process whose work succeeded ("terminate called without an active exception", exit 134;
    apache/arrow#34314). A script then reads a passed check as a failure. No destructor of
    those libraries has work to do at exit that matters to flowprep: files are closed and synced
    by then."""
    try:
        command()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing left to say
            pass
    os._exit(code)
