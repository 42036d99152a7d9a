"""caravan coordinator: the command line and, later, discovery and placement."""
