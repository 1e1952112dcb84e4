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

It also holds the global generators (torch's, Python's, NumPy's) for a run
that draws from them: a Captum sampler's, a ``ProductBaselines`` input's or
a noisy gradient method's, seeded or not
(:func:`~captum_mllm.captum_compat.global_draws`), and our estimators' draw
of an unseeded seed: another thread's draws in the middle of a seeded run
moved its values.
"""

from __future__ import annotations

import threading

#: Held by a thread while its model call has process-wide state changed, or
#: while its run draws from the global generators.
PROCESS_WIDE = threading.RLock()
