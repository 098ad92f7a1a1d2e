"""Run a command and print its wall time and peak resident memory (VmHWM, polled every 50 ms).

Usage: python benchmarks/peak_rss.py COMMAND [ARGS...]
"""

import subprocess
import sys
import time
from pathlib import Path

proc = subprocess.Popen(sys.argv[1:])
peak_kb = 0
t0 = time.perf_counter()
while proc.poll() is None:
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                peak_kb = max(peak_kb, int(line.split()[1]))
    except OSError:
        pass
    time.sleep(0.05)
print(f"wall {time.perf_counter() - t0:.1f}s peak {peak_kb / 1024:.0f} MB rc {proc.returncode}")
sys.exit(proc.returncode)
