"""Device-derived defaults: batch size and CPU threads (precision is tested with generation)."""

import os
import subprocess
import sys

import pytest

from captioning.devices import CPU_BATCH_SIZE, resolve_batch_size


def test_batch_size_defaults_to_the_cpu_size_here_and_respects_a_choice():
    assert resolve_batch_size(None) == CPU_BATCH_SIZE  # no GPU on this machine
    assert resolve_batch_size(7) == 7
    with pytest.raises(ValueError, match="batch size"):
        resolve_batch_size(0)


def test_cpu_threads_are_set_for_tensorflow_even_under_rays_one_thread_setting():
    code = ("import tensorflow as tf; from captioning.devices import use_cpu_threads; "
            "n = use_cpu_threads(None); print(n, tf.config.threading.get_intra_op_parallelism_threads())")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what Ray sets in a 1-CPU actor
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == [str(len(os.sched_getaffinity(0)))] * 2
