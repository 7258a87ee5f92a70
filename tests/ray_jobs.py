"""`ray job submit` from the tests: the head's job agent starts after `ray start` / `ray up` return."""

from __future__ import annotations

import time


def until_job_agent(submit, tries: int = 30, wait_s: float = 2.0):
    """Run `submit()` (a `ray job submit`) again while the head's job agent is still starting: it comes
    up after `ray start` / `ray up` return, and until then Ray answers "No available agent ... try again later"."""
    for _ in range(tries):
        res = submit()
        out = res.stdout + res.stderr if hasattr(res, "stdout") else res[1]
        if "No available agent to submit job" not in out:
            return res
        time.sleep(wait_s)
    return res
