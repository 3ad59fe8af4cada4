"""INT8 for the encoder: activation statistics, the Q/DQ graph, and the accuracy gate."""
