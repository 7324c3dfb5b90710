"""`python -m prefixtune.serving`: the same command line as `prefixtune serve`."""

import sys

from prefixtune.serving.command import main

sys.exit(main())
