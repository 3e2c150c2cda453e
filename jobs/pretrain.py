"""Entrypoint for `ray job submit`: the same as `raygpt train`, joining the cluster it runs on.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pretrain.py --config jobs/pretrain.yaml [--set section.key=value ...]

Exits non-zero when training fails, so `ray job status` says FAILED.
"""

import os
import sys
from pathlib import Path

# The job's working dir holds the package; python puts only jobs/ on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raygpt.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--address" not in args and os.environ.get("RAY_ADDRESS"):
        args += ["--address", "auto"]  # inside a job: the cluster it was submitted to, never a new Ray
    sys.exit(main(["train", *args]))
