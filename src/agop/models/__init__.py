"""Estimators and networks: Deep RFM and the MLP. They take arrays or tensors and return them;
nothing here knows of run folders, figures, reports or the command line."""
