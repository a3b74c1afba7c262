"""`python -m hf_astroquant ...`: the same as the `hf-astroquant` command."""

import sys

from .cli import main

sys.exit(main())
