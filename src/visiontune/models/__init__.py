"""Backbones by name, classifier heads, freezing, and the self-describing model directory."""
