"""The outbox: events queued in the same transaction as the change that caused them, and their execution
(claim, handler, retry, done) by whichever process runs them."""
