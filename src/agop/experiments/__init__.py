"""The paper's experiments: settings, data, run records, checkpoints, summaries and figures.

They call the library (``agop.models``, ``agop.collapse``, ...) and are called by the report and
the CLI; nothing in the library imports them."""
