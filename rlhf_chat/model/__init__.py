"""Model: loading the base once (the weight paths, the adapters, the two copies), the int4/int8 layers and native kernels, the decoding loop, the heads on hidden states and small tensor helpers."""
