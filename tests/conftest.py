import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# Without a GPU, the Triton kernel's tests run it under Triton's interpreter on CPU tensors. Triton
# reads the switch when it is first imported, so it is set here, before any test imports it.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from hubcapture import hub  # noqa: E402,F401  (the intercepted-Hub fixture)
