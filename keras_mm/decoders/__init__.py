"""Text decoders: causal / cross-attending transformer decoders and in-graph search."""
