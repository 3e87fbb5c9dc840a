"""The queue: the only writer of the Job, Outbox and Result tables."""
