"""The label convention of every dataset, the loss and the metrics: uint8 maps of class indices
0..C-1, and ``IGNORE_INDEX`` for pixels that are neither trained on nor scored (void, borders,
padding)."""

IGNORE_INDEX = 255
