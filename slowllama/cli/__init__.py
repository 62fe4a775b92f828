"""The command lines, as functions that take argv."""
