import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from hubcapture import hub  # noqa: E402,F401  (the intercepted-Hub fixture)
