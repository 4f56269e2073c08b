"""agent-bus: a shell-first message bus for agents on several machines."""
__version__ = "0.1.0"
