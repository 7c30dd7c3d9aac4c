"""The paper's Fig. 1 workflow on a crossMoDA folder (:mod:`.workflow`)."""

from singan_insert.pipeline.workflow import *  # noqa: F401,F403
from singan_insert.pipeline.workflow import __all__  # noqa: F401
