"""One module per paper: its loss or regularizer, its model wrapper, its recipe."""
