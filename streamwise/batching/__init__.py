"""Request batching (``@batch``, continuous batching) and stream coalescing (``@coalesce``)."""
