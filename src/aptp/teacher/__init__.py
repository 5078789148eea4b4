"""The embedded world teacher: a tiny Stable Diffusion stack trained on the procedural world.

``components`` builds, saves and loads it; ``train`` trains it from scratch; ``evaluate`` measures it.
"""
