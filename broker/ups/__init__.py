"""Unified Procedure Step (PS3.4 annex CC): the broker's scheduled steps served as UPS workitems.

One stored item, two views: a ``scheduled_steps`` row is a worklist item (MWL) and a UPS workitem.
:mod:`.states` holds the state table as data, :mod:`.view` builds the UPS attribute set of a step,
:mod:`.service` the operations, :mod:`.subscriptions` and :mod:`.notify` who hears of what.
"""
