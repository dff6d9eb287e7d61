"""The names the cluster coordinates by: a node id per ``broker run`` process unless set, and the lease
names other nodes must agree on (a renamed lease would let two nodes hold "the same" thing)."""

from __future__ import annotations

import os
import socket

from broker.audit.shipper import LEASE
from broker.cluster.nodes import node_id_for
from broker.config import load_settings
from broker.outbound.ups_events import association_lease


def test_a_node_is_named_by_its_host_and_process_unless_configured() -> None:
    assert node_id_for(load_settings()) == f"{socket.gethostname()}-{os.getpid()}"
    assert node_id_for(load_settings(node_id="ward-2")) == "ward-2"


def test_lease_names_are_fixed() -> None:
    assert LEASE == "audit-shipper"
    assert association_lease("CT01") == "ups-association:CT01"
