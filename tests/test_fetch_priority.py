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
    assert seen["thread"] == max(before, defaults.FETCH_NICENESS)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # this thread: untouched
