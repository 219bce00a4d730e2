"""Solvers for the small K x K problems behind the strategies."""
