"""prefixtune: prefix tuning, prompt tuning and text prefixes for frozen transformers-5 models."""

from prefixtune.config import PrefixConfig
from prefixtune.errors import PrefixTuneError
from prefixtune.model import PrefixModel, attach

__all__ = ["PrefixConfig", "PrefixModel", "PrefixTuneError", "attach"]
__version__ = "0.1.0"
