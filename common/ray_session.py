"""One way to join or start Ray for the phases that fan work out (extraction shards, index parts).

A local session is started with the repository on every worker's path and the hub offline; an
existing cluster (`address`) is joined as it is. The session is shut down on leaving only when it was
started here, so a caller's own session is left alone.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from medembed.common.errors import MedembedError


class RayMissingError(MedembedError, ImportError):
    """Ray is not installed."""


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, what: str = "--engine ray") -> Iterator:
    """The `ray` module, initialised: the cluster at `address`, else a local one of `num_cpus`."""
    try:
        import ray
    except ImportError:
        raise RayMissingError(f"{what} needs Ray: pip install 'medembed[distributed]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [_repo_root(), os.environ.get("PYTHONPATH")])),
                                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
        ray.init(address=address, num_cpus=num_cpus if address is None else None, runtime_env=runtime_env,
                 include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def _repo_root() -> str:
    """The folder holding the `medembed` package (what workers put on their path)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
