"""Imports go one way (cli -> jobs -> captioning) and the library never imports Ray: import-linter's contracts."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    linter = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "6 kept, 0 broken" in done.stdout


def test_a_job_entrypoint_parses_its_options_without_the_cli():
    # `python -m jobs.batch` is what a submitted job runs: it must not need (or import) the CLI.
    script = ("import sys, jobs.batch, jobs.features, jobs.train; "
              "assert not any(m == 'cli' or m.startswith('cli.') for m in sys.modules), sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "jobs.batch", "--manifest", "m.csv"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "--model" in bad.stderr and "Traceback" not in bad.stderr
