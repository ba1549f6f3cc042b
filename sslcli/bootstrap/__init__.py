"""Neighbour bootstrapping (none | nn | adasim | oracle): cache, window, decision rules.

`Bootstrapper` is what the engine drives; `RULES` (rules.py) is the literal dict of decision
rules; `window_distribution` (adasim.py) is the public AdaSim window distribution.
"""

from sslcli.bootstrap.adasim import window_distribution
from sslcli.bootstrap.bootstrapper import Bootstrapper
from sslcli.bootstrap.cache import NeighbourCache
from sslcli.bootstrap.rules import RULES

__all__ = ["RULES", "Bootstrapper", "NeighbourCache", "window_distribution"]
