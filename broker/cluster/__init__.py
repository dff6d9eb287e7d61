"""Coordination of several ``broker run`` nodes on one database: named leases (:mod:`.leases`), the node
registry and its heartbeat (:mod:`.nodes`), jobs that run on one node at a time (:mod:`.periodic`) and
leases handed from one holder to another on request (:mod:`.handoff`)."""
