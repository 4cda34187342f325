"""Client-side operations, between the `captioning` command and the Ray jobs: submitting jobs to a cluster,
scheduling them, the local dev cluster (Ray head + SeaweedFS) and the demo."""
