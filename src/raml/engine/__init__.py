"""Engine: optimisation, mining, the training loop for the three modes, hyper-parameter search."""
