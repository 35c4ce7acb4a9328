"""The answer cache (issue 13): repeated questions answered by Tollgate itself.

`keys.py` decides what makes two requests the same question, `store.py` keeps the answers within
a bound, and `replay.py` writes a stored answer back in the shape the caller asked for.
"""
