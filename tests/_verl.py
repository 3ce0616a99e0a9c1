"""verl's policy-loss module for the verl tests, where verl imports.

``core_algos`` is verl.trainer.ppo.core_algos or None; ``needs_verl`` skips a
test without it, the reason naming what failed (the README's test command
installs verl: tests/requirements-verl.txt).
"""

from __future__ import annotations

import pytest

try:
    from verl.trainer.ppo import core_algos
except Exception as e:  # noqa: BLE001  (verl missing, or one of its own imports)
    core_algos = None
    VERL_MISSING = f"verl does not import here ({type(e).__name__}: {e})"
else:
    VERL_MISSING = ""

needs_verl = pytest.mark.skipif(core_algos is None, reason=VERL_MISSING or "verl present")
