"""Progress output when stderr is a file or a pipe: whole lines, a few seconds apart, never the
carriage-return redraws of a terminal bar (a redirected log must stay readable)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import ROOT

BAR = textwrap.dedent("""
    import time
    import pipeline.log as L
    L.LOG_INTERVAL_S = 0.5
    bar = L.progress_bar(total=300, desc="train")
    for i in range(300):  # as the training loop does: a postfix every step, then the update
        bar.set_postfix(loss=f"{i:.4f}", refresh=False)
        bar.update(1)
        time.sleep(0.005)
    bar.close()
    for _ in L.progress(range(100), True, desc="masks"):
        time.sleep(0.005)
""")


def test_progress_to_a_pipe_is_a_few_whole_lines():
    out = subprocess.run([sys.executable, "-c", BAR], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert "\r" not in out.stderr and out.stderr.endswith("\n")
    train = [ln for ln in lines if ln.startswith("train:")]
    assert 1 <= len(train) <= 8, lines  # about 1.5 s of steps at one line per 0.5 s, not 300 lines
    assert [ln for ln in lines if ln.startswith("masks:")], lines
    assert all(ln.startswith(("train:", "masks:")) for ln in lines), lines
