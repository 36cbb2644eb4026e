"""The model benchmark moved to :mod:`mnapps.bench.models`; its names stay importable from here."""

from mnapps.bench.models import *  # noqa: F401,F403
from mnapps.bench.models import __all__  # noqa: F401
