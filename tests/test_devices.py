"""Device-derived defaults: batch size and CPU threads (precision is tested with generation)."""

import os
import subprocess
import sys

import pytest

from captioning import devices
from captioning.devices import CPU_BATCH_SIZE, GPU_BATCH_SIZE, resolve_batch_size, resolve_precision


@pytest.mark.parametrize("capability,batch,precision", [
    (None, CPU_BATCH_SIZE, "float32"), ((7, 5), GPU_BATCH_SIZE, "mixed_float16"),
    ((8, 0), GPU_BATCH_SIZE, "mixed_bfloat16"), ((9, 0), GPU_BATCH_SIZE, "mixed_bfloat16"),
])
def test_defaults_follow_the_device(monkeypatch, capability, batch, precision):
    # The device is injected, so this holds on a CPU machine and on a GPU runner alike.
    monkeypatch.setattr(devices, "gpu_capability", lambda: capability)
    assert resolve_batch_size(None) == batch
    assert resolve_precision("auto") == precision
    assert resolve_precision("float32") == "float32"  # an explicit choice always wins
    assert resolve_batch_size(7) == 7


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="batch size"):
        resolve_batch_size(0)
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("float8")


def test_cpu_threads_are_set_for_tensorflow_even_under_rays_one_thread_setting():
    code = ("import tensorflow as tf; from captioning.devices import use_cpu_threads; "
            "n = use_cpu_threads(None); print(n, tf.config.threading.get_intra_op_parallelism_threads())")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what Ray sets in a 1-CPU actor
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == [str(len(os.sched_getaffinity(0)))] * 2


@pytest.mark.parametrize(("threads", "reserved", "expected"), [(None, 1.0, 1), (None, 1.5, 2), (3, 1.0, 3),
                                                              (None, 0.0, None)])
def test_an_actor_uses_the_cpus_it_reserves_unless_told_otherwise(threads, reserved, expected):
    # Its threads on every core would take them from the tasks beside it (and spin waiting for each other).
    code = ("import sys, tensorflow as tf; from captioning.devices import use_cpu_threads; "
            f"n = use_cpu_threads({threads}, {reserved}); print(n, tf.config.threading.get_intra_op_parallelism_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(expected or len(os.sched_getaffinity(0)))] * 2
