"""A stop signal during a threaded evaluation (ranking worker threads) ends the process at once.

The signal is held while a block is scored and handed to the pool and raised between blocks
(``dprec.training.metrics.evaluate_ranking``): raised inside the executor's locks it could leave one
held, and the pool's shutdown (and the interpreter's exit, which joins the workers) would wait forever.
A child process evaluates in a loop with a worker thread (scoring blocks while it ranks, or, streamed, both in
every thread); it is stopped at a different moment of
its evaluation each time and must exit with 128 + the signal within seconds, every time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import sys, numpy as np, torch
from dprec.data.interactions import UserItemSets
from dprec.training.metrics import evaluate_ranking
from dprec.training.signals import Interrupted, stop_on_signals

torch.set_num_threads(2)
rng = np.random.default_rng(0)
n_users, n_items = 4000, 3000
def pairs(k):
    users = np.repeat(np.arange(n_users), k)
    return UserItemSets.from_pairs(users, rng.integers(0, n_items, len(users)), n_users, n_items)
truth, mask = pairs(2), pairs(8)
user_emb, item_emb = torch.randn(n_users, 32), torch.randn(n_items, 32)
pooled = []
import dprec.training.metrics as metrics
original = metrics.ThreadPoolExecutor
def counting(*args, **kwargs):
    pooled.append(1)
    return original(*args, **kwargs)
metrics.ThreadPoolExecutor = counting
try:
    with stop_on_signals():
        for i in range(10**6):
            evaluate_ranking(lambda u: user_emb[u] @ item_emb.T, truth, mask, block_bytes=1 << 18, workers=1,
                             factors=(user_emb, item_emb) if sys.argv[1] == "streamed" else None)
            if i == 0:
                assert pooled, "the evaluation did not use its worker threads"
                print("evaluating", flush=True)
except Interrupted as exc:
    print(exc, file=sys.stderr)
    sys.exit(exc.exit_code)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("path", ["score-blocks", "streamed"])
def test_a_signal_during_a_threaded_evaluation_ends_the_process(signum, path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    for delay in (0.0, 0.013, 0.031, 0.057, 0.11):  # different moments of the evaluation loop
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, path], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout.readline().strip() == "evaluating", proc.stderr.read()
            time.sleep(delay)
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 128 + signum, (delay, err)
        assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
