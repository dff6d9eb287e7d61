"""Who may associate: an optional allow-list of calling AE titles, each optionally bound to a host.

Checked when the A-ASSOCIATE-RQ arrives (the calling AE title is known only then); a caller not on
the list gets A-ASSOCIATE-RJ "calling AE title not recognized" (rejected-permanent, service-user).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class CallerPolicy:
    """The allow-list; empty ``entries`` lets every caller in.

    ``entries`` maps a calling AE title to the set of addresses it may come from; an empty set means
    from anywhere.
    """

    entries: dict[str, frozenset[str]]

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]]) -> CallerPolicy:
        """Build from (AE title, host) pairs; host names are resolved to their addresses now."""
        entries: dict[str, set[str]] = {}
        anywhere: set[str] = set()
        for title, host in pairs:
            addresses = entries.setdefault(title.strip(), set())
            if not host:
                anywhere.add(title.strip())
            else:
                addresses.update(_addresses_of(host))
        return cls({title: frozenset() if title in anywhere else frozenset(addresses)
                    for title, addresses in entries.items()})

    @property
    def open(self) -> bool:
        """True when no allow-list is configured."""
        return not self.entries

    def allows(self, calling_ae_title: str, address: str) -> bool:
        """Whether ``calling_ae_title`` connecting from ``address`` may associate."""
        if self.open:
            return True
        addresses = self.entries.get(calling_ae_title.strip())
        if addresses is None:
            return False
        return not addresses or address in addresses


def _addresses_of(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return {host}  # an unresolvable name still matches a caller that shows exactly this text
