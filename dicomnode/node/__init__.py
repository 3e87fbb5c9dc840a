"""The node: the supervisor, process plumbing, service wiring and the inventory views."""
