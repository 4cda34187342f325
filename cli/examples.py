"""One example per command, shown at the end of its --help (kept here, together, so they stay consistent)."""

EXAMPLES = {
    "data synthetic": "captioning data synthetic --out data --train 200 --val 40 --test 20",
    "data flickr8k": "captioning data flickr8k --out data/flickr8k",
    "data conceptual-captions": "captioning data conceptual-captions --out data/cc --split validation --limit 1000",
    "train": "captioning train --train data/train.jsonl --val data/val.jsonl --out models/m --vocab-size 5000",
    "features": "captioning features --manifest s3://bucket/train.tsv --out s3://bucket/features/train --actors 4",
    "caption": "captioning caption models/m photo.jpg https://example.com/cat.jpg --beam-size 3",
    "evaluate": "captioning evaluate models/m data/test.jsonl --out report.json",
    "status": "captioning status s3://bucket/captions",
    "batch": "captioning batch --manifest s3://bucket/urls.parquet --model models/m --output s3://bucket/captions "
             "--actors 4",
    "jobs submit": "captioning jobs submit batch --address http://head:8265 --wait -- --manifest s3://b/urls.tsv "
                   "--model s3://b/models/m --output s3://b/captions",
    "jobs status": "captioning jobs status raysubmit_abc123 --address http://head:8265",
    "jobs logs": "captioning jobs logs raysubmit_abc123 --address http://head:8265 --follow",
    "jobs stop": "captioning jobs stop raysubmit_abc123 --address http://head:8265",
    "jobs list": "captioning jobs list --address http://head:8265",
    "models add": "captioning models add models/m --registry s3://bucket/registry --promote",
    "models list": "captioning models list --registry s3://bucket/registry",
    "models show": "captioning models show v0002 --registry s3://bucket/registry --html report/",
    "models promote": "captioning models promote v0002 --registry s3://bucket/registry --reason \"better CIDEr\"",
    "models rollback": "captioning models rollback --registry s3://bucket/registry --reason \"bad captions\"",
    "models history": "captioning models history --registry s3://bucket/registry",
    "retrain": "captioning retrain --registry s3://b/registry --data-prefix s3://b/new-data/ --holdout s3://b/holdout.tsv "
               "--val s3://b/val.tsv",
    "schedule": "captioning schedule --cron \"0 3 * * *\" --state s3://b/schedule -- --registry s3://b/registry "
                "--data-prefix s3://b/new-data/ --holdout s3://b/holdout.tsv --val s3://b/val.tsv",
    "storage serve": "captioning storage serve --dir runs/s3 --bucket captioning",
    "demo": "captioning demo --out runs/demo",
}
