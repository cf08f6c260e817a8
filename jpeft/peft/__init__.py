"""Adapter methods: each a pure transform of the parameter tree."""
