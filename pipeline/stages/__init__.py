"""Stages that more than one job composes (a job never imports another job)."""
