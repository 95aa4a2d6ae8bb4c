"""Neuron-level interpretability: activation records, explanation, simulation and scoring (see schema.py for the
tables other tools read)."""
