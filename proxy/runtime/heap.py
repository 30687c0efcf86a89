"""The proxy's long-lived heap, kept out of the garbage collector's full passes.

Once the model, the stores and the libraries are loaded, the interpreter tracks over half a million container objects
that live as long as the process. A full (oldest-generation) collection walks all of them: 0.32 s on this project's
2-core reference machine, every time, on whichever thread allocated last, with every other thread stopped. Agents saw
those pauses as write latency spikes of a third of a second during a backfill (which allocates enough to trigger
full passes). `gc.freeze()` moves what exists at that moment to a permanent generation that collections skip, so a
full pass only walks objects made since.
"""

from __future__ import annotations

import gc

_enabled = False


def freeze_long_lived() -> None:
    """After start-up: collect once (so garbage is not frozen with the rest), then freeze everything alive."""
    global _enabled
    _enabled = True
    gc.collect()
    gc.freeze()


def freeze_new_modules() -> None:
    """After a store opened later (a migration's target imports its client library): freeze again, without the
    collection (a pass of the young generations' garbage is not worth a stop of the event loop). No-op unless the
    process froze its heap at start (an in-process test server does not)."""
    if _enabled:
        gc.freeze()
