"""The lock around what the adapters change for the whole process during a
model call: transformers' ``"sdpa"`` attention entry
(:func:`~captum_mllm.models.math_attention.math_attention`,
:func:`~captum_mllm.models.packing.packed_layers`), LFM2's convolution
function and torch's SDPA kernel choice (``sdpa_kernel``).

Each is set on entry and put back on exit. Two threads explaining at once
(a notebook's background job, a web demo's requests) interleaved those: one
thread's forward ran under the other's packed attention and failed on its
mask, and the last to exit put back what the other had set, leaving it in
place for good. Held for a model call, the lock makes the calls of several
threads take turns; a thread re-enters it freely (the contexts nest).
"""

from __future__ import annotations

import threading

#: Held by a thread while its model call has process-wide state changed.
PROCESS_WIDE = threading.RLock()
