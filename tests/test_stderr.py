"""Silencing C libraries' stderr while decoding must not silence the process: threads decoding at once (the
training cache loads with a thread pool) once left fd 2 on the null device, and every later progress bar,
warning and error line was lost."""
from __future__ import annotations

import os
import threading

from bloodcells.imageio import _native_stderr_silenced


def _where(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def test_overlapping_silencing_in_two_threads_restores_stderr() -> None:
    keep = os.dup(2)
    try:
        before = _where(2)
        fd = os.open(os.devnull, os.O_RDONLY)
        null = _where(fd)
        os.close(fd)
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
        inside: list[tuple[int, int]] = []

        def first() -> None:  # enters first, leaves while the second is still inside
            with _native_stderr_silenced():
                a_in.set()
                b_in.wait(5)
                inside.append(_where(2))
            a_out.set()

        def second() -> None:
            a_in.wait(5)
            with _native_stderr_silenced():
                b_in.set()
                a_out.wait(5)
                inside.append(_where(2))

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert inside == [null, null]  # silenced while any thread decodes
        assert _where(2) == before  # and back where it was once the last one leaves
    finally:
        os.dup2(keep, 2)
        os.close(keep)
