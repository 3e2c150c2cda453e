"""Entrypoint for `ray job submit`: the same as `raygpt tune`, joining the cluster it runs on.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tune.py --config jobs/tune.yaml [--set tune.max_concurrent_trials=4 ...]
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raygpt.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--address" not in args and os.environ.get("RAY_ADDRESS"):
        args += ["--address", "auto"]
    sys.exit(main(["tune", *args]))
