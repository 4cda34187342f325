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


def test_each_worker_reads_its_own_slice_in_equal_steps(synthetic_data, tmp_path):
    import tensorflow as tf

    from captioning.config import ImageConfig
    from captioning.features import Backbone, FeatureCache
    from captioning.manifest import read_manifest
    from captioning.text import Tokenizer
    from captioning.training.data import batches, cache_features, steps_per_epoch
    from tests.conftest import tiny_config

    cache = FeatureCache(tmp_path, Backbone("mobilenet_v3_small", "none"))
    pairs = cache_features(read_manifest(synthetic_data["val"]), cache, tiny_config(image=ImageConfig()), print)
    tok = Tokenizer.build(pairs.captions, 100, 20)
    assert len(pairs) == 160  # 160 pairs do not split into whole batches of 24 for 2 workers
    everything = sorted(tok.decode(tok.encode(tf.constant(pairs.captions)).numpy()))
    for train, expected_steps in ((True, 3), (False, 4)):
        steps = steps_per_epoch(len(pairs), 24, 2, train=train)
        assert steps == expected_steps
        seen = []
        for index in range(2):
            count = 0
            for (_, tokens), labels in batches(pairs, cache, tok, 24, steps, seed=3 if train else None,
                                               shard=(index, 2)):
                count += 1
                real = labels.numpy().any(axis=1)  # padding rows have every label masked
                seen.extend(t for t, r in zip(tok.decode(tokens.numpy()), real) if r)
            assert count == steps  # every worker runs the same number of steps, or collectives hang
        if train:  # the remainder is dropped this epoch (the next epoch reshuffles)
            assert len(seen) == 3 * 24 * 2
            assert all(caption in everything for caption in seen)
        else:  # validation pads instead: every pair exactly once
            assert sorted(seen) == everything


def test_too_few_pairs_for_the_workers_is_a_clear_error():
    import pytest

    from captioning.errors import CaptioningError
    from captioning.training.data import steps_per_epoch

    with pytest.raises(CaptioningError, match="smaller --batch-size"):
        steps_per_epoch(40, 32, 2, train=True)
    assert steps_per_epoch(40, 32, 2, train=False) == 1
