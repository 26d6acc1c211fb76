"""Knob mechanics shared by every family: width slicing, head projection, token reduction."""
