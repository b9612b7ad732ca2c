"""Layer 6, tools: the throughput bench and the GPU check. Imports the layers below. See ARCHITECTURE.md."""
