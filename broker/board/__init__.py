"""The status board's domain: the delay rules, the day's figures, the wall view's privacy and the
readable causes of the timeline, as pure functions over plain facts, and the queries that read those
facts (``day``). No HTTP here: ``broker.web.board`` serves what this package computes."""
