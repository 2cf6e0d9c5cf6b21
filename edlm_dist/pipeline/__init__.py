"""The end-to-end pipeline (``edlm pipeline``): data -> MDLM/AR/NCE training -> sampling -> evaluation -> report."""
