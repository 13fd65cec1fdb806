"""Architectures the library implements itself because no package it uses has them."""
