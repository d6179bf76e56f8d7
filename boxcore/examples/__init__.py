"""Example boosters (``booster-example``: the UDP counter/filter)."""
