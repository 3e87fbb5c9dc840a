"""Deliver: the outbox sender, C-STORE SCU and the classification of a peer's answers."""
