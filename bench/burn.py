"""A competing process for the busy-core benchmarks: one pure-Python busy loop for SECONDS seconds.

python bench/burn.py 700 & python bench/burn.py 700 &    # both cores of a 2-core machine taken
"""

from __future__ import annotations

import sys
import time


def main() -> None:
    end = time.time() + float(sys.argv[1] if len(sys.argv) > 1 else 600)
    x = 0
    while time.time() < end:
        for _ in range(100_000):
            x += 1


if __name__ == "__main__":
    main()
