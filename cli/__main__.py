"""`python -m cli ...` is the `captioning` command."""

import sys

from cli.main import main

sys.exit(main())
