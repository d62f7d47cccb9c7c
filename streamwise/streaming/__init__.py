"""The internal wire protocol: replica servicer, frames, request context."""
