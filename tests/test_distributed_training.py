"""The custom training step under a real multi-replica strategy (two logical CPUs in a fresh process)."""

import json
import subprocess
import sys
import textwrap


def test_training_step_runs_under_mirrored_strategy(synthetic_data, feature_cache, tmp_path):
    script = textwrap.dedent(f"""
        import json, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from captioning.manifest import read_manifest
        from captioning.train import train
        from tests.conftest import tiny_config
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        result = train(read_manifest({str(synthetic_data["train"])!r}), read_manifest({str(synthetic_data["val"])!r}),
                       {str(tmp_path / "m")!r}, tiny_config(epochs=2, cache_dir={feature_cache!r}),
                       strategy=strategy, progress=False,
                       log=lambda _: None)
        print(json.dumps({{"replicas": strategy.num_replicas_in_sync, "history": result.history}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    history = out["history"]
    assert history[1]["loss"] < history[0]["loss"] and history[1]["val_loss"] < history[0]["val_loss"]
    assert (tmp_path / "m" / "bundle.json").exists()
