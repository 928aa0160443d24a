"""Distillation methods and their building blocks (query selection, ...)."""
