"""The `captioning` command: one module per command group; each parses, builds configs and dispatches down to
jobs/ and the library. Nothing below imports this package."""
