"""numareuse: keep a server's new connections on the NUMA domain that received them.

Public API::

    from numareuse import Selector, CURRENT, WILDCARD, NumaReuseError
    with Selector(domains="numa") as sel:
        sel.attach(sock)
        sel.register(sock, domain=CURRENT)
"""

from .errors import (
    CapacityError,
    DomainError,
    DomainSpecError,
    NotInGroupError,
    NotSupported,
    NumaReuseError,
    PermissionDenied,
    ProcessGone,
    StateError,
    VerifierError,
)
from .selector import CURRENT, WILDCARD, Selector
from .topology import Topology

__all__ = [
    "CURRENT",
    "WILDCARD",
    "CapacityError",
    "DomainError",
    "DomainSpecError",
    "NotInGroupError",
    "NotSupported",
    "NumaReuseError",
    "PermissionDenied",
    "ProcessGone",
    "Selector",
    "StateError",
    "Topology",
    "VerifierError",
]
__version__ = "0.1.0"
