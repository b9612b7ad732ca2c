"""Layer 5, serving: predict and export from a run folder. Imports core, inputs and the loop's checkpoints. See ARCHITECTURE.md."""
