"""Training objectives: noise schedule, SUBS parameterisation, MDLM / AR / NCE losses (spec §3, §4, §6.4)."""
