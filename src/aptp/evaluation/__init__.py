"""Side-by-side evaluation of the routed mixture and its baselines, and the report."""
