"""How long `sparseinv --help` and an argument error take (torch is imported only for real work).

    python benchmarks/cli_startup.py

Each command runs as a fresh process 5 times; the median wall time is written to
``benchmarks/results/cli_startup.json``, beside that of ``python -c "import torch, timm"``
on the same machine for scale.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_results

SPARSEINV = str(Path(sys.executable).with_name("sparseinv"))
COMMANDS = {
    "sparseinv --help": [SPARSEINV, "--help"],
    "sparseinv invert --help": [SPARSEINV, "invert", "--help"],
    "sparseinv invert (missing --model)": [SPARSEINV, "invert", "--out", "x"],
    "sparseinv distill --depth x (bad value)": [SPARSEINV, "distill", "--depth", "x"],
    "python -c 'import sparseinv.models' (torch and timm, for scale)": [sys.executable, "-c", "import sparseinv.models"],
}


def main() -> None:
    rows = {}
    for name, argv in COMMANDS.items():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run(argv, capture_output=True)
            times.append(time.perf_counter() - start)
        rows[name] = {"median_seconds": statistics.median(times), "runs": times}
        print(f"{name:<45} {statistics.median(times):6.2f} s")
    write_results("cli_startup", {"scaled_down": False, "rows": rows})


if __name__ == "__main__":
    main()
