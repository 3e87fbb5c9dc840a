"""Receive: the Storage SCP, the header parse and the durable spool of received instances."""
