"""Named crash points for fault-injection tests.

Setting MEDEMBED_KILL_AT=POINT makes the process SIGKILL itself when it reaches POINT, e.g.
`img:3` (right after image batch 3 is stored), `img-part:3` (batch 3 written to its temporary
name, not yet renamed), `capb:0` (the captions of image batch 0 encoded), `con:0`, `h5-tmp` (finished file written, not yet renamed) or
`h5-final` (renamed, parts not yet removed), `adapt-epoch:2` (an adapter run's epoch 2 checkpointed). Unset, `reached` costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "MEDEMBED_KILL_AT"


def reached(point: str) -> None:
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
