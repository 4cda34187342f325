"""Run by tests/test_batch.py in its own process: a bulk job on a multi-node Ray cluster on this machine
(ray.cluster_utils.Cluster) whose worker node, the one running the captioning actor, is removed without warning
mid-job; another node joins a few seconds later. Prints the job's summary as JSON.

    python tests/node_loss.py MANIFEST MODEL OUTPUT
"""

import json
import os
import sys
import threading
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray address stays on loopback

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from captioning.bulk import BulkConfig  # noqa: E402
from captioning.config import FetchConfig  # noqa: E402
from captioning.manifest import ManifestSpec  # noqa: E402
from captioning.storage import Storage  # noqa: E402
from jobs.batch import run  # noqa: E402
from jobs.ray_setup import connect  # noqa: E402


def main() -> int:
    manifest, model, output = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    try:
        # The captioning actor wants 2 CPUs: only a worker node has them, so it runs there.
        doomed = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        config = BulkConfig(manifest, model, output, ManifestSpec(image_column="url", id_column="id"),
                            shard_size=1, batch_size=4, actor_cpus=2, attention=False,
                            fetch=FetchConfig(allowed_networks=("127.0.0.1/32",), retries=2, backoff=0.05))
        events, result = [], {}
        connect(cluster.address)  # here, in the main thread (Ray installs signal handlers); the job joins it

        def job() -> None:
            try:
                result["summary"] = run(config, address=cluster.address,
                                        log=lambda line: print(line, file=sys.stderr, flush=True), progress=False)
            except BaseException as err:  # noqa: BLE001
                result["error"] = repr(err)

        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        # Nodes come and go from the main thread too (ray.cluster_utils needs it).
        markers = output.rstrip("/") + "/_committed"
        while len(Storage().list(markers)) < 2 and thread.is_alive():
            time.sleep(0.2)
        events.append({"removed_after_shards": len(Storage().list(markers)), "job_running": thread.is_alive()})
        cluster.remove_node(doomed, allow_graceful=False)  # no warning: a preempted machine
        time.sleep(5)
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        events.append({"added": True})
        thread.join(240)
        if "error" in result or "summary" not in result:
            print(result.get("error", "the job did not finish in time"), file=sys.stderr)
            return 1
        summary = result["summary"]
        # Ray prints its workers' and raylets' lines to stdout too: the result line is marked.
        print("RESULT " + json.dumps({"rows": summary["rows"], "statuses": summary["statuses"], "events": events}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
