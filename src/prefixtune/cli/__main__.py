"""`python -m prefixtune.cli`: the `prefixtune` command (what `accelerate launch -m` runs)."""

import sys

from prefixtune.cli import main

sys.exit(main())
