"""Session-wide test settings.

``TRITON_INTERPRET=1``: Triton kernels run in Triton's interpreter, on CPU tensors (tests/test_fused_triton.py).
It must be set before Triton is first imported (by transformers, bitsandbytes or foam-hf), because Triton
decorates its own standard-library functions at import time; conftest.py is loaded before any test module.
The suite is CPU-only, so nothing here wants compiled Triton kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
