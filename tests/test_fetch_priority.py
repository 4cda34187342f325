"""Fetch threads yield the cores to the model stage: their own nice value is lowered, the process's is not."""

import os
import threading

import pytest

from captioning.shards import defaults
from captioning.shards.fetching import lower_priority


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are a Linux/POSIX feature")
def test_lower_priority_lowers_only_the_calling_thread():
    seen = {}

    def worker():
        lower_priority()
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, 0)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["thread"] == min(19, before + defaults.FETCH_NICENESS)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # this thread: untouched


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are a Linux/POSIX feature")
def test_fetch_threads_yield_even_in_a_process_ray_started_at_nice_15():
    # Ray starts every worker, the model actors too, at nice 15: the fetch threads must still rank below them.
    code = ("import os, threading; os.nice(15 - os.getpriority(os.PRIO_PROCESS, 0)); "
            "from captioning.shards.fetching import lower_priority; seen = []; "
            "t = threading.Thread(target=lambda: (lower_priority(), "
            "seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))); t.start(); t.join(); "
            "print(os.getpriority(os.PRIO_PROCESS, 0), seen[0])")
    import subprocess
    import sys

    process, thread = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout.split()
    assert (int(process), int(thread)) == (15, 19)
