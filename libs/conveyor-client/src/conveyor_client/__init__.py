"""Conveyor client SDK and CLI."""
