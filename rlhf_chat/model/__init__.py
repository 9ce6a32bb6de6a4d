"""Model: loading the base once (the weight paths, the adapters, the two copies) and the int4/int8 layers."""
