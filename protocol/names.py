"""The network-name rule: which names a lab network may have.

One rule for every place a network name is checked: the `network` setting
(daemon/config.py) and the protocols that put the name into a GossipSub topic
or a request (`heads.py`). Kept in its own small module so that loading the
config does not load the wire codecs.
"""

from __future__ import annotations

import re

# The name goes into a GossipSub topic, so it is kept to a small safe alphabet.
NETWORK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
NETWORK_NAME_RULE = "1-63 of a-z 0-9 . _ - starting with a letter or digit"


def check_network_name(network: str) -> str:
    """Return `network` if it is a usable network name.

    Raises `ValueError` saying what is allowed (`NETWORK_NAME_RULE`).
    """
    if not isinstance(network, str) or not NETWORK_NAME_RE.match(network):
        raise ValueError(f"not a network name: expected {NETWORK_NAME_RULE}")
    return network
