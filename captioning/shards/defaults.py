"""The engine's defaults, each in one place: the configs, the options and the docs read them from here."""

SHARD_SIZE = 256  # manifest rows per shard: one input file, one commit, one output file
FETCH_THREADS = 32  # requests in flight per fetch task
FETCH_TASKS_PER_ACTOR = 4  # fetch tasks at once per model actor: enough to keep a CPU actor busy on a manifest of
# mostly dead links (2 cores, 2026-12-03), few enough that their workers' memory (~300 MiB each) stays bounded
DECODE_THREADS = 2  # decoding threads per fetch task: libjpeg-turbo runs outside the GIL, one per core here
FETCH_NICENESS = 10  # fetch threads' nice value: the model actors, the scarce stage, get the cores first
DECODE_MEMORY = 512 * 1024 * 1024  # decoded-pixel bytes one fetch task may hold at once
ACTORS = 1  # model-stage actors, each loading its model once
ACTOR_CPUS = 1.0  # CPUs Ray reserves per actor; fetch and write tasks need some left
NUM_GPUS = 0.0  # GPUs per actor
