"""The sharded-job engine that the bulk captioning job and the features job share.

One shard's walk: plan.plan_shards writes its manifest rows to _input/shard-N.jsonl (PlannedRow) and checks
_plan.json -> fetching.fetch_shard takes a ShardInput and returns a FetchedShard (FetchedRow statuses, decoded
images, rows a --retry-failed attempt keeps) -> the plug-in's model stage (an actor) returns its ShardRows payload
(Captioned, Embedded) -> the plug-in's Writer writes the data, then the commit marker (writer.commit_marker), and
returns Committed -> summary.summarise checks every shard's row range and writes _SUCCESS.json. Each payload owns
its conversion to and from a Ray row (payloads.py); run.py frames a run in this process, jobs/driver.py on Ray Data.
"""
