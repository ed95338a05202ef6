import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py and helpers
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# CHUNKKV_TEST_DEVICE=cuda runs the whole suite on a GPU: every tensor and model the tests create
# lands there, so the library is checked device-agnostic with the same assertions.
if os.environ.get("CHUNKKV_TEST_DEVICE"):
    torch.set_default_device(os.environ["CHUNKKV_TEST_DEVICE"])
