"""OpenMP's idle-thread spinning, set for the entry points before they first import torch."""

import os


def shorten_openmp_spinning() -> None:
    """An idle OpenMP thread spins 3000 times (~0.1 ms on a 2-core EPYC) before it sleeps, not
    libgomp's default 300000 (~5 ms) after every parallel region: training shares the cores
    with dataloader workers (and often other jobs), and a spinning thread holds a core that its
    partner thread (each region waits for the slower one) or a worker needs. 3000 still spans
    the gaps between the small back-to-back ops of the context module and the CRF (a wait
    policy of PASSIVE, no spinning, made the CRF 2x slower on free cores).

    libgomp reads this once, as torch loads it: call it before the first ``import torch``
    (hence E402 in the entry points). A user's spin count or wait policy wins."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "3000")
