"""Auto-parallel planning: a cost model of compute, communication and memory, and a search over
layouts (``loom plan``). Nothing here starts a process or allocates a weight."""
