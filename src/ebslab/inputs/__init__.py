"""Layer 1, inputs: data (load, split, fingerprint, tokenize, windows) and models (encoder, pooling, head). Imports core. See ARCHITECTURE.md."""
