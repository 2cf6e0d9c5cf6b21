"""Samplers: categorical draws, MDLM ancestral updates, EDLM importance sampling and energies (spec §5, §6.3, §6.5)."""
