"""Iteration planning: which requests and how many of their tokens run in each engine iteration."""
