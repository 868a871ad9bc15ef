"""OwenAttributor and the rewards under hostile and demanding use: threads, unsupported options, corrupt
caches, mismatched arguments, extreme gains, bad reward outputs and odd text."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch
from conftest import iphone_charger_pool
from test_evaluate import _reward, random_response

import ospo_fast as of


@pytest.fixture(scope="module")
def reward():
    return _reward()


def test_threads_sharing_one_attributor_get_the_single_threaded_values(reward):
    # Exact plans involve no randomness, so each call's result is fixed by its texts: any difference comes
    # from the threads sharing the packed forward's buffers or the phrase cache.
    rng = random.Random(7)
    batches = [[random_response(rng) for _ in range(3)] for _ in range(12)]
    owners = [[rng.randrange(2) for _ in b] for b in batches]
    expected = [of.OwenAttributor(reward, method="exact")(b, o).phi for b, o in zip(batches, owners)]
    shared = of.OwenAttributor(reward, method="exact")
    got, errors = [None] * len(batches), []
    start = threading.Barrier(4)

    def work(worker):
        start.wait()
        try:
            for _ in range(2):
                for j in range(worker, len(batches), 4):
                    got[j] = shared(batches[j], owners[j]).phi
        except Exception as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for j, (g, e) in enumerate(zip(got, expected)):
        for a, b in zip(g, e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"batch {j}")
