import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from hubcapture import hub  # noqa: E402,F401  (the intercepted-Hub fixture)
